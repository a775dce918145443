r"""Every GPU benchmark case in one command, in parts that fit a 10-minute call; appends a dated table to RESULTS.md.

    python benchmarks/run_gpu.py --list                      # the parts, their cases and estimated seconds
    python benchmarks/run_gpu.py --part 1 [--results PATH]   # one part (< 9 min on one H100, by estimate)
    python benchmarks/run_gpu.py --part all                  # every part in turn (a box with no time limit)
    python benchmarks/run_gpu.py --dry-run --part all --results /tmp/t.md   # CPU, tiny shapes: does it start?
    python benchmarks/run_gpu.py --from-jsonl a.jsonl b.jsonl --results RESULTS.md  # one table from several parts

On the lent device (the `device` tool: one H100, 10 minutes a call, no network). It has torch, timm,
tensorboard and pyyaml but not deepspeed or webdataset, so from the project root here, once:
    bash ../shared/device/wheels.sh          # writes .whl/ (ignored by git)
then run with carry [".whl"] and the command
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && \
        python3 benchmarks/run_gpu.py --part 1 --results $OUT/RESULTS_part1.md
(then --part 2, ... in later calls). What comes back from $OUT: RESULTS_partN.md (the table),
RESULTS_partN.jsonl (one JSON object per case, for --from-jsonl) and RESULTS_partN.log (every case's
output). Merge the tables into benchmarks/RESULTS.md; `--from-jsonl` recomputes the ratios between
cases that ran in different parts (e.g. our compiled trainer vs compiled timm). Parts are in priority
order; `--cases NAME ...` reruns single cases. A part stops starting cases when less than 30 s of its
`--budget-s` (default 540 s per part; 0 = none) is left, and the case running at the budget is
killed: both are recorded ("skipped", "timeout"), as are a crash ("error") and "oom".

Cases (each in its own process, so a crash or OOM is recorded and its peak memory is its own):
- model_*: our SwinV2 vs timm's (its SwinTransformerV2 class at our widths), classifier forward +
  backward, torch.autocast(bf16) over fp32 weights, no optimizer: T/B/L at 192/w12 and 256/w16.
- trainer_*: SimMIM pretraining at 192/w12 with the recipes in configs/pretrain/ (micro-batch,
  drop path, 47x47 target normalisation; SwinV2-G with activation checkpointing). `ours` = the real
  trainer engine (scale.engine: DeepSpeed, ZeRO-3 by default, bf16, one rank, torch's fused AdamW
  instead of DeepSpeed's JIT-built FusedAdam); `timm` = timm's encoder + the same decoder and loss in a
  plain AdamW loop with torch.autocast(bf16). Eager, and with torch.compile (ours: every block, through
  the config's `model.compile` where the checkout has it, else `compile_blocks()`/`block.compile()`;
  timm: torch.compile of the whole module). Ablations on SwinV2-B: attn_backend flex vs auto (SDPA),
  compile on/off, checkpointing on/off, ZeRO-1 vs ZeRO-3.
- highres_*: 1536/w32 at batch 1, SwinV2-T and SwinV2-G with activation checkpointing: our model vs
  timm's fwd+bwd (autocast, as above), and our fine-tune step (DeepSpeed ZeRO-3, bf16, the G recipe's
  attention path) against `scale.memory.estimate_memory` of the same configuration.
Numbers per case: step time (median over rounds after warm-up; `first_steps_s` holds the warm-up,
compilation included), images/s, MFU (analytic forward FLOPs x 3 / step time / bf16 peak, recomputation
not counted), peak torch.cuda.max_memory_allocated / max_memory_reserved, the estimate and its ratio to
both, ratios to the baseline cases, and the targets: MFU >= 50% (B/L) and >= 40% (G, checkpointing),
>= 1.3x the images/s of timm + autocast + torch.compile, SwinV2-G fine-tune at 1536 batch 1 within an
80 GB H100, estimate within 15% of the measured peak.

--dry-run runs every case's code on the CPU (tiny widths, 64-96 px, fp32, one step; torch.compile
with dynamo's "eager" backend, i.e. tracing only; flex skipped: torch has no flex_attention backward on
the CPU) with all cases of the run in one process, so that a lent GPU's minutes are not spent on
import errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import gc
import json
import logging
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULT_MARK = "@@RESULT "
GIB = 2 ** 30
H100_80GB_USABLE_GIB = 79.1  # torch.cuda.get_device_properties(...).total_memory of an H100 80GB HBM3, less the context
DS_EDITS = ['optimizer.params.torch_adam=true', 'optimizer.params.fused=true']  # no FusedAdam JIT build on the device
DRY_MODEL = {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4]}  # keeps a shifted block
SHORT = {"swinv2_tiny": "tiny", "swinv2_base": "base", "swinv2_large": "large", "swinv2_giant": "giant"}


@dataclass(frozen=True)
class Case:
    """One measurement. `est_s`: wall seconds on one H100 with process start (a guess until measured)."""
    name: str
    part: int
    kind: str  # model (bare fwd+bwd) | trainer (SimMIM training step) | finetune (DeepSpeed classifier step)
    impl: str  # ours | timm
    model: str
    img: int
    window: int
    batch: int
    ckpt: bool = False
    compile: bool = False
    backend: str = "auto"
    zero: int | None = None  # ZeRO stage of our DeepSpeed cases
    warmup: int = 3
    rounds: int = 3
    steps: int = 10
    est_s: int = 30
    baselines: tuple[str, ...] = ()  # cases whose images/s (and memory) this one is compared with
    targets: tuple[str, ...] = ()  # keys of TARGETS

    def describe(self) -> str:
        what = {"model": "fwd+bwd", "trainer": "SimMIM trainer" if self.impl == "ours" else "SimMIM plain loop",
                "finetune": "fine-tune step"}[self.kind]
        bits = [f"{self.impl} {what}", f"{SHORT.get(self.model, self.model)} {self.img}/w{self.window}",
                f"b{self.batch}"]
        if self.zero is not None:
            bits.append(f"ZeRO-{self.zero}")
        bits += ["ckpt"] * self.ckpt + ["compile"] * self.compile
        if self.backend != "auto":
            bits.append(self.backend)
        return ", ".join(bits)


# ------------------------------------------------------------------------------------------------ the cases
def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(**kw: Any) -> str:
        cases.append(Case(**kw))
        return kw["name"]

    # part 1: our model vs timm, eager, T/B/L at 192/w12 and 256/w16; SwinV2-T at 1536/w32
    for img, window, batches in ((192, 12, (128, 128, 64)), (256, 16, (64, 64, 32))):
        for model, batch in zip(("swinv2_tiny", "swinv2_base", "swinv2_large"), batches):
            stem = f"model_{SHORT[model]}_{img}w{window}"
            add(name=f"{stem}_timm", part=1, kind="model", impl="timm", model=model, img=img, window=window,
                batch=batch, est_s=20)
            add(name=f"{stem}_ours", part=1, kind="model", impl="ours", model=model, img=img, window=window,
                batch=batch, est_s=20, baselines=(f"{stem}_timm",))

    def highres(model: str, part: int, bare_s: int, ds_s: int, ds_backend: str, targets: tuple[str, ...]) -> None:
        stem = f"highres_{SHORT[model]}_1536w32"
        common = dict(part=part, model=model, img=1536, window=32, batch=1, ckpt=True, warmup=1, rounds=2, steps=1)
        add(name=f"{stem}_timm", kind="model", impl="timm", est_s=bare_s, **common)
        add(name=f"{stem}_ours", kind="model", impl="ours", est_s=bare_s, baselines=(f"{stem}_timm",), **common)
        add(name=f"{stem}_ours_deepspeed", kind="finetune", impl="ours", zero=3, backend=ds_backend, est_s=ds_s,
            targets=targets, **common)

    highres("swinv2_tiny", 1, 30, 40, "auto", ("estimate15",))

    def trainer(model: str, part: int, impl: str, compile: bool, est_s: int, *, backend: str = "auto",
                ckpt: bool | None = None, zero: int = 3, extra_baselines: tuple[str, ...] = ()) -> str:
        giant = model == "swinv2_giant"
        ckpt = giant if ckpt is None else ckpt
        name = f"trainer_{SHORT[model]}_{impl}_{'compile' if compile else 'eager'}"
        if impl == "ours":
            name += ("_flex" if backend == "flex" else "") + ("_ckpt" if ckpt and not giant else "") + \
                    ("_zero1" if zero == 1 else "")
        timm_same = f"trainer_{SHORT[model]}_timm_{'compile' if compile else 'eager'}"
        timm_compiled = f"trainer_{SHORT[model]}_timm_compile"
        main = impl == "ours" and backend == "auto" and ckpt == giant and zero == 3
        targets: tuple[str, ...] = ()
        if main:
            # the estimator models eager kernels: its target is checked on the eager cases
            targets = ("mfu40" if giant else "mfu50",) + (("x1.3",) if compile else ("estimate15",))
        baselines = () if impl == "timm" else tuple(dict.fromkeys((timm_same, timm_compiled, *extra_baselines)))
        return add(name=name, part=part, kind="trainer", impl=impl, model=model, img=192, window=12,
                   batch=32 if giant else 128, ckpt=ckpt, compile=compile, backend=backend,
                   zero=zero if impl == "ours" else None, warmup=3, rounds=3, steps=4 if giant else 10,
                   est_s=est_s, baselines=baselines, targets=targets)

    # part 2: trainer eager, SwinV2-B/L; SwinV2-G at 1536/w32
    for model in ("swinv2_base", "swinv2_large"):
        trainer(model, 2, "timm", False, 30)
        trainer(model, 2, "ours", False, 45)
    highres("swinv2_giant", 2, 60, 90, "sequential", ("fits80", "estimate15"))
    # part 3: trainer eager, SwinV2-G; SwinV2-B ablations (checkpointing, ZeRO-1, flex)
    trainer("swinv2_giant", 3, "timm", False, 90)
    trainer("swinv2_giant", 3, "ours", False, 120)
    base_eager = "trainer_base_ours_eager"
    trainer("swinv2_base", 3, "ours", False, 45, ckpt=True, extra_baselines=(base_eager,))
    trainer("swinv2_base", 3, "ours", False, 45, zero=1, extra_baselines=(base_eager,))
    trainer("swinv2_base", 3, "ours", False, 120, backend="flex", extra_baselines=(base_eager,))
    # parts 4-8: torch.compile (compilation dominates: minutes per case)
    trainer("swinv2_base", 4, "timm", True, 150)
    trainer("swinv2_base", 4, "ours", True, 150, extra_baselines=(base_eager,))
    trainer("swinv2_base", 4, "ours", True, 150, zero=1, extra_baselines=(base_eager,))
    trainer("swinv2_large", 5, "timm", True, 150)
    trainer("swinv2_large", 5, "ours", True, 150, extra_baselines=("trainer_large_ours_eager",))
    trainer("swinv2_base", 5, "ours", False, 120, backend="flex", ckpt=True, extra_baselines=(base_eager,))
    trainer("swinv2_giant", 6, "ours", True, 200, extra_baselines=("trainer_giant_ours_eager",))
    trainer("swinv2_base", 6, "ours", True, 150, ckpt=True, extra_baselines=(base_eager,))
    trainer("swinv2_giant", 7, "timm", True, 300)
    trainer("swinv2_base", 7, "ours", True, 180, backend="flex", extra_baselines=(base_eager,))
    trainer("swinv2_base", 8, "ours", True, 180, backend="flex", ckpt=True, extra_baselines=(base_eager,))
    return cases


CASES = _cases()
PARTS = sorted({c.part for c in CASES})

# key -> (label, check(result) -> (value shown, met or None when not measurable))
TARGETS: dict[str, tuple[str, Callable[[dict], tuple[Any, bool | None]]]] = {
    "mfu50": ("MFU >= 50%", lambda r: (r["mfu_pct"], None if r["mfu_pct"] is None else r["mfu_pct"] >= 50)),
    "mfu40": ("MFU >= 40%", lambda r: (r["mfu_pct"], None if r["mfu_pct"] is None else r["mfu_pct"] >= 40)),
    "x1.3": (">= 1.3x timm+autocast+compile images/s",
             lambda r: (_speedup_vs_compiled_timm(r), None if _speedup_vs_compiled_timm(r) is None
                        else _speedup_vs_compiled_timm(r) >= 1.3)),
    "fits80": ("fits an 80 GB H100", lambda r: (r["peak_reserved_gib"], None if r["peak_reserved_gib"] is None
                                                 else r["peak_reserved_gib"] <= H100_80GB_USABLE_GIB)),
    "estimate15": ("estimate within 15% of peak allocated",
                   lambda r: (r["estimate_over_alloc"], None if r["estimate_over_alloc"] is None
                              else abs(r["estimate_over_alloc"] - 1) <= 0.15)),
}

RESULT_KEYS = ("case", "part", "kind", "impl", "model", "img_size", "window_size", "batch", "precision", "ckpt",
               "compile", "attn_backend", "zero_stage", "setup", "status", "wall_s", "device", "step_s",
               "step_s_rounds", "first_steps_s", "images_per_s", "flops_per_image", "mfu_pct", "static_alloc_gib",
               "peak_alloc_gib", "peak_reserved_gib", "peak_rss_gib", "estimate_gib", "estimate_over_alloc",
               "estimate_over_reserved", "speedup_vs", "memory_vs", "targets", "note", "error")


def _speedup_vs_compiled_timm(r: dict) -> float | None:
    return next((v for k, v in (r.get("speedup_vs") or {}).items() if k.endswith("_timm_compile")), None)


# ------------------------------------------------------------------------------------------------ child side
class Context:
    """What a case runs with: device, precision, dry-run shrinking, the process group (made once)."""

    def __init__(self, dry_run: bool) -> None:
        import torch

        self.dry = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.precision = "bf16" if self.cuda else "fp32"
        self._info = None

    @property
    def info(self):
        """The one-rank process group of this process (NCCL on GPU, gloo on CPU)."""
        if self._info is None:
            from scale.dist import init_distributed

            self._info = init_distributed()
        return self._info

    def shape(self, case: Case) -> tuple[int, int, int, dict]:
        """(img, window, batch, build_model overrides) of `case`, tiny in a dry run."""
        if not self.dry:
            return case.img, case.window, case.batch, {}
        img, window = {192: (64, 4), 256: (64, 8), 1536: (96, 8)}[case.img]  # 96/w8 pads stage 2, as 1536/w32 does 4
        return img, window, 2, dict(DRY_MODEL)


def _sync(ctx: Context) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def measure(ctx: Context, case: Case, step: Callable[[], Any]) -> dict:
    """Warm-up, then `rounds` x `steps` timed steps; peak memory over all of them."""
    import torch

    warmup, rounds, steps = (1, 1, 1) if ctx.dry else (case.warmup, case.rounds, case.steps)
    out: dict[str, Any] = {}
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["static_alloc_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(ctx)
    out["first_steps_s"] = round(time.perf_counter() - start, 2)
    per_step = []
    for _ in range(rounds):
        _sync(ctx)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(ctx)
        per_step.append((time.perf_counter() - start) / steps)
    out["step_s"] = round(statistics.median(per_step), 5)
    out["step_s_rounds"] = [round(t, 5) for t in per_step]
    if ctx.cuda:
        out["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    else:  # the process's peak: in a dry run every case of the run shares the process, so only a smoke check
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
    return out


def _estimate(ctx: Context, model_args: dict, case: Case, img: int, window: int, batch: int, task: str,
              backend: str, measured: dict) -> dict:
    """scale.memory's plan for this step and its ratio to the measured peaks (None where it cannot say)."""
    from scale.memory import estimate_memory

    try:
        plan = estimate_memory(model_args, img_size=img, window_size=window, micro_batch=batch, zero_stage=case.zero,
                               world_size=1, checkpointing=case.ckpt, attn_backend=backend, precision=ctx.precision,
                               task=task, device_type=ctx.device.type)
    except (ValueError, KeyError, NotImplementedError) as e:
        return {"note": f"no estimate: {str(e).splitlines()[0]}"}
    est = plan.total_bytes / GIB
    out = {"estimate_gib": round(est, 3)}
    for key, src in (("estimate_over_alloc", "peak_alloc_gib"), ("estimate_over_reserved", "peak_reserved_gib")):
        if measured.get(src):
            out[key] = round(est / measured[src], 3)
    return out


