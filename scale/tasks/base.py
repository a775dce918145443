"""The interface between a training task and the task-agnostic engine and loops.

Modelled on how solo-learn, mmpretrain and DINOv2 host many methods on one trainer: the task owns
its model (loss computed inside `forward`, so ZeRO-3 gathers the parameters there), its transform,
its optimizer groups, how a batch becomes forward arguments, a hook after each optimizer step
(teachers, centres), what it draws, its evaluation and the extra state it checkpoints.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import data
from scale.dist import DistInfo
from scale.param_groups import build_param_groups


class Task:
    """Defaults for every hook; a task overrides what it needs. `cfg` is the run's whole config tree."""

    name = "task"

    def __init__(self, cfg: Any, info: DistInfo, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.info = info
        self.log = log
        self.total_steps = 1  # optimizer steps of the run, set by the trainer, for the task's own schedules

    def build_model(self) -> nn.Module:
        """The module to train; the caller builds it inside `scale.engine.partitioned(ds)`."""
        raise NotImplementedError

    def setup(self, engine: Any) -> None:
        """Runs once the engine exists, before any resume (e.g. to shadow the weights it holds)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups (with `lr_scale` and `weight_decay`); decay rules come from the model."""
        return build_param_groups(model, self.cfg.optim.weight_decay)

    def train_transform(self) -> Callable:
        """PIL image -> tensor or dict of tensors, for `data.ShardLoader`."""
        raise NotImplementedError

    def inputs(self, batch: dict[str, Any], engine: Any) -> tuple | dict[str, Any]:
        """A loader batch -> the module's forward arguments, on the device, in the engine's dtype."""
        raise NotImplementedError

    def before_step(self, engine: Any, step: int) -> None:
        """Runs before the micro-steps of optimizer step `step + 1` (schedules of the task's own, e.g. temperatures)."""

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        """Runs after every applied optimizer step (never on accumulation micro-steps)."""

    def scalars(self) -> dict[str, float]:
        """The task's own values to log with each step (e.g. teacher momentum), by TensorBoard tag."""
        return {}

    def draw(self, engine: Any, step: int, batch: dict[str, Any], logger: Any) -> None:
        """Write pictures of what the model does to `logger`. Collective under ZeRO-3: every rank calls it."""

    def evaluate(self, engine: Any, loader: Any) -> dict[str, float]:
        """Scores of the model on `loader` (the same on every rank). Collective under ZeRO-3; none by default."""
        return {}

    def flops_per_image(self, model: nn.Module) -> int:
        """Analytic forward FLOPs of one image at the model's current input size (for MFU)."""
        import models

        return models.estimate_flops(model)

    def model_args(self) -> dict[str, Any]:
        """How to rebuild the module (recorded in checkpoints' meta.json, read by `scale.export`)."""
        return {"name": self.cfg.model.name, **self.cfg.model.build_args()}

    def state_dict(self) -> dict[str, Any]:
        """Task state that is neither model nor optimizer (queues, centres, EMA), saved with checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def device_images(images: torch.Tensor, engine: Any, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Loader images on the engine's device and in its dtype; uint8 images are normalised there first.

    DeepSpeed casts module weights to bf16 but not inputs, so the cast happens here. uint8 is
    normalised in float32 and then cast: the values the float loader path produces.
    """
    images = images.to(engine.info.device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = data.normalize_images(images, mean, std)
    return images.to(engine.dtype)


def apply_runtime_switches(encoder: nn.Module, model_cfg: Any) -> None:
    """The `model:` switches that are not constructor arguments: activation checkpointing, torch.compile."""
    if model_cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    if model_cfg.compile:
        from deepspeed.utils import set_z3_leaf_modules

        from models.swin_transformer_v2 import SwinTransformerV2Block

        # a ZeRO-3 leaf has all its weights gathered by one hook before it runs: the compiled block then
        # sees whole weights, not the empty shards DeepSpeed's per-submodule hooks would hand a traced graph
        set_z3_leaf_modules(encoder, [SwinTransformerV2Block])
        encoder.compile_blocks()
