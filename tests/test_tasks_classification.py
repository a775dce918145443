"""The classification task on 2 real ranks under ZeRO-3 (gloo, CPU, fp32): resolution change, weight EMA, 1536².

One launch runs `worker()` on both ranks and checks, in order:
1. after training steps at 32/w4, `set_stage` to 64/w8 on the partitioned model gives the outputs of a
   freshly built model at 64/w8 loaded with the gathered weights and the same pretrained window sizes;
2. the fp32 weight EMA kept on each rank's shards equals `decay * shadow + (1 - decay) * w` computed on
   the gathered fp32 master weights, and `applied()` evaluates with those weights and restores the model's;
3. a 1536²/w32 stage of a tiny SwinV2, micro-batch 1, runs forward and backward through the engine.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO_ROOT, run_torchrun

TINY = ["model.embed_dim=16", "model.depths=[1,1,2,1]", "model.num_heads=[1,2,2,4]", "model.drop_path_rate=0.0",
        "finetune.num_classes=5", "finetune.mixup=0", "finetune.cutmix=0", "finetune.ema_decay=0.5",
        "finetune.layer_decay=0.8", "optim.lr=0.05", "schedule.warmup_epochs=0"]


def _config(out_dir: str, stages: str):
    from scale.config import load_finetune_config

    # one file per rank: both ranks write it, and a rank reading while the other truncates sees no stages
    path = Path(out_dir) / f"stages-rank{os.environ.get('RANK', '0')}.yaml"
    path.write_text(f"stages: {stages}\n")
    return load_finetune_config(path, TINY + [f"output_dir={out_dir}"])


def _batch(seed: int, size: int, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.randint(0, 5, (n,), generator=g)}


def _gathered_state(model) -> dict:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fp32_masters(engine) -> list:
    """Full fp32 master weights, assembled from every rank's shard (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters() if p.requires_grad]


def worker(out_dir: str) -> None:
    import models
    from scale.dist import init_distributed, seed_everything
    from scale.ds_config import fill_ds_config, load_ds_config
    from scale.engine import build_engine, partitioned
    from scale.tasks import build_task

    info = init_distributed()
    cfg = _config(out_dir, "[{img_size: 32, window_size: 4, steps: 4}, {img_size: 64, window_size: 8, steps: 2}]")
    cfg.model.pretrained_window_sizes = [4, 4, 2, 1]  # what 32/w4 gives per stage (clamped to 8, 4, 2, 1)
    ds = fill_ds_config(load_ds_config(REPO_ROOT / "ds_configs" / "zero3.json"), cfg, world_size=2, cuda=False,
                        peak_lr=1e-2, micro_batch=2, grad_accum_steps=1)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    seed_everything(0)
    task = build_task("classification", cfg, info)
    with partitioned(ds):
        model = task.build_model()
    engine = build_engine(model, task.param_groups(model), ds, info)
    task.setup(engine)
    assert all(p.data.numel() == 0 for p in model.parameters()), "expected ZeRO-3 placeholders"
    assert len(engine.param_groups) > 2 and len({g["lr_scale"] for g in engine.param_groups}) > 2  # layer decay

    # 2. EMA on shards == the formula on gathered fp32 masters
    shadow = _fp32_masters(engine)  # the EMA starts from the initial weights
    for step in range(3):
        result = engine.micro_step(task.inputs(_batch(10 * step + info.rank, 32), engine))
        assert result.loss is not None
        task.after_optimizer_step(engine, step + 1)
        shadow = [0.5 * s + 0.5 * w for s, w in zip(shadow, _fp32_masters(engine))]
    local = {id(p): s for p, s in zip(task.ema.params, task.ema.shadow)}
    for p, expected in zip([p for p in model.parameters() if p.requires_grad], shadow):
        mine = local[id(p)]
        assert mine.dtype == torch.float32 and mine.numel() == p.ds_tensor.ds_numel
        # this rank's slice of the flattened parameter; the tail of the last shard is padding
        start = info.rank * p.ds_tensor.ds_numel
        real = expected.flatten()[start:start + mine.numel()]
        torch.testing.assert_close(mine[:real.numel()], real, rtol=0, atol=1e-7)
    before = _gathered_state(model)
    probe = _batch(99, 32)["image"]
    with task.ema.applied():
        with engine.evaluating() as module:
            ema_logits = module(probe)
    reference = models.build_model(cfg.model.name, num_classes=5, **cfg.model.build_args())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reference.load_state_dict({n.removeprefix("encoder."): s.view_as(before[n]) for n, s in zip(names, shadow)},
                              strict=False)
    reference.eval()
    torch.testing.assert_close(ema_logits, reference(probe), rtol=1e-4, atol=1e-5)
    after = _gathered_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "applied() did not restore the weights"

    # 1. resolution change inside the live ZeRO-3 engine == a fresh model at the new size
    task.set_stage(cfg.stages[1], engine.module)
    engine.set_batch(1, 2)
    for i in range(2):  # one optimizer step of two micro-batches at the new size
        assert engine.micro_step(task.inputs(_batch(50 + i + 2 * info.rank, 64, n=1), engine)).loss is not None
    weights = _gathered_state(model)
    probe = _batch(7, 64)["image"]
    with engine.evaluating() as module:
        logits = module(probe)
    fresh = models.build_model(cfg.model.name, num_classes=5, **{**cfg.model.build_args(), "img_size": 64,
                                                                 "window_size": 8})
    assert fresh.pretrained_window_sizes == (4, 4, 2, 1)
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items()}, strict=True)
    fresh.eval()
    torch.testing.assert_close(logits, fresh(probe), rtol=0, atol=0)

    # 3. 1536²/w32, micro-batch 1, forward and backward through the engine
    big = cfg.stages[1].__class__(img_size=1536, window_size=32, steps=1, micro_batch=1)
    task.set_stage(big, engine.module)
    engine.set_batch(1, 1)
    result = engine.micro_step(task.inputs(_batch(5 + info.rank, 1536, n=1), engine))
    assert result.loss is not None and engine.grad_norm() is not None
    if info.rank == 0:
        (Path(out_dir) / "ok").write_text("ok")


@pytest.mark.distributed
def test_classification_task_zero3_two_ranks(tmp_path):
    run_torchrun(str(Path(__file__).resolve()), "worker", str(tmp_path), timeout=900)
    assert (tmp_path / "ok").exists()


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[-2] == "worker":
    worker(sys.argv[-1])
