"""Metrics: log cadence, JSONL + TensorBoard output, MFU peak table, reconstruction grid."""
import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scale.metrics import (PEAK_BF16_FLOPS, FileLogger, MetricsProcessor, device_peak_flops, format_duration,
                           reconstruction_grid)


def test_processor_logs_on_cadence_and_writes_files(tmp_path):
    lines = []
    logger = FileLogger(tmp_path, tensorboard=True)
    m = MetricsProcessor(logger, every_steps=2, total_steps=5, images_per_step=8, flops_per_image=10 ** 9,
                         peak_flops=1e12, device=torch.device("cpu"), world_size=2, print_fn=lines.append)
    logged = [m.step_done(s, loss=1.0 / s, lr=0.1, grad_norm=0.5, corrupt=0) for s in range(1, 6)]
    logger.close()
    assert [s for s, v in zip(range(1, 6), logged) if v] == [1, 2, 4, 5]  # first, every 2, last
    assert len(lines) == 4 and lines[0].startswith("step 1/5 | loss 1.0000") and "MFU" in lines[0]
    v = logged[1]
    assert v["loss/train"] == 0.5 and "throughput/mfu_pct" in v and v["memory/peak_gib"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss/train", "lr/base", "throughput/images_per_s"} <= set(acc.Tags()["scalars"])


def test_no_mfu_without_a_known_peak():
    assert device_peak_flops(torch.device("cpu")) is None
    assert PEAK_BF16_FLOPS["H100"] == 989e12


def test_reconstruction_grid_layout():
    b, h = 2, 32
    images = torch.zeros(b, 3, h, h)
    recon = torch.ones(b, 3, h, h) * 5  # far out of range: clamped
    mask = torch.zeros(b, h // 4, h // 4)
    mask[:, :4] = 1  # top half masked
    grid = reconstruction_grid(images, mask, recon, [0.5] * 3, [0.25] * 3)
    assert grid.shape == (3, b * h, 3 * h)
    assert 0 <= grid.min() and grid.max() <= 1
    # masked input is grey on the masked half; reconstruction shows the prediction only there
    assert torch.allclose(grid[:, :16, h:2 * h], torch.full((3, 16, h), 0.5))
    assert torch.allclose(grid[:, :16, 2 * h:], torch.ones(3, 16, h))
    assert torch.allclose(grid[:, 16:h, 2 * h:], torch.full((3, 16, h), 0.5))


def test_format_duration():
    assert format_duration(3723) == "1h02m03s" and format_duration(59) == "0m59s"


def test_denormalize_inverts_target_normalisation():
    from models.simmim import normalize_targets
    from scale.metrics import denormalize_prediction

    images = torch.randn(2, 3, 32, 32)
    targets = normalize_targets(images, 15)
    torch.testing.assert_close(denormalize_prediction(targets, images, 15), images, rtol=1e-4, atol=1e-4)
    assert denormalize_prediction(targets, images, None) is targets
