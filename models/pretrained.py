"""Load SwinV2 weights from any supported checkpoint into a classifier or a SimMIM module."""
import os
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn as nn

from .simmim import SimMIM
from .swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn

__all__ = ["LoadReport", "load_pretrained"]

SIMMIM_ONLY_KEYS = ("mask_token", "decoder.")


@dataclass
class LoadReport:
    """What load_pretrained did: keys the model kept at init, keys the checkpoint had in excess."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    skipped_head: bool = False

    def __str__(self) -> str:
        head = " (classifier head left at init: shape differs)" if self.skipped_head else ""
        return (f"missing {len(self.missing_keys)}: {self.missing_keys[:8]}, unexpected "
                f"{len(self.unexpected_keys)}: {self.unexpected_keys[:8]}{head}")


def _read_state_dict(source: Union[str, os.PathLike, dict]) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        source = torch.load(source, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(source.get(wrapper), dict):
            source = source[wrapper]
            break
    return {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, dict]) -> LoadReport:
    """Load Microsoft (classification or SimMIM), timm or this project's SwinV2 weights into `model`.

    `model` is a SwinTransformerV2 or a SimMIM module. Window and resolution may differ from
    the checkpoint's: position tables are rebuilt, the log-CPB MLP is reused. A classifier
    head whose shape differs is left at its init (reported); any other shape mismatch raises.
    The file is read with `weights_only=True`.
    """
    if not isinstance(model, (SwinTransformerV2, SimMIM)):
        raise TypeError(f"load_pretrained takes a SwinTransformerV2 or SimMIM module, not {type(model).__name__}")
    state_dict = checkpoint_filter_fn(_read_state_dict(path_or_state_dict))
    if isinstance(model, SimMIM):
        state_dict = {k if k.startswith(SIMMIM_ONLY_KEYS) else f"encoder.{k}": v for k, v in state_dict.items()}
    own_state = model.state_dict()
    report = LoadReport()
    for key in list(state_dict):
        if key not in own_state or state_dict[key].shape == own_state[key].shape:
            continue
        if key.startswith("head."):
            report.skipped_head = True
            del state_dict[key]
            continue
        raise ValueError(f"checkpoint {key} has shape {tuple(state_dict[key].shape)} but the model expects "
                         f"{tuple(own_state[key].shape)}: build the model with the checkpoint's architecture")
    result = model.load_state_dict(state_dict, strict=False)
    report.missing_keys = list(result.missing_keys)
    report.unexpected_keys = list(result.unexpected_keys)
    return report
