"""The training loop every entry point shares: optimizer steps with guards, metrics, checkpoints, pictures.

`Trainer` owns what a run keeps across steps (the step count, the non-finite guard, the
checkpoint manager, the logger) and what goes into a checkpoint: DeepSpeed's model and
optimizer shards, the schedule, the counters and whatever the run script puts in `run_state`
(rank 0's copy), plus per rank the RNG streams, the loader position and the task's own state.
`run_pretrain.py` calls `train` once; `run_finetune.py` once per resolution stage.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from scale.checkpoint import UNIVERSAL_SUFFIX, CheckpointManager
from scale.dist import DistInfo, rng_state, seed_everything, set_rng_state
from scale.engine import Engine, NonFiniteGuard
from scale.lr_schedule import LRSchedule
from scale.metrics import MetricsProcessor, build_logger
from scale.preemption import STOP, Preempted
from scale.tasks.base import Task


class Trainer:
    """Steps an `Engine` on batches of a `data.ShardLoader` for a `Task`; saves and restores the whole run."""

    def __init__(self, cfg: Any, task: Task, engine: Engine, info: DistInfo,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.task, self.engine, self.info, self.log = cfg, task, engine, info, log
        self.ckpt = CheckpointManager(cfg.checkpoint, cfg.output_dir, rank=info.rank)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_in_row)
        self.logger = build_logger(cfg.output_dir, is_main=info.is_main, tensorboard=cfg.log.tensorboard)
        self.step = 0
        self.loader: Any = None  # the loader being trained on; its position goes into checkpoints
        self.schedule: LRSchedule | None = None
        self.run_state: dict[str, Any] = {}  # the run script's own progress (stage, results), kept in checkpoints
        self.saved_schedule: dict[str, Any] | None = None  # the resumed checkpoint's LR curve
        task.setup(engine)

    def resume(self, resume: str) -> dict[str, Any] | None:
        """Restore the checkpoint `resume` names (auto | none | path). Returns this rank's state, None if fresh.

        Collective. The caller restores the loader position from the returned `["loader"]` once it
        has built the loader the checkpoint was taken on.
        """
        found = self.ckpt.resolve_resume(resume)
        if found is None:
            return None
        client, rank_state = self.ckpt.load(self.engine.engine, *found)
        self.step = client["step"]
        self.guard.total, self.engine.overflow_skips = client["nonfinite_skips"], client["overflow_skips"]
        self.run_state = client.get("run_state", {})
        self.saved_schedule = client["schedule"]
        self.task.load_state_dict(rank_state.get("task", {}))
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])  # drop path continues the exact random stream
        else:
            # Another world size: the old ranks' streams have no counterpart; each new rank gets its own
            # stream from (seed, step, rank), so a resume at the same point draws the same numbers again.
            seeds = np.random.SeedSequence([self.cfg.seed, self.step, self.info.rank])
            seed_everything(int(seeds.generate_state(1)[0]))
            universal = f"{found[0]}/{found[1]}{UNIVERSAL_SUFFIX}"
            self.log(f"elastic resume: checkpoint written by {len(rank_state['loaders'])} ranks, resuming on "
                     f"{self.info.world_size}: converted to a universal checkpoint ({universal})")
        self.log(f"resumed from {found[0]}/{found[1]} at step {self.step}")
        return rank_state

    def restore_loader(self, loader: Any, rank_state: dict[str, Any]) -> None:
        """Put `loader` at the resumed checkpoint's data position (re-cut for this world size if it changed)."""
        if "loaders" not in rank_state:
            loader.load_state_dict(rank_state["loader"])
            return
        dropped = loader.load_elastic_states(rank_state["loaders"])
        self.log(f"elastic resume: the rest of epoch {loader.epoch} re-split over {self.info.world_size} rank(s), "
                 f"{dropped} sample(s) dropped to keep the shares equal")

    def check_schedule(self, schedule: LRSchedule) -> None:
        """Say so when the resumed run's LR curve differs from the one the checkpoint was trained with."""
        if self.saved_schedule is not None and self.saved_schedule != schedule.state_dict():
            self.log(f"note: the LR schedule differs from the checkpoint's ({self.saved_schedule})")

    def save(self) -> Path:
        """Checkpoint the run at the current step. Collective."""
        model_args = self.task.model_args()
        return self.ckpt.save(
            self.engine.engine, self.step,
            client_state={"step": self.step, "schedule": self.schedule.state_dict() if self.schedule else {},
                          "nonfinite_skips": self.guard.total, "overflow_skips": self.engine.overflow_skips,
                          "run_state": self.run_state},
            rank_state={"rng": rng_state(), "loader": self.loader.state_dict() if self.loader else None,
                        "task": self.task.state_dict()},
            meta={"step": self.step, "config": self.cfg.to_dict(), "model_args": model_args,
                  "world_size": self.info.world_size})

    def save_if_new(self) -> None:
        """Checkpoint the current step unless a complete checkpoint of it exists (a resumed, finished run)."""
        if self.ckpt.due(self.step, final=True):
            self.save()

    def train(self, loader: Any, schedule: LRSchedule, metrics: MetricsProcessor, until: int) -> None:
        """Optimizer steps until `self.step == until`: LR per group, accumulation, guards, logs, checkpoints.

        Saves every `checkpoint.every_steps` before `until`; the caller saves at `until` (`save_if_new`).

        Raises NonFiniteLossError when too many steps in a row were non-finite, and Preempted after
        saving when a stop signal reached any rank (see scale/preemption.py); a stop agreed at `until`
        is left to the caller's save there and to the next `train`.
        """
        import deepspeed.comm as dist

        engine, task = self.engine, self.task
        self.loader, self.schedule = loader, schedule
        task.total_steps = schedule.total_steps
        batches = loader.forever()
        batch = None
        while self.step < until:
            lr = schedule.apply(engine.param_groups, self.step)  # per group: keeps each group's lr_scale
            task.before_step(engine, self.step)
            losses, extras = [], {}
            while len(losses) < engine.grad_accum_steps:
                t0 = time.perf_counter()
                batch = next(batches)
                metrics.data_wait(time.perf_counter() - t0)
                result = engine.micro_step(task.inputs(batch, engine))
                loss = result.loss  # None: non-finite somewhere, skipped
                self.guard.update(loss is not None, step=self.step + 1, last_checkpoint=self.ckpt.last_saved)
                if loss is not None:
                    losses.append(loss)
                    for key, value in result.extras.items():
                        extras[key] = extras.get(key, 0.0) + value / engine.grad_accum_steps
            self.step += 1
            task.after_optimizer_step(engine, self.step)
            metrics.nonfinite_skips, metrics.overflow_skips = self.guard.total, engine.overflow_skips
            # skipped samples of all ranks, for the log line, and every rank's stop signals: all ranks read
            # the same sums after the same step, so they agree on where to stop whenever the signals came
            status = torch.tensor([float(sum(loader.corrupt_counts().values())), *STOP.votes()],
                                  device=self.info.device)
            dist.all_reduce(status)
            corrupt, *stop_votes = status.tolist()
            metrics.step_done(self.step, loss=sum(losses) / len(losses), lr=lr, grad_norm=engine.grad_norm(),
                              corrupt=int(corrupt), extras={**extras, **task.scalars()})
            stopping = self.step < until and stop_votes[0] > 0
            if self.step < until and (stopping or self.ckpt.due(self.step, final=False)):
                saved = self.save()  # the step `until` is the caller's to save, after what it does there (eval)
            if stopping:
                raise Preempted(self.step, str(saved), STOP.describe(stop_votes), requeue=stop_votes[1] > 0)
            if self.step == until or self.step % self.cfg.log.image_every_steps == 0:
                task.draw(engine, self.step, batch, self.logger)
            metrics.restart_clock()  # checkpoint and image time is not step time

    def close(self) -> None:
        """Flush the logs."""
        self.logger.close()
