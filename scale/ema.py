"""Exponential moving averages of the weights in fp32: the fine-tuning weight EMA and the SSL teachers.

A bf16 EMA cannot move: at decay 0.9999 an update is 1e-4 of the weight, below bf16's 2^-8
resolution, so the shadow copy is fp32 and is fed from DeepSpeed's fp32 master weights, not from
the bf16 working copy. Under ZeRO-3 a parameter's `.data` is an empty placeholder outside
forward, so each rank keeps the EMA of its own partition only (no communication per step) and
writes results into the partition (`ds_tensor`); the few small parameters ZeRO-3 keeps whole once
fetched (`ds_persist`) also get their whole value, assembled by one all-gather for all of them.
ZeRO-1/2 parameters are kept whole (DeepSpeed assembles their fp32 value with one all-reduce each).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch


def _local_master(engine: Any, p: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master value of `p` this rank keeps: its ZeRO-3 partition (flat), else the whole parameter."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    if engine.zero3:
        return safe_get_local_fp32_param(p)
    full = safe_get_full_fp32_param(p)  # collective for ZeRO-1/2
    return full if full is not None else p.data  # no ZeRO: the fp32 parameter is its own master


@torch.no_grad()
def _write_local(engine: Any, params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Make `values` (as `_local_master` shapes them) the working weights of `params`. Collective under ZeRO-3.

    Under ZeRO-3 the partitions are written, and parameters that are whole right now (persistent ones
    after their first fetch) get their whole value from every rank's partition in one all-gather.
    """
    if not engine.zero3:
        for p, v in zip(params, values):
            p.data.copy_(v.view_as(p.data))
        return
    import deepspeed.comm as dist

    engine.engine.empty_partition_cache()  # no gathered copy may outlive the partitions written here
    whole = []
    for p, v in zip(params, values):
        p.ds_tensor.data.copy_(v.view_as(p.ds_tensor.data))
        if p.data.numel() == p.ds_numel:
            whole.append(p)
    if not whole:
        return
    flat = torch.cat([p.ds_tensor.data.float().flatten() for p in whole])
    gathered = [torch.empty_like(flat) for _ in range(engine.info.world_size)]
    dist.all_gather(gathered, flat)
    offset = 0
    for p in whole:
        part = p.ds_tensor.numel()
        full = torch.cat([g[offset:offset + part] for g in gathered])[:p.ds_numel]
        p.data.copy_(full.view_as(p.data))
        offset += part


def _check_layout(saved: Sequence[torch.Tensor], mine: Sequence[torch.Tensor], what: str) -> None:
    if len(saved) != len(mine) or any(a.shape != b.shape for a, b in zip(saved, mine)):
        raise ValueError(f"the checkpoint's {what} was sharded for another ZeRO stage or world size: "
                         f"resume with the same ds_config and number of ranks")


class WeightEMA:
    """`shadow = decay * shadow + (1 - decay) * weight` after every optimizer step, in fp32."""

    def __init__(self, engine: Any, decay: float) -> None:
        self.engine = engine
        self.decay = decay
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.shadow = [_local_master(engine, p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in. Collective (every rank calls it after each optimizer step)."""
        for p, shadow in zip(self.params, self.shadow):
            shadow.mul_(self.decay).add_(_local_master(self.engine, p).float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model computes with the EMA weights inside this block, with its own weights again after it.

        Collective. The own weights come back from the fp32 masters, which is exactly what the working
        copy held: DeepSpeed writes it from them after every step.
        """
        _write_local(self.engine, self.params, self.shadow)
        try:
            yield
        finally:
            _write_local(self.engine, self.params, [_local_master(self.engine, p) for p in self.params])

    def state_dict(self) -> dict[str, Any]:
        """This rank's shadow tensors (they differ per rank under ZeRO-3)."""
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved, on the same ZeRO layout."""
        _check_layout(state["shadow"], self.shadow, "weight EMA")
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL/MoBY/DINO teacher momentum after `step` optimizer steps: `base` rising to 1 on a half cosine."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MomentumTeacher:
    """A teacher network that is the EMA of a student network of the same shape, both inside one engine.

    The teacher is a frozen submodule of the engine's module, so ZeRO-3 partitions its parameters
    exactly like the student's: this rank holds the same slice of both, and the update needs no
    communication for partitioned parameters. The papers' loop (`t.data.mul_(m).add_(s.data)`) would
    do nothing there: `.data` is an empty placeholder outside forward. So the EMA runs on an fp32
    shadow of this rank's teacher slice, fed from the student's fp32 master slice (a bf16 teacher
    could not move: at momentum 0.996 an update is below bf16's resolution), and the shadow is
    then written into the teacher's working copy.
    """

    def __init__(self, engine: Any, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        """Start the teacher as a copy of the student. Collective (ZeRO-1/2 and persistent parameters)."""
        self.engine = engine
        s_named, t_named = dict(student.named_parameters()), dict(teacher.named_parameters())
        if s_named.keys() != t_named.keys():
            raise ValueError("teacher and student differ in parameters: build both from the same arguments")
        self.pairs = [(s_named[k], t_named[k]) for k in s_named]
        if any(t.requires_grad for _, t in self.pairs):
            raise ValueError("the teacher has trainable parameters: freeze it before the optimizer groups are built")
        self.shadow = [_local_master(engine, s).detach().float().clone() for s, _ in self.pairs]
        self.teacher_params = [t for _, t in self.pairs]
        _write_local(engine, self.teacher_params, self.shadow)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, in fp32. Collective, after each optimizer step."""
        for (s, _), shadow in zip(self.pairs, self.shadow):
            shadow.mul_(momentum).add_(_local_master(self.engine, s).float(), alpha=1.0 - momentum)
        _write_local(self.engine, self.teacher_params, self.shadow)

    def state_dict(self) -> dict[str, Any]:
        """This rank's fp32 shadow of the teacher (per rank under ZeRO-3)."""
        return {"shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow and write it into the teacher."""
        _check_layout(state["shadow"], self.shadow, "teacher")
        for mine, saved in zip(self.shadow, state["shadow"]):
            mine.copy_(saved)
        _write_local(self.engine, self.teacher_params, self.shadow)
