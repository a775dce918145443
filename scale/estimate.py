"""Will this SwinV2 setting fit? Per-device memory, the largest micro-batch and FLOPs, as one JSON object.

    python -m scale.estimate --model swinv2_giant --img-size 1536 --window 32 --micro-batch 1 \
        --zero 1 --gpus 8 --checkpointing --attn sequential --precision bf16 --gpu-mem 40GB

Prints params_bytes, grads_bytes, optimizer_bytes, activations_bytes, buffers_bytes, runtime_bytes,
total_bytes (per device), budget_bytes, fits, max_micro_batch and flops_per_image. The arithmetic is
`scale.memory.estimate_memory`, the same plan run_finetune.py makes before each stage; nothing is
allocated, so it answers for a 3B model at 1536x1536 in seconds on a laptop.
"""
import argparse
import json
import re
import sys

from models import list_models
from models.attention import ATTN_BACKENDS
from scale.launch import exit_process
from scale.memory import estimate_memory, flops_per_image, max_micro_batch

# What a GPU loses to the CUDA context, NCCL's buffers and allocator fragmentation: the trainer plans
# with the same share (scale.memory.device_memory_budget).
HEADROOM = 0.9
UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class EstimateError(ValueError):
    """A bad argument, said in one line with the fix."""


def parse_bytes(text: str) -> int:
    """'80GB', '40GiB', '40536MiB', '85899345920' -> bytes. GB and GiB both mean 2^30, as GPU memory is quoted."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise EstimateError(f"--gpu-mem {text!r} is not a memory size: write e.g. 80GB, 40GiB or 40536MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scale.estimate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="swinv2_giant", help=f"one of {', '.join(list_models())}")
    parser.add_argument("--img-size", type=int, default=1536, help="square input size in pixels")
    parser.add_argument("--window", type=int, default=32, help="attention window of every stage")
    parser.add_argument("--micro-batch", type=int, default=1, help="images per device per forward")
    parser.add_argument("--zero", type=int, default=3, help="ZeRO stage: 0, 1, 2 or 3")
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel devices sharing ZeRO's partitions")
    parser.add_argument("--offload", default="none", help="optimizer states (and ZeRO-3 weights) to: none, cpu, nvme")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    parser.add_argument("--attn", default="auto", help=f"attention backend: {', '.join(ATTN_BACKENDS)} "
                                                       f"(sequential = the paper's sequential self-attention)")
    parser.add_argument("--precision", default="bf16", help="bf16 or fp32")
    parser.add_argument("--task", default="classifier", help="classifier (fine-tuning) or simmim (pretraining)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier head size")
    parser.add_argument("--gpu-mem", default="80GB", help="memory of one device")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a CPU run (host RSS)")
    return parser


def check(args: argparse.Namespace) -> None:
    """Every argument in range, before any arithmetic."""
    choices = {"--model": (args.model, list_models()), "--zero": (args.zero, (0, 1, 2, 3)),
               "--offload": (args.offload, ("none", "cpu", "nvme")), "--attn": (args.attn, ATTN_BACKENDS),
               "--precision": (args.precision, ("bf16", "fp32")), "--task": (args.task, ("classifier", "simmim")),
               "--device": (args.device, ("cuda", "cpu"))}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise EstimateError(f"{flag} {value} is not one of {', '.join(map(str, allowed))}")
    for flag, value in (("--img-size", args.img_size), ("--window", args.window), ("--micro-batch", args.micro_batch),
                        ("--gpus", args.gpus), ("--num-classes", args.num_classes)):
        if value < 1:
            raise EstimateError(f"{flag} {value} must be at least 1")
    if args.img_size % 32:  # patch 4 and three 2x2 merges
        raise EstimateError(f"--img-size {args.img_size} must be a multiple of 32 (patch 4, three 2x patch merges): "
                            f"try {max(32, round(args.img_size / 32) * 32)}")
    if args.offload != "none" and args.zero == 0:
        raise EstimateError("--offload needs ZeRO: pass --zero 1, 2 or 3 (weights are offloaded only with --zero 3)")


def estimate(args: argparse.Namespace) -> dict:
    """The JSON object the CLI prints."""
    model_args = {"name": args.model} if args.task == "simmim" else {"name": args.model, "num_classes": args.num_classes}
    kwargs = dict(img_size=args.img_size, window_size=args.window, zero_stage=args.zero, world_size=args.gpus,
                  offload=args.offload, checkpointing=args.checkpointing, attn_backend=args.attn,
                  precision=args.precision, task=args.task, device_type=args.device)
    budget = int(parse_bytes(args.gpu_mem) * HEADROOM)
    plan = estimate_memory(model_args, micro_batch=args.micro_batch, **kwargs).to_dict()
    return {**plan, "budget_bytes": budget, "fits": plan["total_bytes"] <= budget,
            "max_micro_batch": max_micro_batch(model_args, budget_bytes=budget, **kwargs),
            "flops_per_image": flops_per_image(model_args, img_size=args.img_size, window_size=args.window,
                                               task=args.task)}


def main(argv: list[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    try:
        check(args)
        parse_bytes(args.gpu_mem)
    except EstimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(estimate(args)))
    return 0


if __name__ == "__main__":
    exit_process(main())
