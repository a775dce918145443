"""Learning-rate schedule applied to every optimizer param group by the trainer itself.

DeepSpeed's built-in schedulers write one LR into all param groups, which wipes any
per-group scale (layer-wise decay in fine-tuning). So the schedule is a pure function of the
optimizer step, and `apply` writes `lr * group["lr_scale"]` into each group. Being a pure
function of the step also makes resume exact: only the step needs to be checkpointed.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Iterable

from scale.config import ScheduleConfig


def scale_lr(lr_per_base: float, global_batch: int, batch_base: int = 512) -> float:
    """Linear scaling rule used by SimMIM/Swin: LR is given per `batch_base` images."""
    return lr_per_base * global_batch / batch_base


class LRSchedule:
    """Linear warmup then cosine decay (or step decay at milestones), in optimizer steps.

    The YAML gives the schedule in epochs of `train.epochs`; it is mapped onto `total_steps`,
    so a run shortened with `train.max_steps` keeps the same shape, compressed.
    """

    def __init__(self, cfg: ScheduleConfig, *, base_lr: float, warmup_lr: float, min_lr: float,
                 total_steps: int, epochs: float, weight_decay: float = 0.0) -> None:
        """Args: LRs already scaled by the global batch; total_steps >= 1; epochs = train.epochs;
        weight_decay: the decaying groups' value at step 0 (optim.weight_decay)."""
        self.cfg = cfg
        self.weight_decay = weight_decay
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, warmup_lr, min_lr
        self.total_steps = max(1, total_steps)
        steps_per_epoch = self.total_steps / epochs
        self.warmup_steps = min(self.total_steps, round(cfg.warmup_epochs * steps_per_epoch))
        self.milestones = sorted(round(m * steps_per_epoch) for m in cfg.milestones)
        # a fine-tuning stage with its own peak LR scales the curve while it runs; the curve's shape continues
        self.lr_factor = 1.0

    def lr_at(self, step: int) -> float:
        """LR for the optimizer update that follows `step` completed updates (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if self.cfg.name == "step":
            return self.base_lr * self.cfg.gamma ** bisect.bisect_right(self.milestones, step)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def weight_decay_at(self, step: int) -> float:
        """Weight decay of the decaying groups for the update after `step` updates (cosine to weight_decay_end)."""
        end = self.cfg.weight_decay_end
        if end is None:
            return self.weight_decay
        progress = min(1.0, step / self.total_steps)
        return end + 0.5 * (self.weight_decay - end) * (1.0 + math.cos(math.pi * progress))

    def apply(self, param_groups: Iterable[dict[str, Any]], step: int) -> float:
        """Write the LR for `step` into every group (times its `lr_scale`); return the unscaled LR."""
        lr = self.lr_at(step) * self.lr_factor
        weight_decay = self.weight_decay_at(step)
        for group in param_groups:
            group["lr"] = 0.0 if step < group.get("frozen_steps", 0) else lr * group.get("lr_scale", 1.0)
            if self.cfg.weight_decay_end is not None and group.get("weight_decay", 0.0) > 0:
                group["weight_decay"] = weight_decay
        return lr

    def state_dict(self) -> dict[str, Any]:
        """What determines the curve; checked on resume so a changed schedule is noticed."""
        return {"base_lr": self.base_lr, "warmup_lr": self.warmup_lr, "min_lr": self.min_lr,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "milestones": list(self.milestones), "name": self.cfg.name,
                **({"weight_decay": self.weight_decay, "weight_decay_end": self.cfg.weight_decay_end}
                   if self.cfg.weight_decay_end is not None else {})}


def build_lr_schedule(cfg: ScheduleConfig, *, lr: float, global_batch: int, batch_base: int, total_steps: int,
                      epochs: float, weight_decay: float = 0.0) -> LRSchedule:
    """The schedule with every LR scaled by global_batch / batch_base."""
    return LRSchedule(cfg, base_lr=scale_lr(lr, global_batch, batch_base),
                      warmup_lr=scale_lr(cfg.warmup_lr, global_batch, batch_base),
                      min_lr=scale_lr(cfg.min_lr, global_batch, batch_base), total_steps=total_steps, epochs=epochs,
                      weight_decay=weight_decay)
