"""Optimizer parameter groups: weight decay on matrices, none on biases, norms and the like.

Which parameters skip decay comes from the model (`no_weight_decay()` name keywords:
logit_scale, cpb_mlp, mask_token, position embeddings, ...) plus the usual rule that 1-D
tensors (biases, norm weights) never decay. Under ZeRO-3 `p.data` is an empty placeholder,
so the shape comes from `p.ds_shape`.

Fine-tuning adds layer-wise LR decay (Microsoft's SimMIM recipe): every parameter gets the
model's `layer_id(name)` and its group an `lr_scale` of decay ** (num_layers - 1 - id), which
the LR schedule multiplies in per group.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def param_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Full shape of a parameter, also when ZeRO-3 has partitioned it away."""
    return tuple(getattr(p, "ds_shape", p.shape))


def no_decay_keywords(model: nn.Module) -> set[str]:
    """Name keywords the model (or, for a task wrapper, its `encoder`) asks to exclude from weight decay."""
    for candidate in (model, getattr(model, "encoder", None)):
        hook = getattr(candidate, "no_weight_decay", None)
        if callable(hook):
            return set(hook())
    return set()


def layer_id_rule(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """(parameter name -> layer id, num_layers) for layer-wise LR decay.

    From the model's own `layer_id`/`num_layers` (SwinV2, SimMIM) or, for a task wrapper, from its
    `encoder`: names under `encoder.` are delegated, the wrapper's other parameters count as head (last).
    """
    if callable(getattr(model, "layer_id", None)):
        return model.layer_id, model.num_layers
    encoder = getattr(model, "encoder", None)
    if not callable(getattr(encoder, "layer_id", None)):
        raise TypeError(f"{type(model).__name__} has no layer_id(): layer-wise LR decay needs a SwinV2, a SimMIM "
                        f"module or a wrapper that holds one as `encoder`")
    last = encoder.num_layers - 1

    def wrapped(name: str) -> int:
        return encoder.layer_id(name.removeprefix("encoder.")) if name.startswith("encoder.") else last

    return wrapped, encoder.num_layers


def build_param_groups(model: nn.Module, weight_decay: float,
                       layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups by weight decay and, with `layer_decay`, by depth.

    Without layer_decay: two groups, `decay` (weight_decay) and `no_decay` (0.0), each with lr_scale 1.0.
    With it: one group per (layer id, decay/no-decay), ordered by id, each tagged `layer_id` and with
    lr_scale = layer_decay ** (num_layers - 1 - layer_id) (the head trains at the full LR).
    Frozen parameters are left out. Empty groups are dropped (DeepSpeed rejects them).
    """
    keywords = no_decay_keywords(model)
    layer_of, num_layers = layer_id_rule(model) if layer_decay is not None else (None, 1)
    groups: dict[tuple[int, bool], list[torch.Tensor]] = {}  # (layer id, decays) -> params
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (len(param_shape(p)) <= 1 or any(k in name for k in keywords))
        groups.setdefault((layer_of(name) if layer_of else 0, decays), []).append(p)
    if layer_decay is None:
        return [{"params": groups[(0, decays)], "weight_decay": weight_decay if decays else 0.0, "lr_scale": 1.0}
                for decays in (True, False) if (0, decays) in groups]
    return [{"params": groups[(layer, decays)], "weight_decay": weight_decay if decays else 0.0,
             "lr_scale": layer_decay ** (num_layers - 1 - layer), "layer_id": layer}
            for layer, decays in sorted(groups, key=lambda key: (key[0], not key[1]))]


def no_decay_names(model: nn.Module) -> list[str]:
    """Names of the parameters that `build_param_groups` puts in no-decay groups (for logs/tests)."""
    keywords = no_decay_keywords(model)
    return [n for n, p in model.named_parameters()
            if p.requires_grad and (len(param_shape(p)) <= 1 or any(k in n for k in keywords))]
