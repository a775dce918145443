"""Consolidate a (sharded) DeepSpeed checkpoint into one fp32 file that `models.load_pretrained` reads.

Usage::

    python -m scale.export CKPT OUT.pt

CKPT is an output dir, its `checkpoints/` folder (newest complete checkpoint is used) or one
`step_*` folder. OUT holds `{"model": state dict of the SimMIM module (encoder.*, decoder.*,
mask_token), "model_args": {"name", "norm_target_patch_size", overrides...}, "config": {...},
"step": N}`. Runs on one CPU process: no GPU or process group needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from scale.checkpoint import find_checkpoint, read_meta
from scale.config import ConfigError


def consolidate(ckpt: str | Path) -> dict[str, Any]:
    """The export dict for checkpoint `ckpt` (see module docstring)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = find_checkpoint(ckpt)
    meta = read_meta(ckpt_dir, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # lazy_mode=False gives real tensors; clone so the file does not keep views of merged flat buffers
    state = {k: v.detach().clone().float() if v.is_floating_point() else v.clone() for k, v in state.items()}
    return {"model": state, "model_args": meta["model_args"], "config": meta["config"], "step": meta["step"]}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m scale.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="output dir, its checkpoints/ folder, or one step_* folder")
    parser.add_argument("out", help="file to write (torch.save)")
    args = parser.parse_args(argv)
    try:
        exported = consolidate(args.ckpt)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(exported, args.out)
    n = sum(v.numel() for v in exported["model"].values())
    print(f"wrote {args.out}: {len(exported['model'])} tensors, {n / 1e6:.2f}M values, step {exported['step']}, "
          f"model {exported['model_args']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
