"""Metrics: log cadence, JSONL + TensorBoard output, MFU peak table, reconstruction grid."""
import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scale.metrics import PEAK_BF16_FLOPS, FileLogger, MetricsProcessor, device_peak_flops, format_duration


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


def test_format_duration():
    assert format_duration(3723) == "1h02m03s" and format_duration(59) == "0m59s"