def _mfu(ctx: Context, flops_per_image: int, batch: int, step_s: float) -> float | None:
    from scale.metrics import device_peak_flops

    peak = device_peak_flops(ctx.device)
    return round(100 * 3 * flops_per_image * batch / step_s / peak, 2) if peak else None


def run_model_case(ctx: Context, case: Case) -> dict:
    """Bare classifier fwd+bwd under autocast (bench_models.train_step), ours or timm's class, no optimizer."""
    import torch

    import bench_models
    import bench_pretrain
    import models

    img, window, batch, overrides = ctx.shape(case)
    torch.manual_seed(0)
    notes = []
    with torch.device(ctx.device):  # initialise on the GPU: SwinV2-G's 3B weights in seconds
        if case.impl == "ours":
            model = models.build_model(case.model, img_size=img, window_size=window, drop_path_rate=0.0,
                                       attn_backend=case.backend, **overrides)
        else:
            model = bench_pretrain.timm_encoder(case.model, img, window, num_classes=1000, **overrides)
    if case.ckpt:
        model.set_grad_checkpointing(True)
    if case.compile:
        if case.impl == "ours":
            notes.append(bench_pretrain.compile_encoder_blocks(model))
        else:
            model = torch.compile(model)
    images = torch.randn(batch, 3, img, img, device=ctx.device)
    out = measure(ctx, case, lambda: bench_models.train_step(model, images, ctx.device.type))
    flops = models.estimate_flops(models.build_model(case.model, img_size=img, window_size=window, device="meta",
                                                     **overrides))
    out.update(flops_per_image=flops, images_per_s=round(batch / out["step_s"], 2),
               mfu_pct=_mfu(ctx, flops, batch, out["step_s"]), note="; ".join(notes) or None)
    return out


