"""Our SwinV2 against timm's, side by side: training-step time and high-resolution memory.

Prints one JSON object per case.

    python benchmarks/bench_models.py step              # fwd+bwd step time, alternating in one process
    python benchmarks/bench_models.py highres           # SwinV2-T 1536x1536 window 32, batch 1, checkpointing
    python benchmarks/bench_models.py giant --device cuda   # SwinV2-G 1536x1536 batch 1 peak memory (GPU)

On CPU everything runs in fp32; with --device cuda in bf16 (torch.autocast for both models).
Each high-resolution run is a fresh subprocess so that its peak RSS is its own; both
implementations run under the host allocator policy the trainer uses
(scale.host_memory.return_freed_host_memory).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import build_model, load_pretrained  # noqa: E402
from scale.host_memory import return_freed_host_memory  # noqa: E402

STEP_CASES = [
    dict(name="swinv2_tiny", img_size=256, window_size=8, batch=8),
    dict(name="swinv2_tiny", img_size=192, window_size=12, batch=8),
    dict(name="swinv2_base", img_size=256, window_size=16, batch=4),
    dict(name="swinv2_tiny", img_size=384, window_size=24, batch=2),  # the 384 fine-tuning window
]


def timm_model(name: str, img_size: int, window_size: int, **kwargs) -> torch.nn.Module:
    import timm
    # timm's registered sizes share our hyper-parameters; its window8_256 names fix img/window, so pass them
    return timm.create_model(f"{name}_window8_256", img_size=img_size, window_size=window_size, **kwargs)


def twin_models(name: str, img_size: int, window_size: int, device: str):
    """timm's SwinV2 and ours with identical weights."""
    reference = timm_model(name, img_size, window_size, drop_path_rate=0.0).to(device)
    ours = build_model(name, img_size=img_size, window_size=window_size, drop_path_rate=0.0).to(device)
    report = load_pretrained(ours, {k: v.cpu() for k, v in reference.state_dict().items()})
    assert not report.missing_keys and not report.unexpected_keys, report
    return reference, ours


def train_step(model: torch.nn.Module, images: torch.Tensor, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(images).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_step(device: str, repeats: int) -> None:
    for case in STEP_CASES:
        torch.manual_seed(0)
        reference, ours = twin_models(case["name"], case["img_size"], case["window_size"], device)
        images = torch.randn(case["batch"], 3, case["img_size"], case["img_size"], device=device)
        times = {"timm": [], "ours": []}
        for model in (reference, ours):  # warm-up
            train_step(model, images, device)
        for _ in range(repeats):  # alternate so that machine noise hits both alike
            times["timm"].append(train_step(reference, images, device))
            times["ours"].append(train_step(ours, images, device))
        timm_s, ours_s = statistics.median(times["timm"]), statistics.median(times["ours"])
        print(json.dumps({"case": "step", "device": device, **case, "dtype": "bf16" if device == "cuda" else "fp32",
                          "timm_s": round(timm_s, 4), "ours_s": round(ours_s, 4),
                          "ratio_ours_over_timm": round(ours_s / timm_s, 3), "repeats": repeats}), flush=True)
        del reference, ours


def highres_child(impl: str, name: str, img_size: int, window_size: int, device: str) -> dict:
    """One fwd+bwd at high resolution with checkpointing; runs in its own process."""
    # the trainer sets this allocator policy on the CPU; both implementations get it
    return_freed_host_memory()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    if impl == "timm":
        model = timm_model(name, img_size, window_size, drop_path_rate=0.0)
    else:
        model = build_model(name, img_size=img_size, window_size=window_size, drop_path_rate=0.0)
    model = model.to(device)
    model.set_grad_checkpointing(True)
    images = torch.randn(1, 3, img_size, img_size, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = train_step(model, images, device)
    result = {"impl": impl, "seconds": round(seconds, 2),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
              "rss_before_model_gb": round(baseline_kb / 2 ** 20, 3)}
    if device == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return result


def bench_highres(name: str, img_size: int, window_size: int, device: str, impls: list[str]) -> None:
    for impl in impls:
        cmd = [sys.executable, __file__, "_child", "--impl", impl, "--model", name, "--img-size", str(img_size),
               "--window-size", str(window_size), "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            failure = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            result = {"impl": impl, "error": failure}
        else:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({"case": "highres", "device": device, "model": name, "img_size": img_size,
                          "window_size": window_size, "batch": 1, "grad_checkpointing": True, **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["step", "highres", "giant", "_child"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (step case)")
    parser.add_argument("--impls", default="ours,timm", help="comma list of ours,timm (highres/giant)")
    parser.add_argument("--impl", default="ours")
    parser.add_argument("--model", default="swinv2_tiny")
    parser.add_argument("--img-size", type=int, default=1536)
    parser.add_argument("--window-size", type=int, default=32)
    args = parser.parse_args()
    if args.case == "_child":
        print(json.dumps(highres_child(args.impl, args.model, args.img_size, args.window_size, args.device)))
    elif args.case == "step":
        bench_step(args.device, args.repeats)
    elif args.case == "highres":
        bench_highres(args.model, args.img_size, args.window_size, args.device, args.impls.split(","))
    else:
        bench_highres("swinv2_giant", args.img_size, args.window_size, args.device, ["ours"])


if __name__ == "__main__":
    main()
