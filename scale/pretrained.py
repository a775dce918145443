"""Weights to start a run from: our runs and exports, Microsoft's and timm's SwinV2 files.

`open_pretrained` is cheap and runs on every rank: it says what the source is and which window
sizes its log-CPB MLP was trained at (what the new model must normalise coordinates by).
`load_weights` reads the tensors on rank 0 only and puts them into a model that ZeRO-3 may have
partitioned already.
"""
from __future__ import annotations

import contextlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale.checkpoint import find_checkpoint, read_meta
from scale.config import ConfigError

_COORDS_KEY = re.compile(r"^(?:module\.)?(?:encoder\.)?layers\.(\d+)\.blocks\.0\.attn\.relative_coords_table$")


@dataclass
class PretrainedSource:
    """Where pretrained weights come from and what their log-CPB MLP learned on."""
    path: str
    kind: str  # "run" (a DeepSpeed checkpoint of ours), "export" (scale.export), "file" (Microsoft / timm)
    windows: list[int] | None  # per stage, the window the MLP's coordinates were normalised by; None: unknown
    # a self-supervised run's backbone weights (MoBY's online encoder, EsViT's teacher): what its evaluation reads
    feature_prefix: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """The weights (fp32, on the CPU). A run checkpoint is consolidated from its ZeRO shards first."""
        if self.kind == "run":
            from scale.export import consolidate

            state = consolidate(self.path)["model"]
        else:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        if self.feature_prefix is None:
            return state
        state = state["model"] if self.kind == "export" else state
        return {k.removeprefix(self.feature_prefix): v for k, v in state.items() if k.startswith(self.feature_prefix)}


def stage_windows(model_args: dict[str, Any]) -> list[int]:
    """The window each stage attends over for a run's model args (clamped where a stage is smaller).

    A model that was itself fine-tuned from another keeps that one's normalisation windows.
    """
    import models
    from models.backbones import is_timm_backbone

    if is_timm_backbone(model_args["name"]):
        raise ConfigError(f"--pretrained holds a {model_args['name']} backbone: run_finetune.py fine-tunes SwinV2; "
                          f"export it with python -m scale.export RUN OUT.pt --format timm and fine-tune it with timm")
    encoder = models.build_model(model_args["name"], device="meta", num_classes=0, **{
        k: v for k, v in model_args.items()
        if k not in ("name", "kind", "num_classes", "norm_target_patch_size", "feature_prefix")})
    if any(encoder.pretrained_window_sizes):
        return list(encoder.pretrained_window_sizes)
    return [min(w, min(r)) for w, r in zip(encoder.window_sizes, encoder.stage_resolutions(encoder.img_size))]


def windows_from_coords(state_dict: dict[str, torch.Tensor]) -> list[int] | None:
    """Normalisation windows recovered from stored `relative_coords_table` buffers (Microsoft's files).

    A table for window W normalised by P holds sign(x) log2(|x| + 1) / 3 with x up to 8 (W-1)/(P-1),
    so its largest value gives P back. None when the file keeps no tables.
    """
    tables = {int(m.group(1)): v for k, v in state_dict.items() if (m := _COORDS_KEY.match(k))}
    if not tables:
        return None
    windows = []
    for stage in sorted(tables):
        table = tables[stage].float()
        window = (table.shape[1] + 1) // 2
        top = float(table.max())
        if window == 1 or top <= 0:
            windows.append(window)
            continue
        windows.append(round(8 * (window - 1) / (2 ** (3 * top) - 1)) + 1)
    return windows


def open_pretrained(path: str | Path) -> PretrainedSource:
    """Identify `path` without loading it whole; raises ConfigError naming the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--pretrained {path} does not exist: pass a pretraining run's output dir, a step_* folder "
                          f"or a weights file (ours, Microsoft's or timm's)")
    if path.is_dir():
        ckpt_dir, tag = find_checkpoint(path)  # ConfigError when nothing complete is there
        meta = read_meta(ckpt_dir, tag)
        return PretrainedSource(str(ckpt_dir / tag), "run", stage_windows(meta["model_args"]),
                                meta["model_args"].get("feature_prefix"))
    try:
        # memory-mapped: every rank can look at a multi-GB file without reading it
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise ConfigError(f"--pretrained {path} is not a readable torch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); pass a run folder, a scale.export file or a "
                          f"Microsoft/timm SwinV2 .pth") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--pretrained {path} holds a {type(raw).__name__}, not a state dict")
    if isinstance(raw.get("model_args"), dict):
        return PretrainedSource(str(path), "export", stage_windows(raw["model_args"]),
                                raw["model_args"].get("feature_prefix"))
    inner = next((raw[k] for k in ("model", "state_dict", "module") if isinstance(raw.get(k), dict)), raw)
    return PretrainedSource(str(path), "file", windows_from_coords(inner))


def load_weights(model: nn.Module, source: PretrainedSource, *, zero3: bool, is_main: bool) -> Any:
    """Load `source` into `model` (a SwinV2 or SimMIM module); returns the load report on the main rank.

    Collective under ZeRO-3: the model's parameters are gathered whole on every rank while rank 0
    copies the weights in, and re-partitioned after. That holds the full model once per rank for the
    duration (6 GB in bf16 for SwinV2-G), which every supported device has room for before training.
    """
    import deepspeed

    import models

    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if zero3 else contextlib.nullcontext()
    report = None
    with gather:
        if is_main or not zero3:
            report = models.load_pretrained(model, source.state_dict())
    return report

