"""Progressive-resolution stages: batch shape, length and memory of each, planned before training starts.

The global batch stays what the config says through every stage; a stage's micro-batch is given
or, with `auto`, the largest the memory plan (`scale.memory`) fits on the device that also divides
the global batch; gradient accumulation makes up the rest. A stage that cannot fit is refused here,
in one line, instead of running out of memory after hours of the stages before it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from scale.config import ConfigError, FinetuneConfig
from scale.memory import estimate_memory, format_bytes, max_micro_batch


@dataclass(frozen=True)
class StagePlan:
    """One stage as it will run: optimizer steps [start_step, end_step), batch shape, predicted bytes."""
    index: int
    img_size: int
    window_size: int
    micro_batch: int
    grad_accum_steps: int
    start_step: int
    end_step: int
    epochs: float
    lr_factor: float  # the stage's peak LR relative to optim.lr
    memory_bytes: int  # the memory plan's per-device total at this micro-batch
    budget_bytes: int

    def describe(self, world_size: int, num_stages: int) -> str:
        """One log line."""
        return (f"stage {self.index + 1}/{num_stages}: {self.img_size}px window {self.window_size}, micro-batch "
                f"{self.micro_batch} x {self.grad_accum_steps} accumulation x {world_size} rank(s), steps "
                f"{self.start_step + 1}-{self.end_step} ({self.epochs:.2f} epochs), memory plan "
                f"{format_bytes(self.memory_bytes)} of {format_bytes(self.budget_bytes)} per device")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for metrics.json."""
        return asdict(self)


def _divisors_up_to(n: int, limit: int, even: bool) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0 and (not even or d % 2 == 0)]


def plan_stages(cfg: FinetuneConfig, *, world_size: int, samples_per_rank: int, budget_bytes: int,
                zero_stage: int, offload: str, precision: str, runtime_bytes: int = 0,
                even_micro_batch: bool = False, device_type: str | None = None) -> list[StagePlan]:
    """Plan every stage of `cfg`; raises ConfigError naming the stage and the fix when one cannot run.

    Args:
        samples_per_rank: training samples each rank reads per epoch (sets steps per epoch).
        budget_bytes: memory one device may use (`scale.memory.device_memory_budget`).
        zero_stage, offload, precision: as the DeepSpeed config will run.
        runtime_bytes: memory the process holds before the model exists (CPU: its RSS).
        even_micro_batch: the recipe mixes pairs of images (mixup/cutmix), so micro-batches must be even.
        device_type: "cuda" or "cpu", whose attention kernels the memory plan models (None: by precision).
    """
    global_batch = cfg.train.global_batch_size
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by the {world_size} ranks: "
                          f"use a multiple of {world_size}")
    per_rank = global_batch // world_size
    if per_rank > samples_per_rank:
        raise ConfigError(f"train.global_batch_size={global_batch} needs {per_rank} images per rank and step but "
                          f"each rank has {samples_per_rank} per epoch: lower the global batch")
    model_args = {"name": cfg.model.name, **cfg.model.build_args()}
    memory_args = dict(zero_stage=zero_stage, world_size=world_size, offload=offload,
                       checkpointing=cfg.model.grad_checkpointing, attn_backend=cfg.model.attn_backend,
                       precision=precision, pretrained_window_sizes=cfg.model.pretrained_window_sizes,
                       task="classifier", runtime_bytes=runtime_bytes, device_type=device_type)
    lengths = []
    for stage in cfg.stages:
        steps_per_epoch = max(1, samples_per_rank // per_rank)
        lengths.append(stage.steps or max(1, round(stage.epochs * steps_per_epoch)))
    lengths = _compress(lengths, cfg.train.max_steps)

    plans, start = [], 0
    for i, (stage, steps) in enumerate(zip(cfg.stages, lengths)):
        where = f"stages[{i}] ({stage.img_size}px window {stage.window_size})"
        shape = dict(img_size=stage.img_size, window_size=stage.window_size, **memory_args)
        fits = max_micro_batch(model_args, budget_bytes=budget_bytes, limit=per_rank, **shape)
        if stage.micro_batch == "auto":
            options = _divisors_up_to(per_rank, fits, even_micro_batch)
            if not options:
                needed = estimate_memory(model_args, micro_batch=2 if even_micro_batch else 1, **shape).total_bytes
                raise ConfigError(f"{where} does not fit: {format_bytes(needed)} per device for the smallest "
                                  f"micro-batch, {format_bytes(budget_bytes)} available: turn on "
                                  f"model.grad_checkpointing, model.attn_backend=sequential, a higher ZeRO stage "
                                  f"or offload")
            micro = options[-1]
        else:
            micro = stage.micro_batch
            if per_rank % micro:
                raise ConfigError(f"{where}: micro_batch {micro} does not divide the {per_rank} images per rank of "
                                  f"train.global_batch_size={global_batch}: pick a divisor, or auto")
            if even_micro_batch and micro % 2:
                raise ConfigError(f"{where}: micro_batch {micro} is odd but mixup/cutmix mix pairs of images: use "
                                  f"an even micro_batch, or finetune.mixup=0 finetune.cutmix=0")
            if micro > fits:
                needed = estimate_memory(model_args, micro_batch=micro, **shape).total_bytes
                raise ConfigError(f"{where}: micro_batch {micro} needs {format_bytes(needed)} per device, "
                                  f"{format_bytes(budget_bytes)} available: use micro_batch: auto (fits {fits}) "
                                  f"or turn on model.grad_checkpointing")
        memory = estimate_memory(model_args, micro_batch=micro, **shape).total_bytes
        steps_per_epoch = max(1, samples_per_rank // per_rank)
        plans.append(StagePlan(index=i, img_size=stage.img_size, window_size=stage.window_size, micro_batch=micro,
                               grad_accum_steps=per_rank // micro, start_step=start, end_step=start + steps,
                               epochs=steps / steps_per_epoch, lr_factor=(stage.lr or cfg.optim.lr) / cfg.optim.lr,
                               memory_bytes=memory, budget_bytes=budget_bytes))
        start += steps
    return plans


def _compress(lengths: list[int], max_steps: int) -> list[int]:
    """Scale stage lengths to add up to `max_steps` (0: unchanged); every stage keeps at least one step."""
    if not max_steps or max_steps == sum(lengths):
        return lengths
    if max_steps < len(lengths):
        raise ConfigError(f"train.max_steps={max_steps} is fewer than the {len(lengths)} stages: give each at least 1")
    total = sum(lengths)
    scaled = [max(1, round(n * max_steps / total)) for n in lengths]
    scaled[-1] = max(1, max_steps - sum(scaled[:-1]))
    while sum(scaled) > max_steps:  # rounding up in early stages overshot: take it back from the longest
        scaled[scaled.index(max(scaled))] -= 1
    return scaled


def stage_of(plans: list[StagePlan], step: int) -> int:
    """Index of the stage that the optimizer step after `step` completed steps belongs to (last if done)."""
    return next((p.index for p in plans if step < p.end_step), plans[-1].index)