def _trainer_config(ctx: Context, case: Case, img: int, window: int, batch: int, overrides: dict):
    """The case's pretraining recipe (configs/pretrain/<model>.yaml) with the case's switches."""
    from scale.config import ModelConfig, load_config

    words = [f"model.img_size={img}", f"model.window_size={window}", f"train.micro_batch_size={batch}",
             f"model.grad_checkpointing={str(case.ckpt).lower()}", f"model.attn_backend={case.backend}",
             f"train.precision={ctx.precision}", "data.num_workers=0"]
    words += [f"model.{k}={json.dumps(v)}" for k, v in overrides.items()]
    config_compiles = case.compile and "compile" in {f.name for f in dataclasses.fields(ModelConfig)}
    if config_compiles:
        words.append("model.compile=true")
    return load_config(REPO / "configs" / "pretrain" / f"{case.model}.yaml", words), config_compiles


def run_trainer_case(ctx: Context, case: Case) -> dict:
    """SimMIM at 192/w12: our trainer engine (DeepSpeed, one rank) or timm + the same head in a plain loop."""
    import torch

    import bench_pretrain
    from scale.ds_config import fill_ds_config, load_ds_config

    img, window, batch, overrides = ctx.shape(case)
    cfg, config_compiles = _trainer_config(ctx, case, img, window, batch, overrides)
    batch_data = bench_pretrain.make_batch(batch, img, ctx.device)
    torch.manual_seed(0)
    notes = []
    if case.impl == "ours":
        ds = fill_ds_config(load_ds_config(REPO / "ds_configs" / f"zero{case.zero}.json"), cfg, world_size=1,
                            cuda=ctx.cuda, peak_lr=1e-4)
        bench_pretrain.edit_ds_config(ds, DS_EDITS)
        engine, task, module = bench_pretrain.build_trainer(cfg, ds, ctx.info,
                                                            compile_blocks={} if case.compile and not config_compiles
                                                            else None)
        if case.compile:
            notes.append("compiled by the config's model.compile" if config_compiles else "blocks compiled here")
        skipped = []

        def step() -> None:
            if engine.micro_step(task.inputs(batch_data, engine)).loss is None:
                skipped.append(1)

        out = measure(ctx, case, step)
        if skipped or engine.overflow_skips:
            notes.append(f"{len(skipped)} non-finite and {engine.overflow_skips} overflow-skipped steps")
        flops = task.flops_per_image(module)
        out.update(_estimate(ctx, task.model_args(), case, img, window, batch, "simmim", case.backend, out))
    else:
        m = cfg.model
        with torch.device(ctx.device):
            model = bench_pretrain.build_timm(case.model, img, window, ctx.device,
                                              norm_target_patch_size=cfg.simmim.norm_target_patch_size,
                                              drop_path_rate=m.drop_path_rate, **overrides)
        loop = bench_pretrain.PlainLoop(model, ctx.device, ctx.precision == "bf16", case.ckpt, compile=case.compile)
        out = measure(ctx, case, lambda: loop.step(batch_data))
        from scale.memory import flops_per_image

        flops = flops_per_image({"name": case.model, **m.build_args()}, img_size=img, window_size=window,
                                task="simmim")
    out.update(flops_per_image=flops, images_per_s=round(batch / out["step_s"], 2),
               mfu_pct=_mfu(ctx, flops, batch, out["step_s"]))
    out["note"] = "; ".join(filter(None, [out.get("note"), *notes])) or None
    return out


