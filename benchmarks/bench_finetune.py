"""Fine-tuning benchmarks: pretrained vs random init on the demo schedule (CPU), SwinV2-G steps on a GPU.

    python benchmarks/bench_finetune.py schedule [--ranks 2]
        The demo pretraining, then the demo progressive fine-tune (configs/finetune/demo_progressive.yaml)
        from it and, with the same schedule, from random init; prints one JSON object per run with each
        stage's top-1/top-5 and the wall time.
    python benchmarks/bench_finetune.py giant [--sizes 640:40,1536:32] [--dry-run]
        One GPU: SwinV2-G classifier, bf16, ZeRO-3 on one rank, activation checkpointing and sequential
        attention, at each resolution: the micro-batch the memory plan picks, a few timed training
        steps, images/s, MFU (analytic FLOPs x 3 / step time / peak), peak memory vs the plan. One JSON
        object per size. --dry-run runs the same code on the CPU with a tiny model, to check it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _launch(script: str, ranks: int, *args: str) -> float:
    """Run a trainer on `ranks` CPU ranks through the deepspeed launcher; returns wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks)), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), script, *args],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def schedule(args: argparse.Namespace) -> None:
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_finetune_"))
    pretrain_s = _launch("run_pretrain.py", args.ranks, f"output_dir={root / 'pretrain'}", "resume=none")
    print(json.dumps({"case": "demo_pretrain", "seconds": round(pretrain_s, 1)}), flush=True)
    for name, extra in (("pretrained", ["--pretrained", str(root / "pretrain")]), ("random_init", [])):
        out = root / name
        seconds = _launch("run_finetune.py", args.ranks, *extra, f"output_dir={out}", "resume=none")
        stages = json.loads((out / "metrics.json").read_text())["stages"]
        print(json.dumps({"case": f"demo_progressive_{name}", "seconds": round(seconds, 1),
                          "stages": [{k: s[k] for k in ("img_size", "window_size", "steps", "top1", "top5")}
                                     for s in stages]}), flush=True)


GIANT_CONFIG = REPO / "configs" / "finetune" / "swinv2_giant_192to640to1536.yaml"
DRY_RUN_MODEL = ["model.name=swinv2_tiny", "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]"]


def finetune_config(model: list[str], sizes: list[tuple[int, int]], precision: str, extra: list[str] = ()):
    """The SwinV2-G fine-tune recipe with `model` overrides, one 1-step stage per (img, window) in `sizes`.

    Mixup/cutmix are off: timm's Mixup needs an even batch, and at 1536x1536 the batch is 1 (mixing costs
    nothing measurable). `extra` overrides go last.
    """
    from scale.config import load_finetune_config

    stages = "[" + ", ".join(f"{{img_size: {s}, window_size: {w}, steps: 1}}" for s, w in sizes) + "]"
    return load_finetune_config(GIANT_CONFIG, [*model, f"stages={stages}", "finetune.num_classes=1000",
                                               "finetune.ema_decay=0", "finetune.mixup=0", "finetune.cutmix=0",
                                               f"train.precision={precision}", *extra])


def build_finetune(cfg, info, micro: int, ds_config: Path = REPO / "ds_configs" / "zero3.json",
                   ds_edit=None):
    """run_finetune.py's build order on one rank: ds_config -> task -> module inside `partitioned` -> engine.

    ds_edit, if given, changes the filled ds_config dict in place before the engine is built.
    Returns (task, module, engine), the module at the first stage's resolution.
    """
    import torch

    from scale.ds_config import fill_ds_config, load_ds_config
    from scale.engine import build_engine, partitioned
    from scale.tasks import build_task

    ds = fill_ds_config(load_ds_config(ds_config), cfg, world_size=1, cuda=torch.cuda.is_available(),
                        peak_lr=1e-5, micro_batch=micro, grad_accum_steps=1)
    if ds_edit is not None:
        ds_edit(ds)
    task = build_task("classification", cfg, info, log=lambda msg: None)
    with partitioned(ds):
        module = task.build_model()
    engine = build_engine(module, task.param_groups(module), ds, info)
    return task, module, engine


def giant(args: argparse.Namespace) -> None:
    import torch

    from scale.dist import init_distributed
    from scale.memory import device_memory_budget, estimate_memory, max_micro_batch
    from scale.metrics import device_peak_flops

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29733")
    info = init_distributed()
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    model = DRY_RUN_MODEL if args.dry_run else ["model.name=swinv2_giant"]
    cfg = finetune_config(model, sizes, "fp32" if args.dry_run else "bf16")
    cuda = torch.cuda.is_available()
    budget = device_memory_budget(info.device)
    model_args = {"name": cfg.model.name, **cfg.model.build_args()}
    plans = []
    for img, window in sizes:
        shape = dict(img_size=img, window_size=window, zero_stage=3, world_size=1, checkpointing=True,
                     attn_backend="sequential", precision=cfg.train.precision,
                     pretrained_window_sizes=cfg.model.pretrained_window_sizes, task="classifier")
        micro = max(1, min(args.max_micro, max_micro_batch(model_args, budget_bytes=budget, **shape)))
        plans.append((micro, estimate_memory(model_args, micro_batch=micro, **shape)))
    task, module, engine = build_finetune(cfg, info, plans[0][0])
    for stage, (micro, plan) in zip(cfg.stages, plans):  # one engine, moved from stage to stage as the trainer does
        task.set_stage(stage, module)
        engine.set_batch(micro, 1)
        batch = {"image": torch.randn(micro, 3, stage.img_size, stage.img_size),
                 "label": torch.randint(0, 1000, (micro,))}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            engine.micro_step(task.inputs(batch, engine))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        timed = sorted(times[1:] or times)
        step_s = timed[len(timed) // 2]  # median, the first (warm-up) step left out
        flops = 3 * task.flops_per_image(module) * micro
        peak = device_peak_flops(info.device)
        measured = torch.cuda.max_memory_allocated() if cuda else None
        print(json.dumps({
            "case": f"{cfg.model.name}_{stage.img_size}_w{stage.window_size}",
            "device": torch.cuda.get_device_name() if cuda else "cpu", "micro_batch": micro,
            "step_s": round(step_s, 3), "images_per_s": round(micro / step_s, 3),
            "mfu_pct": round(100 * flops / step_s / peak, 2) if peak else None,
            "peak_memory_gb": round(measured / 1e9, 2) if measured else None,
            "plan_gb": round(plan.total_bytes / 1e9, 2),
            "plan_ratio": round(plan.total_bytes / measured, 3) if measured else None}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("schedule", help="demo schedule from pretrained vs random init (CPU)")
    s.add_argument("--ranks", type=int, default=2)
    s.add_argument("--out", default=None, help="folder for the runs (default: a temp folder)")
    g = sub.add_parser("giant", help="SwinV2-G fine-tune steps on one GPU")
    g.add_argument("--sizes", default="640:40,1536:32", help="img:window pairs")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--max-micro", type=int, default=64)
    g.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: check that the script starts")
    args = p.parse_args()
    schedule(args) if args.cmd == "schedule" else giant(args)


if __name__ == "__main__":
    main()
