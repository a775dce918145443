"""The engine wrapper on 2 real ranks under ZeRO-3 (gloo, CPU), then export of what it saved.

One launch runs `worker()` below on both ranks and checks, in order: param groups built from
`ds_shape` on partitioned parameters, the per-group LR written through DeepSpeed's optimizer,
a NaN batch on one rank skipping the step on *both* ranks without touching the weights, the
non-finite guard, a real update, a checkpoint, and the encoder's features on a fixed input.
The test process then exports that checkpoint and checks `models.build_model` +
`models.load_pretrained` reproduce those features.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO_ROOT, run_torchrun

TINY = ["model.img_size=32", "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]",
        "model.window_size=4", "model.drop_path_rate=0.0", "train.micro_batch_size=4", "data.mask_patch_size=16"]


def _batch(seed: int, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, 2, 2, generator=g) < 0.6).to(torch.uint8)
    return {"image": torch.randn(n, 3, 32, 32, generator=g),
            "mask": mask.repeat_interleave(4, 1).repeat_interleave(4, 2)}


def _fixed_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def worker(out_dir: str) -> None:
    import deepspeed

    from scale.checkpoint import CheckpointManager
    from scale.config import load_config
    from scale.dist import init_distributed, seed_everything
    from scale.ds_config import fill_ds_config, load_ds_config
    from scale.engine import NonFiniteGuard, NonFiniteLossError, build_engine, partitioned
    from scale.lr_schedule import build_lr_schedule
    from scale.param_groups import no_decay_names
    from scale.tasks import build_task

    cfg = load_config(None, TINY + [f"output_dir={out_dir}", "optim.lr=0.05"])
    ds = fill_ds_config(load_ds_config(REPO_ROOT / "ds_configs" / "zero3.json"), cfg, world_size=2, cuda=False,
                        peak_lr=1e-3)
    # keep every parameter partitioned, so shapes can only come from ds_shape
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    info = init_distributed()
    seed_everything(0)
    task = build_task("simmim", cfg, info)
    with partitioned(ds):
        model = task.build_model()
    engine = build_engine(model, task.param_groups(model), ds, info)

    # 1. param groups from ds_shape on empty partitioned parameters
    params = dict(model.named_parameters())
    assert all(p.data.numel() == 0 for p in params.values()), "expected ZeRO-3 placeholders"
    skip = set(no_decay_names(model))
    for name, p in params.items():
        expect = len(p.ds_shape) <= 1 or any(k in name for k in ("cpb_mlp", "logit_scale", "mask_token"))
        assert (name in skip) == expect, name
    groups = engine.param_groups
    assert [g["weight_decay"] for g in groups] == [cfg.optim.weight_decay, 0.0]

    # 2. the schedule writes per-group LRs that DeepSpeed's optimizer really uses
    groups[1]["lr_scale"] = 0.5
    schedule = build_lr_schedule(cfg.schedule, lr=cfg.optim.lr, global_batch=8, batch_base=512, total_steps=10,
                                 epochs=cfg.train.epochs)
    lr = schedule.apply(groups, 5)
    assert engine.engine.get_lr() == pytest.approx([lr, 0.5 * lr])
    groups[1]["lr_scale"] = 1.0
    schedule.apply(groups, 5)

    def snapshot():
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return [p.detach().clone() for p in model.parameters()]

    # 3. a NaN on rank 1 only: both ranks skip, weights untouched
    before = snapshot()
    bad = _batch(1)
    if info.rank == 1:
        bad["image"][0, 0, 0, 0] = float("nan")
    guard = NonFiniteGuard(max_in_row=2)
    result = engine.micro_step(task.inputs(bad, engine))
    assert result.loss is None, f"rank {info.rank} did not skip"
    guard.update(result.loss is not None, step=1)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))

    # 4. a good batch updates, and resets the guard's streak
    result = engine.micro_step(task.inputs(_batch(2 + info.rank), engine))
    assert result.loss is not None and torch.isfinite(torch.tensor(result.loss))
    guard.update(True, step=1)
    assert (guard.in_row, guard.total) == (0, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, snapshot()))
    assert engine.grad_norm() is not None and engine.overflow_skips == 0

    # 5. the guard stops after K in a row and names the checkpoint
    try:
        guard.update(False, step=2, last_checkpoint="/ckpt/step_1")
        guard.update(False, step=3, last_checkpoint="/ckpt/step_1")
        raise AssertionError("guard did not stop the run")
    except NonFiniteLossError as e:
        assert "/ckpt/step_1" in str(e) and "2 non-finite losses in a row" in str(e)

    # 6. reconstruction for TensorBoard works on partitioned weights, in eval mode, as a collective
    images, mask, prediction = task.reconstruct(engine, _batch(9), 2)
    assert prediction.shape == images.shape == (2, 3, 32, 32) and engine.engine.module.training

    # 7. checkpoint, then the encoder's features on a fixed input (all ranks run the forward)
    ckpt = CheckpointManager(cfg.checkpoint, out_dir, rank=info.rank)
    meta = {"step": 1, "config": cfg.to_dict(), "model_args": task.model_args()}
    ckpt.save(engine.engine, 1, client_state={"step": 1}, rank_state={}, meta=meta)
    module = engine.engine.module
    module.eval()
    with torch.no_grad():
        features = module.encoder.forward_features(_fixed_input())
    if info.rank == 0:
        torch.save(features, Path(out_dir) / "features.pt")


@pytest.mark.distributed
def test_engine_zero3_two_ranks_and_export(tmp_path):
    run_torchrun(str(Path(__file__).resolve()), "worker", str(tmp_path), timeout=600)
    out = tmp_path / "exported.pt"
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(tmp_path), str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    import models

    exported = torch.load(out, weights_only=True)
    assert exported["step"] == 1 and any(k.startswith("decoder.") for k in exported["model"])
    args = dict(exported["model_args"])
    name = args.pop("name")
    args.pop("norm_target_patch_size")
    encoder = models.build_model(name, num_classes=0, **args)
    report = models.load_pretrained(encoder, out)
    assert report.missing_keys == []
    encoder.eval()
    with torch.no_grad():
        features = encoder.forward_features(_fixed_input())
    expected = torch.load(tmp_path / "features.pt", weights_only=True)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    # and the SimMIM module loads it whole
    simmim = models.build_simmim(name, **args)
    assert models.load_pretrained(simmim, out).missing_keys == []


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[-2] == "worker":
    worker(sys.argv[-1])