def run_finetune_case(ctx: Context, case: Case) -> dict:
    """One rank of run_finetune.py's engine on the SwinV2-G recipe (or its widths changed), batch of 1."""
    import torch

    import bench_finetune
    import bench_pretrain

    img, window, batch, overrides = ctx.shape(case)
    model = [f"model.name={case.model}", f"model.attn_backend={case.backend}",
             f"model.grad_checkpointing={str(case.ckpt).lower()}"]
    model += [f"model.{k}={json.dumps(v)}" for k, v in overrides.items()]
    cfg = bench_finetune.finetune_config(model, [(img, window)], ctx.precision)
    task, module, engine = bench_finetune.build_finetune(
        cfg, ctx.info, batch, REPO / "ds_configs" / f"zero{case.zero}.json",
        ds_edit=lambda ds: bench_pretrain.edit_ds_config(ds, DS_EDITS))
    task.set_stage(cfg.stages[0], module)
    batch_data = {"image": torch.randn(batch, 3, img, img), "label": torch.randint(0, 1000, (batch,))}
    out = measure(ctx, case, lambda: engine.micro_step(task.inputs(batch_data, engine)))
    flops = task.flops_per_image(module)
    out.update(flops_per_image=flops, images_per_s=round(batch / out["step_s"], 3),
               mfu_pct=_mfu(ctx, flops, batch, out["step_s"]))
    out.update(_estimate(ctx, {"name": cfg.model.name, **cfg.model.build_args()}, case, img, window, batch,
                         "classifier", case.backend, out))
    return out


