"""The DeepSpeed engine around a SimMIM model: build (partitioned for ZeRO-3), step, guard, reconstruct.

`build_engine` fixes the order that matters: seed -> model under `zero.Init` (stage 3 never
materialises the full model on one rank) -> activation checkpointing -> param groups (shapes
from `ds_shape`) -> `deepspeed.initialize`. `PretrainEngine.micro_step` runs one forward and
backward and agrees with the other ranks on whether the loss was finite before touching the
gradients, so a bad batch on one rank skips the step on every rank instead of hanging ZeRO.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

import data
from scale.config import PretrainConfig
from scale.dist import DistInfo
from scale.ds_config import precision_of, zero_stage
from scale.param_groups import build_param_groups


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss; the message says where to resume."""


class NonFiniteGuard:
    """Counts skipped non-finite steps and stops the run after `max_in_row` in a row."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def update(self, finite: bool, *, step: int, last_checkpoint: Any = None) -> None:
        """Record one micro-step's outcome; raise NonFiniteLossError on the `max_in_row`-th failure in a row."""
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
                "no checkpoint was saved in this run"
            raise NonFiniteLossError(
                f"{self.in_row} non-finite losses in a row at step {step}: stopping; {where} "
                f"(lower optim.lr or raise schedule.warmup_epochs, then resume=<that path>)")


def build_simmim(cfg: PretrainConfig, ds: dict[str, Any]) -> nn.Module:
    """The SimMIM model of `cfg`; under ZeRO-3 built inside `zero.Init` so it is partitioned on creation."""
    import deepspeed
    import models

    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3):
        model = models.build_simmim(cfg.model.name, norm_target_patch_size=cfg.model.norm_target_patch_size,
                                    **cfg.model.build_args())
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


@dataclass
class StepResult:
    """What one micro-step produced: the rank-averaged loss, or None when the step was skipped."""
    loss: float | None


class PretrainEngine:
    """A thin layer over `deepspeed.DeepSpeedEngine` with the trainer's step semantics."""

    def __init__(self, engine: Any, info: DistInfo, precision: str,
                 mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: tuple[float, ...] = IMAGENET_DEFAULT_STD) -> None:
        self.engine = engine
        self.info = info
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # uint8 batches (data.SimMIMTransform) are normalised here; kept on the device so no step copies them
        self.mean = torch.tensor(mean, dtype=torch.float32, device=info.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=info.device)
        self.zero3 = engine.zero_optimization_stage() == 3
        self.overflow_skips = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups, where the LR schedule writes each step's LR."""
        return self.engine.optimizer.param_groups

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(self.info.device, non_blocking=True)
        if images.dtype == torch.uint8:
            # normalised in float32 and then cast: the values the float loader path used to produce
            images = data.normalize_images(images, self.mean, self.std)
        # DeepSpeed casts module weights to bf16 but not inputs, so cast images here
        images = images.to(self.dtype)
        mask = batch["mask"].to(self.info.device, non_blocking=True)
        return images, mask

    def micro_step(self, batch: dict[str, Any]) -> StepResult:
        """Forward + backward + `engine.step()` (which only updates at accumulation boundaries).

        If the loss is non-finite on *any* rank, all ranks skip backward and step together: the
        gradients stay clean, and no rank waits in a collective the others never enter.
        """
        import deepspeed.comm as dist

        images, mask = self._inputs(batch)
        loss = self.engine(images, mask)
        if isinstance(loss, dict):
            loss = loss["loss"]
        detached = loss.detach().float()
        finite = torch.isfinite(detached)
        stats = torch.stack([torch.where(finite, detached, torch.zeros_like(detached)), (~finite).float()])
        dist.all_reduce(stats)  # [sum of finite losses, number of ranks with a non-finite loss]
        loss_sum, bad_ranks = stats.tolist()
        if bad_ranks > 0:
            return StepResult(loss=None)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary and not self.engine.was_step_applied():
            self.overflow_skips += 1  # bf16/fp16 overflow: DeepSpeed skipped the update silently
        return StepResult(loss=loss_sum / self.info.world_size)

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last update (before clipping), if DeepSpeed computed one."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, Any], num_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, mask, prediction) for the first `num_images` of `batch`. Collective under ZeRO-3.

        Runs in eval mode so drop path draws no random numbers: logging images must not change
        the training RNG stream (resume would otherwise differ from an uninterrupted run).
        """
        import deepspeed

        module = self.engine.module
        images, mask = self._inputs({k: batch[k][:num_images] for k in ("image", "mask")})
        # reconstruct() is not forward(), so ZeRO-3's forward hooks do not fetch the top module's own
        # parameters (mask_token); gather those explicitly (submodules still fetch themselves)
        own = list(module.parameters(recurse=False))
        gather = deepspeed.zero.GatheredParameters(own) if self.zero3 and own else contextlib.nullcontext()
        was_training = module.training
        module.eval()
        try:
            with gather:
                prediction = module.reconstruct(images, mask)
        finally:
            module.train(was_training)
        return images, mask, prediction


def build_engine(cfg: PretrainConfig, ds: dict[str, Any], info: DistInfo,
                 mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: tuple[float, ...] = IMAGENET_DEFAULT_STD) -> tuple[PretrainEngine, nn.Module]:
    """Build model and DeepSpeed engine from a filled ds_config. Returns (engine wrapper, model).

    `mean` / `std` normalise uint8 batches on the device (pass the SimMIMTransform's).
    """
    import deepspeed

    model = build_simmim(cfg, ds)
    groups = build_param_groups(model, cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    return PretrainEngine(engine, info, precision_of(ds), mean, std), model
