"""Load SwinV2 weights from any supported checkpoint into a classifier or a SimMIM module, and write them for timm."""
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn as nn

from .simmim import SimMIM
from .swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn, stage_window

__all__ = ["LoadReport", "load_pretrained", "timm_mismatches", "timm_model_args", "to_timm_state_dict"]

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


class _Inert:
    """Stand-in for a global outside torch's weights-only allowlist: accepts any construction, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _RestrictedPickle:
    """A `pickle_module` for torch.load that resolves only the globals torch's weights-only loader allows."""

    class Unpickler(pickle.Unpickler):
        """Unpickler whose globals are torch's weights-only allowlist; every other one becomes `_Inert`."""

        def find_class(self, module: str, name: str) -> Any:
            from torch._weights_only_unpickler import _get_allowed_globals

            return _get_allowed_globals().get(f"{module}.{name}", _Inert)

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        """pickle.load through the restricted Unpickler."""
        return _RestrictedPickle.Unpickler(file, **kwargs).load()


def _load_file(path: Union[str, os.PathLike]) -> Any:
    """torch.load that imports nothing the file names beyond torch's tensor machinery.

    Microsoft's training checkpoints pickle their yacs config next to the weights, and the weights-only
    loader refuses that class (SETITEMS on a dict subclass). Those files are read again with every global
    outside torch's weights-only allowlist replaced by an inert stand-in: the weights load, the config is
    dropped unread, and no code from the file runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)


def _read_state_dict(source: Union[str, os.PathLike, dict]) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        source = _load_file(source)
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


def to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's (or any supported) SwinV2 weights in timm's key layout, for `strict=True` loading.

    Accepts a classifier's, an encoder-prefixed task module's or a SimMIM module's state dict: the
    `encoder.` prefix goes, SimMIM's mask token and decoder are dropped (a headless timm model takes
    the rest), and the classifier becomes `head.fc`. timm keeps every coordinate table, index, mask
    and its zero k_bias as non-persistent buffers, as we do, so there is nothing to add.
    """
    out = {}
    for key, value in checkpoint_filter_fn(state_dict).items():
        if key.startswith(SIMMIM_ONLY_KEYS):
            continue
        if ".main_norm." in key:
            raise ValueError(f"{key}: timm's SwinV2 has no main-branch LayerNorm (SwinV2-H/G, main_norm_every > 0), "
                             f"so these weights have no timm equivalent; keep this project's format")
        out["head.fc." + key.removeprefix("head.") if key.startswith("head.") else key] = value
    return out


def timm_model_args(model: Union[SwinTransformerV2, SimMIM]) -> dict[str, Any]:
    """Keyword arguments of `timm.models.swin_transformer_v2.SwinTransformerV2` with `model`'s architecture.

    A SimMIM module gives its encoder's (headless, num_classes 0). Raises ValueError for models that
    timm cannot hold (main-branch norms of SwinV2-H/G).
    """
    encoder = model.encoder if isinstance(model, SimMIM) else model
    if any(name.endswith("main_norm") and isinstance(m, nn.LayerNorm) for name, m in encoder.named_modules()):
        raise ValueError("timm's SwinV2 has no main-branch LayerNorm (SwinV2-H/G, main_norm_every > 0)")
    return dict(img_size=encoder.img_size, patch_size=encoder.patch_size,
                in_chans=encoder.patch_embed.proj.in_channels, num_classes=encoder.num_classes,
                embed_dim=encoder.embed_dim, depths=encoder.depths, num_heads=encoder.num_heads,
                window_size=encoder.window_sizes, pretrained_window_sizes=encoder.pretrained_window_sizes,
                mlp_ratio=encoder.mlp_ratio)


def timm_mismatches(model: Union[SwinTransformerV2, SimMIM]) -> list[str]:
    """Why timm's SwinV2 built with `timm_model_args(model)` would compute different outputs (empty: it would not).

    Where a stage's token grid is not a multiple of its window, both pad; we mask the padding out as keys,
    timm lets real tokens attend to the zero padding (differences around 1e-3 in the logits).
    """
    encoder = model.encoder if isinstance(model, SimMIM) else model
    notes = []
    for i, (resolution, window) in enumerate(zip(encoder.stage_resolutions(encoder.img_size), encoder.window_sizes)):
        window_hw, _ = stage_window(resolution, window)
        if resolution[0] % window_hw[0] or resolution[1] % window_hw[1]:
            notes.append(f"stage {i}: {resolution[0]}x{resolution[1]} tokens are not a multiple of window "
                         f"{window_hw[0]}x{window_hw[1]}; timm attends to the zero padding, this model masks it")
    return notes
