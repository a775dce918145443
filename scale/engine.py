"""The DeepSpeed engine around any model whose forward returns its loss: build, step, guard, evaluate.

The engine knows no task. A task builds its module (inside `partitioned(ds)`, so ZeRO-3 never
materialises the full model on one rank), turns a batch into the module's forward arguments,
and computes its loss inside `forward` (where ZeRO-3 gathers the parameters). `build_engine`
fixes the order that matters: model -> param groups (shapes from `ds_shape`) ->
`deepspeed.initialize`. `Engine.micro_step` runs one forward and backward and agrees with the
other ranks on whether the loss was finite before touching the gradients, so a bad batch on
one rank skips the step on every rank instead of hanging ZeRO.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from scale.dist import DistInfo
from scale.ds_config import precision_of, zero_stage


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


def partitioned(ds: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Build modules inside this: under ZeRO-3 each parameter is partitioned as it is created."""
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero_stage(ds) == 3)


@dataclass
class StepResult:
    """What one micro-step produced: the rank-averaged loss (None when skipped) and any other scalars
    the module returned next to `loss` (rank-averaged too, e.g. accuracy)."""
    loss: float | None
    extras: dict[str, float] = field(default_factory=dict)


class Engine:
    """A thin layer over `deepspeed.DeepSpeedEngine` with the trainer's step semantics."""

    def __init__(self, engine: Any, info: DistInfo, precision: str) -> None:
        self.engine = engine
        self.info = info
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.zero3 = engine.zero_optimization_stage() == 3
        self.overflow_skips = 0
        self.grad_accum_steps = engine.gradient_accumulation_steps()
        self._accumulated = 0  # finite micro-steps since the last optimizer step

    @property
    def module(self) -> nn.Module:
        """The task's module (partitioned under ZeRO-3)."""
        return self.engine.module

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups, where the LR schedule writes each step's LR."""
        return self.engine.optimizer.param_groups

    def set_batch(self, micro_batch: int, grad_accum_steps: int) -> None:
        """Change micro-batch and accumulation between optimizer steps (a new fine-tuning stage)."""
        if self._accumulated:
            raise RuntimeError("set_batch inside an accumulation window: call it between optimizer steps")
        self.engine.set_train_micro_batch_size(micro_batch)
        self.engine.set_train_batch_size(micro_batch * grad_accum_steps * self.info.world_size)
        if hasattr(self.engine.optimizer, "gradient_accumulation_steps"):  # ZeRO's offload path reads its own copy
            self.engine.optimizer.gradient_accumulation_steps = grad_accum_steps
        self.grad_accum_steps = grad_accum_steps

    def micro_step(self, inputs: tuple | dict[str, Any]) -> StepResult:
        """Forward (`module(*inputs)` or `module(**inputs)`) + backward + `engine.step()`.

        The module returns its loss, or a dict with `loss` and other scalars to log. The optimizer
        updates after `grad_accum_steps` finite micro-steps. If the loss is non-finite on *any*
        rank, all ranks skip backward and step together: the gradients stay clean, and no rank
        waits in a collective the others never enter.
        """
        import deepspeed.comm as dist

        # The boundary is set explicitly rather than left to DeepSpeed's micro-step counter modulo the
        # accumulation: skipped micro-steps and a change of accumulation between stages would shift it.
        boundary = self._accumulated + 1 == self.grad_accum_steps
        self.engine.set_gradient_accumulation_boundary(boundary)
        out = self.engine(**inputs) if isinstance(inputs, dict) else self.engine(*inputs)
        loss, extras = (out["loss"], {k: v for k, v in out.items() if k != "loss"}) if isinstance(out, dict) \
            else (out, {})
        detached = loss.detach().float()
        finite = torch.isfinite(detached)
        stats = torch.stack([torch.where(finite, detached, torch.zeros_like(detached)), (~finite).float(),
                             *(torch.as_tensor(v, dtype=torch.float32, device=detached.device).detach()
                               for v in extras.values())])
        dist.all_reduce(stats)  # [sum of finite losses, ranks with a non-finite loss, sums of the extras]
        loss_sum, bad_ranks, *extra_sums = stats.tolist()
        if bad_ranks > 0:
            return StepResult(loss=None)
        self.engine.backward(loss)
        self.engine.step()
        self._accumulated = 0 if boundary else self._accumulated + 1
        if boundary and not self.engine.was_step_applied():
            self.overflow_skips += 1  # bf16/fp16 overflow: DeepSpeed skipped the update silently
        world = self.info.world_size
        return StepResult(loss=loss_sum / world, extras={k: v / world for k, v in zip(extras, extra_sums)})

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last update (before clipping), if DeepSpeed computed one."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    @contextlib.contextmanager
    def evaluating(self, *owners: nn.Module) -> Iterator[nn.Module]:
        """The module in eval mode without autograd, its own top-level parameters gathered. Collective.

        Eval mode, so drop path draws no random numbers: evaluating or drawing images must not
        change the training RNG stream (resume would otherwise differ from an uninterrupted run).
        A call that is not `forward()` (e.g. SimMIM's `reconstruct`) does not trigger ZeRO-3's
        hooks for the top module's own parameters (mask_token), so those are gathered here;
        submodules still fetch themselves. `owners` are submodules whose own parameters such a call
        also reads outside their forward (a timm ViT's class token and position embedding, which
        `forward_features` uses): gathered too.
        """
        import deepspeed

        module = self.module
        own = [p for m in (module, *owners) for p in m.parameters(recurse=False)]
        gather = deepspeed.zero.GatheredParameters(own) if self.zero3 and own else contextlib.nullcontext()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), gather:
                yield module
        finally:
            module.train(was_training)


def build_engine(model: nn.Module, param_groups: list[dict[str, Any]], ds: dict[str, Any],
                 info: DistInfo) -> Engine:
    """Wrap `model` (built inside `partitioned(ds)`) and its optimizer groups in a DeepSpeed engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds)
    return Engine(engine, info, precision_of(ds))
