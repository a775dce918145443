"""Optimizer parameter groups: weight decay on matrices, none on biases, norms and the like.

Which parameters skip decay comes from the model (`no_weight_decay()` name keywords:
logit_scale, cpb_mlp, mask_token, position embeddings, ...) plus the usual rule that 1-D
tensors (biases, norm weights) never decay. Under ZeRO-3 `p.data` is an empty placeholder,
so the shape comes from `p.ds_shape`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Full shape of a parameter, also when ZeRO-3 has partitioned it away."""
    return tuple(getattr(p, "ds_shape", p.shape))


def no_decay_keywords(model: nn.Module) -> set[str]:
    """Name keywords the model asks to exclude from weight decay (empty if it has no opinion)."""
    hook = getattr(model, "no_weight_decay", None)
    return set(hook()) if callable(hook) else set()


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: `decay` (weight_decay) and `no_decay` (0.0), each with lr_scale 1.0.

    Frozen parameters are left out. Empty groups are dropped (DeepSpeed rejects them).
    """
    keywords = no_decay_keywords(model)
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if len(param_shape(p)) <= 1 or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def no_decay_names(model: nn.Module) -> list[str]:
    """Names of the parameters that `build_param_groups` puts in the no-decay group (for logs/tests)."""
    keywords = no_decay_keywords(model)
    return [n for n, p in model.named_parameters()
            if p.requires_grad and (len(param_shape(p)) <= 1 or any(k in n for k in keywords))]