def check_flex_accepted(ctx: Context, case: Case) -> None:
    """What a CPU can check of a flex case: the config takes the backend and the model builds with it."""
    import models

    img, window, batch, overrides = ctx.shape(case)
    if case.kind == "trainer":
        _trainer_config(ctx, case, img, window, batch, overrides)
    models.build_model(case.model, img_size=img, window_size=window, attn_backend=case.backend, device="meta",
                       **overrides)


RUNNERS = {"model": run_model_case, "trainer": run_trainer_case, "finetune": run_finetune_case}


class DynamoWatch(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings: past the limit a frame silently runs eagerly."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.limit_hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage():
            self.limit_hits += 1

    def notes(self) -> list[str]:
        """What a compiled case should report: graph breaks and recompile-limit hits since the last reset."""
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        out = [f"dynamo: {breaks} graph breaks ({len(counters['graph_break'])} kinds)"] if breaks else []
        if self.limit_hits:
            out.append(f"dynamo hit its recompile limit {self.limit_hits}x: those frames run eagerly")
        return out


def run_case(ctx: Context, case: Case, watch: DynamoWatch) -> dict:
    """Run one case in this process; a failure becomes the result's status, never an exception."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a dry run shares the process: no recompile limits carried from one case to the next
    counters.clear()
    watch.limit_hits = 0
    try:
        if case.backend == "flex" and not ctx.cuda:
            check_flex_accepted(ctx, case)
            return {"status": "skipped", "note": "flex accepted by config and model, not run: torch has no "
                                                 "flex_attention backward on the CPU"}
        result = {"status": "ok", **RUNNERS[case.kind](ctx, case)}
        result["note"] = "; ".join(filter(None, [result.get("note"), *watch.notes()])) or None
        return result
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "error": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - recorded, the next case runs
        traceback.print_exc()
        return {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def child_main(names: list[str], dry_run: bool) -> None:
    """Run the named cases in this process; one RESULT_MARK line per case on stdout."""
    sys.path[:0] = [str(REPO), str(BENCH)]
    if dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    if dry_run:  # every torch.compile (ours, timm's, the config's) traces with dynamo but generates no code
        compile_ = torch.compile

        def compile_eager(*args: Any, **kwargs: Any) -> Any:
            kwargs["backend"] = "eager"
            return compile_(*args, **kwargs)

        torch.compile = compile_eager
    ctx = Context(dry_run)
    watch = DynamoWatch()
    logging.getLogger("torch._dynamo").addHandler(watch)
    device = f"cpu (dry run), {platform.processor() or platform.machine()}" if not ctx.cuda else \
        torch.cuda.get_device_name()
    by_name = {c.name: c for c in CASES}
    for name in names:
        start = time.perf_counter()
        result = run_case(ctx, by_name[name], watch)
        result.update(case=name, device=device, precision=ctx.precision,
                      child_wall_s=round(time.perf_counter() - start, 1))
        print(RESULT_MARK + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent side
def _child_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's ninja first
    env.setdefault("PYTHONUNBUFFERED", "1")
    if dry_run:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = "1"  # tiny shapes: a second thread only waits, and on a busy host spins (~100x slower)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # each child is its own job
        env.pop(key, None)
    return env


def run_children(groups: list[list[Case]], args: argparse.Namespace, log, emit: Callable[[dict], None]) -> None:
    """One process per group of cases, while the budget lasts; emit(result) for every case, in order."""
    start = time.perf_counter()
    for group in groups:
        remaining = args.budget_s - (time.perf_counter() - start) if args.budget_s else None
        if remaining is not None and remaining < 30:
            for case in group:
                emit(_base_result(case, status="skipped", note=f"part budget of {args.budget_s} s spent"))
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", *(["--dry-run"] if args.dry_run else []),
               *[c.name for c in group]]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(args.dry_run), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers: its own process group
            output, _ = proc.communicate()
        wall = round(time.perf_counter() - t0, 1)
        cut = max(0, len(output) - 400_000)  # keep the log file small enough to come back from the device
        kept = f"[... {cut} characters cut]\n{output[cut:]}" if cut else output
        log.write(f"\n===== {' '.join(c.name for c in group)} (exit {proc.returncode}, {wall} s)\n{kept}")
        log.flush()
        found = {}
        for line in output.splitlines():
            if line.startswith(RESULT_MARK):
                r = json.loads(line[len(RESULT_MARK):])
                found[r["case"]] = r
        tail = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith(RESULT_MARK)][-1:]
        for case in group:
            if case.name in found:
                r = found[case.name]
                result = _base_result(case, **{k: v for k, v in r.items() if k in RESULT_KEYS and k != "case"})
                result["wall_s"] = wall if len(group) == 1 else r.get("child_wall_s")
            elif timed_out:
                result = _base_result(case, status="timeout", wall_s=wall,
                                      error=f"killed at the part budget ({args.budget_s} s)")
            else:
                result = _base_result(case, status="error", wall_s=wall,
                                      error=f"process exited {proc.returncode}: {tail[0][:300] if tail else ''}")
            emit(result)


def _base_result(case: Case, **values: Any) -> dict:
    r = dict.fromkeys(RESULT_KEYS)
    r.update(case=case.name, part=case.part, kind=case.kind, impl=case.impl, model=case.model, img_size=case.img,
             window_size=case.window, batch=case.batch, ckpt=case.ckpt, compile=case.compile,
             attn_backend=case.backend, zero_stage=case.zero, setup=case.describe())
    r.update(values)
    return r


def compare(results: list[dict]) -> None:
    """Fill speedup_vs / memory_vs (against each baseline that ran) and the targets, in place."""
    by_name = {r["case"]: r for r in results}
    cases = {c.name: c for c in CASES}
    for r in results:
        case = cases.get(r["case"])
        if case is None or r["status"] != "ok":
            r["targets"] = [{"target": TARGETS[t][0], "value": None, "met": None}
                            for t in (case.targets if case else ())]
            continue
        r["speedup_vs"], r["memory_vs"] = {}, {}
        for b in case.baselines:
            base = by_name.get(b)
            if base and base["status"] == "ok" and base.get("images_per_s"):
                r["speedup_vs"][b] = round(r["images_per_s"] / base["images_per_s"], 3)
                mem, base_mem = r.get("peak_alloc_gib"), base.get("peak_alloc_gib")
                if mem and base_mem:
                    r["memory_vs"][b] = round(mem / base_mem, 3)
        r["targets"] = []
        for t in case.targets:
            label, check = TARGETS[t]
            value, met = check(r)
            r["targets"].append({"target": label, "value": value, "met": met})


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(results: list[dict], title: str, meta: str) -> str:
    """The markdown appended to the results file."""
    lines = [f"### {title}", "", meta, "",
             "| case | setup | status | step s | images/s | MFU % | peak alloc / reserved GiB | estimate GiB "
             "(/alloc) | vs baselines (images/s; memory) | targets | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem = r["peak_alloc_gib"]
        mem = f"{_fmt(mem)} / {_fmt(r['peak_reserved_gib'])}" if mem is not None else \
            (f"RSS {_fmt(r['peak_rss_gib'])}" if r["peak_rss_gib"] is not None else "")
        est = _fmt(r["estimate_gib"]) + (f" ({r['estimate_over_alloc']:.3f})" if r["estimate_over_alloc"] else "")
        vs = "; ".join(f"{k}: {v}x" + (f", mem {r['memory_vs'][k]}x" if (r.get("memory_vs") or {}).get(k) else "")
                       for k, v in (r["speedup_vs"] or {}).items())
        targets = "; ".join(" ".join(filter(None, [f"{t['target']}:", _fmt(t["value"], 3),
                                                    "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"]))
                            for t in r["targets"] or [])
        note = "; ".join(filter(None, [r.get("note"), r.get("error"),
                                       f"first steps {r['first_steps_s']} s" if r.get("first_steps_s") else None]))
        lines.append("| " + " | ".join([
            r["case"], r["setup"] or "", r["status"], _fmt(r["step_s"], 4), _fmt(r["images_per_s"], 1),
            _fmt(r["mfu_pct"], 1), mem, est, vs, targets, note.replace("|", "/")]) + " |")
    return "\n".join(lines) + "\n"


def _meta(dry_run: bool, command: str, devices: set[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = [f"torch {torch.__version__}"]
    for package in ("timm", "deepspeed"):  # not imported: deepspeed prints to stdout on import
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} missing")
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    what = "DRY RUN on the CPU (tiny shapes, fp32, one step: numbers say nothing)" if dry_run else "bf16"
    return (f"Device: {', '.join(sorted(devices)) or 'none'}; {', '.join(versions)}{cuda}; {what}. "
            f"Command: `{command}`.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        dry = "--dry-run" in argv
        child_main([a for a in argv[1:] if a != "--dry-run"], dry)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="1", help=f"one of {PARTS} or 'all'")
    p.add_argument("--cases", nargs="+", default=None, help="only these cases (names or globs), from any part")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, every case in one process")
    p.add_argument("--results", default=str(BENCH / "RESULTS.md"),
                   help="markdown file the table is appended to; a .jsonl and a .log are written beside it "
                        "(in a temp folder when this is the default benchmarks/RESULTS.md)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds per part after which no case starts and the running one is killed "
                        "(default 540 for one part, none for --part all; 0 = none)")
    p.add_argument("--isolate", choices=["case", "part", "run"], default=None,
                   help="one process per case (default), per part, or for the whole run (default with --dry-run)")
    p.add_argument("--from-jsonl", nargs="+", default=None, help="write one table from these saved results")
    p.add_argument("--list", action="store_true", help="print the parts and cases and exit")
    args = p.parse_args(argv)

    if args.list:
        for part in PARTS:
            cases = [c for c in CASES if c.part == part]
            print(f"part {part} (~{sum(c.est_s for c in cases)} s on one H100, estimated):")
            for c in cases:
                print(f"  {c.name:42s} {c.est_s:4d} s  {c.describe()}")
        return 0
    results_path = Path(args.results)
    side = results_path if results_path.resolve() != (BENCH / "RESULTS.md").resolve() else \
        Path(tempfile.mkdtemp(prefix="run_gpu_")) / "RESULTS.md"
    command = "python benchmarks/run_gpu.py " + " ".join(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    if args.from_jsonl:
        results = [json.loads(line) for path in args.from_jsonl for line in Path(path).read_text().splitlines()
                   if line.strip()]
        compare(results)
        dry = any("dry run" in (r.get("device") or "") for r in results)
        text = table(results, f"GPU benchmarks (`benchmarks/run_gpu.py`), {date}, combined from "
                              f"{', '.join(Path(p).name for p in args.from_jsonl)}",
                     _meta(dry, command, {r["device"] for r in results if r.get("device")}))
        with results_path.open("a") as f:
            f.write("\n" + text)
        print(text)
        return 0

    if args.part != "all" and (not args.part.isdigit() or int(args.part) not in PARTS):
        p.error(f"--part must be one of {PARTS} or 'all', got {args.part!r}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no GPU here: these cases are sized for one H100; --dry-run checks them on the CPU")
    selected = [c for c in CASES if args.part == "all" or c.part == int(args.part)]
    if args.cases:
        selected = [c for c in CASES if any(fnmatch.fnmatch(c.name, pat) for pat in args.cases)]
        if not selected:
            p.error(f"no case matches {args.cases}; see --list")
    isolate = args.isolate or ("run" if args.dry_run else "case")
    budget = args.budget_s if args.budget_s is not None else (0 if args.part == "all" or args.dry_run else 540)
    parts = sorted({c.part for c in selected})
    if isolate == "run":
        runs = [[selected]]
    else:
        runs = [[[c] for c in selected if c.part == part] if isolate == "case" else
                [[c for c in selected if c.part == part]] for part in parts]

    results: list[dict] = []
    jsonl = side.with_suffix(".jsonl")
    with side.with_suffix(".log").open("a") as log, jsonl.open("a") as saved:
        def emit(result: dict) -> None:  # saved as soon as it is known: a call cut short keeps what ran
            results.append(result)
            saved.write(json.dumps(result) + "\n")
            saved.flush()
            print(f"[run_gpu] {result['case']}: {result['status']}, {result['wall_s']} s, "
                  f"{result.get('images_per_s')} images/s, {result.get('error') or ''}", file=sys.stderr, flush=True)

        for groups in runs:  # each part gets its own budget
            run_children(groups, argparse.Namespace(budget_s=budget, dry_run=args.dry_run), log, emit)
    compare(results)
    for result in results:  # one JSON object per case, with the ratios and targets
        print(json.dumps(result), flush=True)
    title = (f"GPU benchmarks (`benchmarks/run_gpu.py`), {date}, part{'s' if len(parts) > 1 else ''} "
             f"{', '.join(map(str, parts))}")
    text = table(results, title, _meta(args.dry_run, command, {r["device"] for r in results if r.get("device")}))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with results_path.open("a") as f:
        f.write("\n" + text)
    print(f"table appended to {results_path}; JSON lines in {jsonl}; logs in {jsonl.with_suffix('.log')}",
          file=sys.stderr)
    statuses = [r["status"] for r in results]
    print(json.dumps({"summary": {s: statuses.count(s) for s in dict.fromkeys(statuses)}}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
