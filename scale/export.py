"""Consolidate a (sharded) DeepSpeed checkpoint into one fp32 file: ours for `models.load_pretrained`, or timm's.

Usage::

    python -m scale.export CKPT OUT.pt [--format ours|timm]

CKPT is an output dir, its `checkpoints/` folder (newest complete checkpoint is used) or one
`step_*` folder. With `--format ours` (default) OUT holds `{"model": state dict of the trained
module, "model_args": {"name", overrides...}, "config": {...}, "step": N}`: a SimMIM run's
module has `encoder.*`, `decoder.*` and `mask_token`, a classifier run's (`model_args["kind"]`
== "classifier") `encoder.*`. With `--format timm` OUT is a plain state dict that
`timm.models.swin_transformer_v2.SwinTransformerV2(**args)` loads with `strict=True`, the args
being printed on success; a SimMIM run exports its encoder as a headless (num_classes=0) model. A
MoBY, EsViT or SiT run (`model_args["feature_prefix"]`) exports the backbone its evaluation reads
(EsViT: the teacher's), headless: a SwinV2 for that class, a timm ViT for `timm.create_model(**args)`.
Runs on one CPU process: no GPU or process group needed.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch

from scale.checkpoint import find_checkpoint, read_meta
from scale.config import ConfigError
from scale.launch import exit_process

FORMATS = ("ours", "timm")


def consolidate(ckpt: str | Path) -> dict[str, Any]:
    """The `--format ours` export dict for checkpoint `ckpt` (see module docstring)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = find_checkpoint(ckpt)
    meta = read_meta(ckpt_dir, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # lazy_mode=False gives real tensors; clone so the file does not keep views of merged flat buffers
    state = {k: v.detach().clone().float() if v.is_floating_point() else v.clone() for k, v in state.items()}
    return {"model": state, "model_args": meta["model_args"], "config": meta["config"], "step": meta["step"]}


def build_encoder(model_args: dict[str, Any]) -> Any:
    """The run's SwinV2 (a SimMIM run's encoder, headless) on the meta device, from meta.json's `model_args`."""
    import models

    args = dict(model_args)
    name, kind = args.pop("name"), args.pop("kind", "simmim")
    if kind not in ("simmim", "classifier") and "feature_prefix" not in args:
        raise ConfigError(f"model_args kind={kind!r} is not simmim or classifier: this checkpoint has no SwinV2 "
                          f"that timm can hold; export it with --format ours")
    # keys that are not SwinV2 constructor arguments (SimMIM's norm_target_patch_size, ...) do not shape it
    accepted = inspect.signature(models.SwinTransformerV2).parameters
    args = {k: v for k, v in args.items() if k in accepted}
    if kind != "classifier":  # SimMIM's and the self-supervised methods' encoders have no head
        args["num_classes"] = 0
    return models.build_model(name, device="meta", **args)


def backbone_weights(exported: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A self-supervised run's backbone: its weights under `feature_prefix`, with that prefix removed."""
    prefix = exported["model_args"]["feature_prefix"]
    return {k.removeprefix(prefix): v for k, v in exported["model"].items() if k.startswith(prefix)}


def _timm_vit(exported: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, timm.create_model args) of a self-supervised run on a timm ViT/DeiT backbone."""
    import timm

    args = exported["model_args"]
    timm_args = {"model_name": args["name"], "pretrained": False, "num_classes": 0,
                 **{k: args[k] for k in ("img_size", "embed_dim") if args.get(k) is not None}}
    state = backbone_weights(exported)
    expected = timm.create_model(**timm_args, device="meta").state_dict()
    wrong = sorted(set(state) ^ set(expected)) + sorted(k for k in set(state) & set(expected)
                                                        if state[k].shape != expected[k].shape)
    if wrong:
        raise ConfigError(f"the checkpoint's weights do not match its meta.json model_args ({len(wrong)} keys "
                          f"differ, e.g. {wrong[0]}); export with --format ours")
    return state, timm_args


def to_timm(exported: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """(timm state dict, timm constructor args, notes on numerics) for an `--format ours` export dict.

    The args are `timm.models.swin_transformer_v2.SwinTransformerV2`'s, or for a timm ViT backbone
    `timm.create_model`'s (they hold `model_name`).
    """
    import models
    from models.backbones import is_timm_backbone

    ssl = "feature_prefix" in exported["model_args"]
    if ssl and is_timm_backbone(exported["model_args"]["name"]):
        return *_timm_vit(exported), []
    try:
        encoder = build_encoder(exported["model_args"])
        state = models.to_timm_state_dict(backbone_weights(exported) if ssl else exported["model"])
        timm_args = models.timm_model_args(encoder)
        # the run's own architecture in timm's names: any difference would fail timm's strict load
        expected = models.to_timm_state_dict(encoder.state_dict())
    except ConfigError:
        raise
    except ValueError as e:  # model_args the registry cannot build, or SwinV2-H/G's norms that timm has no place for
        raise ConfigError(f"{str(e).splitlines()[0]}; export with --format ours") from None
    wrong = sorted(set(state) ^ set(expected)) + sorted(k for k in set(state) & set(expected)
                                                        if state[k].shape != expected[k].shape)
    if wrong:
        raise ConfigError(f"the checkpoint's weights do not match its meta.json model_args ({len(wrong)} keys "
                          f"differ, e.g. {wrong[0]}); export with --format ours")
    return state, timm_args, models.timm_mismatches(encoder)


def check_writable(out: Path) -> None:
    """Fail before the (slow) consolidation when OUT cannot be written."""
    if out.is_dir():
        raise ConfigError(f"OUT {out} is a directory: give a file name, e.g. {out / 'export.pt'}")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {parent} ({e.strerror}): choose an OUT in a writable folder") from None
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"cannot write {out}: choose an OUT in a writable folder")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m scale.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="output dir, its checkpoints/ folder, or one step_* folder")
    parser.add_argument("out", help="file to write (torch.save)")
    parser.add_argument("--format", default="ours", help="ours (default: for models.load_pretrained) or timm "
                                                         "(a plain state dict for timm's SwinTransformerV2)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.format not in FORMATS:
            raise ConfigError(f"--format {args.format} is not one of {', '.join(FORMATS)}")
        if not Path(args.ckpt).exists():
            raise ConfigError(f"{args.ckpt} does not exist: pass a run's output dir, its checkpoints/ folder or "
                              f"one step_* folder")
        check_writable(out)
        exported = consolidate(args.ckpt)
        if args.format == "timm":
            state, timm_args, notes = to_timm(exported)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # marked complete, yet shards or meta.json are gone
        print(f"error: {e}: this checkpoint is damaged; pass an older step_* folder", file=sys.stderr)
        return 2
    weights = exported["model"] if args.format == "ours" else state
    try:
        torch.save(exported if args.format == "ours" else state, out)
    except OSError as e:
        print(f"error: cannot write {out} ({e.strerror or e}): choose an OUT in a writable folder", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}): {len(weights)} tensors, {sum(v.numel() for v in weights.values()) / 1e6:.2f}M "
          f"values, step {exported['step']}, model {exported['model_args']['name']}")
    if args.format == "timm":
        build = "timm.create_model" if "model_name" in timm_args else "timm.models.swin_transformer_v2.SwinTransformerV2"
        print(f"load with {build}(**{timm_args}).load_state_dict(torch.load(OUT), strict=True)")
        for note in notes:
            print(f"warning: timm's outputs differ slightly at this input size: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_process(main())
