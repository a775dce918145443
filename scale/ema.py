"""Exponential moving average of the weights, in fp32, next to the fp32 master weights (sharded under ZeRO-3).

A bf16 EMA cannot move: at decay 0.9999 an update is 1e-4 of the weight, below bf16's 2^-8
resolution, so the shadow copy is fp32 and is fed from DeepSpeed's fp32 master weights, not from
the bf16 working copy. Under ZeRO-3 a parameter's `.data` is an empty placeholder outside
forward, so each rank keeps the EMA of its own shard only (no communication per step); the few
small parameters ZeRO-3 keeps whole on every rank (`ds_persist`) and ZeRO-1/2 parameters are
kept whole (DeepSpeed assembles their fp32 value with one all-reduce each).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


class WeightEMA:
    """`shadow = decay * shadow + (1 - decay) * weight` after every optimizer step, in fp32."""

    def __init__(self, engine: Any, decay: float) -> None:
        self.engine = engine
        self.decay = decay
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.shadow = [self._master(p).detach().float().clone() for p in self.params]

    def _sharded(self, p: torch.nn.Parameter) -> bool:
        return self.engine.zero3 and not getattr(p, "ds_persist", False)

    def _master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master value of `p` this rank keeps: its ZeRO-3 shard (flat), else the whole parameter."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        if self._sharded(p):
            return safe_get_local_fp32_param(p)
        full = safe_get_full_fp32_param(p)  # collective for ZeRO-1/2 and persistent ZeRO-3 parameters
        return full if full is not None else p.data  # no ZeRO: the fp32 parameter is its own master

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in. Collective (every rank calls it after each optimizer step)."""
        for p, shadow in zip(self.params, self.shadow):
            shadow.mul_(self.decay).add_(self._master(p).float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model computes with the EMA weights inside this block, with its own weights again after it."""
        ds_engine = self.engine.engine
        if self.engine.zero3:
            ds_engine.empty_partition_cache()  # no gathered copy may outlive the swap of the shards below
        saved = []
        with torch.no_grad():
            for p, shadow in zip(self.params, self.shadow):
                working = p.ds_tensor if self._sharded(p) else p
                saved.append(working.data.clone())
                working.data.copy_(shadow.view_as(working.data))
        try:
            yield
        finally:
            if self.engine.zero3:
                ds_engine.empty_partition_cache()
            with torch.no_grad():
                for p, old in zip(self.params, saved):
                    (p.ds_tensor if self._sharded(p) else p).data.copy_(old)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shadow tensors (they differ per rank under ZeRO-3)."""
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved, on the same ZeRO layout."""
        if len(state["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("the checkpoint's weight EMA was sharded for another ZeRO stage or world size: "
                             "resume with the same ds_config and number of ranks")
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)
