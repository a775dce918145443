"""Step time of our DeepSpeed trainer against plain PyTorch loops on the same batch. Prints JSON lines.

CPU (what the issue's overhead target is about; 1 rank, fp32, ZeRO-3, torch AdamW):
    python benchmarks/bench_pretrain.py
GPU (bf16; base/large at 192x192, giant with activation checkpointing; MFU from analytic FLOPs):
    python benchmarks/bench_pretrain.py --models swinv2_base swinv2_large swinv2_giant --img-size 192 --batch 64

Cases, timed in interleaved rounds so a busy machine slows all of them alike:
- `ours_deepspeed_zero3`: `scale.engine.PretrainEngine.micro_step` (forward, cross-rank finite check,
  backward, DeepSpeed step with clipping) on our SimMIM SwinV2.
- `ours_plain_torch`: the same model in a plain loop (AdamW, clip_grad_norm_), no DeepSpeed:
  the difference to the first case is the trainer's overhead.
- `timm_plain_torch`: timm's SwinV2 encoder with the same SimMIM decoder and masked L1 loss (no mask
  token: timm has none) in a plain loop, with torch.autocast(bf16) on GPU.
One JSON object per case, then a summary with the ratios.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.simmim import normalize_targets  # noqa: E402
from scale.config import load_config  # noqa: E402
from scale.ds_config import fill_ds_config, load_ds_config  # noqa: E402
from scale.metrics import device_peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class TimmSimMIM(nn.Module):
    """timm SwinV2 encoder + SimMIM's 1x1-conv/PixelShuffle decoder and masked L1 loss (ours, computed in fp32)."""

    def __init__(self, encoder: nn.Module, stride: int = 32, norm_target_patch_size: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.norm_target_patch_size = norm_target_patch_size
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, stride ** 2 * 3, 1), nn.PixelShuffle(stride))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)  # B, h, w, C
        prediction = self.decoder(tokens.permute(0, 3, 1, 2)).float()
        targets = images.float()
        if self.norm_target_patch_size is not None:  # the SwinV2 recipe's 47x47 target normalisation, as ours
            targets = normalize_targets(targets, self.norm_target_patch_size)
        pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
        loss = F.l1_loss(targets, prediction, reduction="none")
        return (loss * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3


def model_args(name: str, img_size: int, window: int) -> dict:
    return {"img_size": img_size, "window_size": window, "drop_path_rate": 0.0}


def timm_encoder(name: str, img_size: int, window: int, num_classes: int = 0, **overrides) -> nn.Module:
    """timm's SwinTransformerV2 class with the widths of our `name` (+ overrides, e.g. a tiny dry-run shape).

    Built on the current default device (wrap in `with torch.device("cuda"):` to initialise on the GPU).
    timm registers no giant; its class builds one from the widths, without the paper's main-branch
    LayerNorm every 6 blocks (SwinV2-H/G), which costs next to nothing.
    """
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    drop_path_rate = overrides.pop("drop_path_rate", 0.0)
    ours = models.build_model(name, num_classes=0, device="meta", **overrides)
    return SwinTransformerV2(img_size=img_size, window_size=window, embed_dim=ours.embed_dim, depths=ours.depths,
                             num_heads=ours.num_heads, num_classes=num_classes, drop_path_rate=drop_path_rate)


def build_timm(name: str, img_size: int, window: int, device: torch.device, norm_target_patch_size: int | None = None,
               **overrides) -> nn.Module:
    return TimmSimMIM(timm_encoder(name, img_size, window, **overrides),
                      norm_target_patch_size=norm_target_patch_size).to(device)


class PlainLoop:
    """forward, backward, clip, AdamW step, zero_grad: the nanoGPT loop; `compile` wraps the forward in torch.compile"""

    def __init__(self, model: nn.Module, device: torch.device, bf16: bool, grad_ckpt: bool,
                 compile: bool = False) -> None:
        self.model = model.to(device).train()
        if grad_ckpt:
            (model.encoder if hasattr(model, "encoder") else model).set_grad_checkpointing(True)
        self.forward = torch.compile(model) if compile else model  # the parameters stay `model`'s
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
        self.device, self.bf16 = device, bf16

    def step(self, batch: dict) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(batch["image"], batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()  # same host sync as the trainer's loss logging


def trainer_overrides(name: str, img_size: int, window: int, batch: int, grad_ckpt: bool) -> list[str]:
    """Dotted overrides that turn the demo config into this benchmark's SimMIM shape (no target normalisation)."""
    return [f"model.name={name}", f"model.img_size={img_size}", f"model.window_size={window}",
            "model.embed_dim=null", "model.depths=null", "model.num_heads=null", "model.drop_path_rate=0.0",
            "model.norm_target_patch_size=null", f"model.grad_checkpointing={str(grad_ckpt).lower()}",
            f"train.micro_batch_size={batch}", "data.mask_patch_size=32"]


def build_trainer(cfg, ds: dict, info, compile_blocks: dict | None = None):
    """The trainer's own build order (run_pretrain.py): task -> module inside `partitioned` -> param groups -> engine.

    compile_blocks: if not None, torch.compile each encoder block with these kwargs before the engine
    wraps the module (for checkouts whose config has no `model.compile` switch). Returns (engine, task, module).
    """
    from scale.engine import build_engine, partitioned
    from scale.tasks import build_task

    task = build_task(cfg.method.name, cfg, info, log=lambda msg: None)
    with partitioned(ds):  # ZeRO-3: each parameter partitioned as it is created
        module = task.build_model()
    if compile_blocks is not None:
        compile_encoder_blocks(module, **compile_blocks)
    return build_engine(module, task.param_groups(module), ds, info), task, module


def compile_encoder_blocks(model: nn.Module, **compile_kwargs) -> str:
    """torch.compile every block of our SwinV2 (or SimMIM/classifier around one) in place; says how."""
    encoder = model
    while not hasattr(encoder, "layers") and hasattr(encoder, "encoder"):
        encoder = encoder.encoder
    if hasattr(encoder, "compile_blocks"):
        encoder.compile_blocks(**compile_kwargs)
        return "compile_blocks()"
    for stage in encoder.layers:
        for block in stage.blocks:
            block.compile(**compile_kwargs)
    return "block.compile() on every block"


def edit_ds_config(ds: dict, items: list[str]) -> dict:
    """Apply dotted `key=JSON value` edits (e.g. zero_optimization.overlap_comm=false) to a ds_config in place."""
    for item in items:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = ds
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(value)
    return ds


class OursDeepSpeed:
    """One rank of the real trainer engine (ZeRO-3 config from ds_configs/zero3.json)."""

    def __init__(self, name: str, img_size: int, window: int, batch: int, grad_ckpt: bool, info,
                 ds_set: list[str]) -> None:
        cfg = load_config(None, trainer_overrides(name, img_size, window, batch, grad_ckpt))
        ds = fill_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json"), cfg, world_size=1,
                            cuda=info.device.type == "cuda", peak_lr=1e-4)
        self.engine, self.task, self.model = build_trainer(cfg, edit_ds_config(ds, ds_set), info)

    def step(self, batch: dict) -> float:
        return self.engine.micro_step(self.task.inputs(batch, self.engine)).loss


def make_batch(batch: int, img_size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    cells = img_size // 32
    mask = (torch.rand(batch, cells, cells, generator=g) < 0.6).to(torch.uint8)
    return {"image": torch.randn(batch, 3, img_size, img_size, generator=g).to(device),
            "mask": mask.repeat_interleave(8, 1).repeat_interleave(8, 2).to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, args, info) -> list[dict]:
    device = info.device
    bf16 = device.type == "cuda"
    grad_ckpt = name == "swinv2_giant"
    batch = make_batch(args.batch, args.img_size, device)
    torch.manual_seed(0)
    cases = {"ours_deepspeed_zero3": OursDeepSpeed(name, args.img_size, args.window, args.batch, grad_ckpt, info,
                                                     args.ds_set)}
    ours_plain = models.build_simmim(name, **model_args(name, args.img_size, args.window))
    cases["ours_plain_torch"] = PlainLoop(ours_plain, device, bf16, grad_ckpt)
    cases["timm_plain_torch"] = PlainLoop(build_timm(name, args.img_size, args.window, device), device, bf16,
                                          grad_ckpt)
    cases = {k: v for k, v in cases.items() if k in args.cases}
    flops = models.estimate_flops(ours_plain, args.img_size)
    peak = device_peak_flops(device)
    times = {k: [] for k in cases}
    memory = {}
    failed = {}
    for key, case in cases.items():  # warm-up: allocator, autotuning, first-step optimizer state
        try:
            for _ in range(args.warmup):
                case.step(batch)
            sync(device)
        except torch.OutOfMemoryError:
            failed[key] = "out of memory"
            torch.cuda.empty_cache()
    for _ in range(args.rounds):
        for key, case in cases.items():
            if key in failed:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                case.step(batch)
            sync(device)
            times[key].append((time.perf_counter() - t0) / args.steps)
            if device.type == "cuda":
                memory[key] = torch.cuda.max_memory_allocated(device) / 2**30
    for key, why in failed.items():
        print(json.dumps({"case": key, "model": name, "error": why}), flush=True)
        del times[key]
    results = []
    for key, ts in times.items():
        step_s = statistics.median(ts)
        r = {"case": key, "model": name, "device": torch.cuda.get_device_name(device) if bf16 else "cpu",
             "precision": "bf16" if bf16 else "fp32", "img_size": args.img_size, "batch": args.batch,
             "step_s_median": round(step_s, 4), "step_s_rounds": [round(t, 4) for t in ts],
             "images_per_s": round(args.batch / step_s, 2), "threads": torch.get_num_threads()}
        if peak:
            r["mfu_pct"] = round(100 * 3 * flops * args.batch / step_s / peak, 2)
        if key in memory:
            r["peak_mem_gib"] = round(memory[key], 2)
        results.append(r)
        print(json.dumps(r), flush=True)
    by = {r["case"]: r["step_s_median"] for r in results}
    if len(by) < 3:
        return results
    summary = {"case": "summary", "model": name,
               "overhead_vs_timm": round(by["ours_deepspeed_zero3"] / by["timm_plain_torch"], 3),
               "overhead_vs_plain_ours": round(by["ours_deepspeed_zero3"] / by["ours_plain_torch"], 3),
               "ours_vs_timm_images_per_s": round(by["timm_plain_torch"] / by["ours_deepspeed_zero3"], 3),
               "target_overhead_vs_timm": 1.15, "peak_rss_gib": round(
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    print(json.dumps(summary), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["swinv2_tiny"])
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--batch", type=int, default=32,
                   help="per step; the trainer's overhead is per parameter, so tiny batches inflate the ratio")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ds-set", nargs="*", default=[], help="ds_config edits, dotted key=JSON value")
    p.add_argument("--cases", nargs="+", default=["ours_deepspeed_zero3", "ours_plain_torch", "timm_plain_torch"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from scale.dist import init_distributed

    if len(args.models) > 1:  # one process per model: DeepSpeed engines and the allocator start clean
        for name in args.models:
            argv = [a for a in sys.argv[1:]]
            i = argv.index("--models")
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            subprocess.run([sys.executable, __file__, *argv[:i], "--models", name, *argv[j:]], check=False)
        return
    info = init_distributed()  # one rank: a real (gloo/NCCL) process group of size 1
    bench_model(args.models[0], args, info)


if __name__ == "__main__":
    main()
