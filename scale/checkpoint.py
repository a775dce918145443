"""Checkpoints: DeepSpeed's sharded save plus our per-rank trainer state, rotation and auto-resume.

Layout under `<output_dir>/checkpoints/`::

    step_00001000/                 one tag = one optimizer step
        ... DeepSpeed files (model + optimizer shards of every rank)
        trainer_rank00000.pt       this rank's RNG states and data-loader position
        meta.json                  step, model args, resolved config (read by `scale.export`)
        COMPLETE                   written last, after every rank finished: marks a usable checkpoint

DeepSpeed keeps `client_state` only from rank 0, but RNG streams and loader positions differ per
rank, so each rank writes its own small file. A crash during a save leaves a tag without
`COMPLETE`; `resume=auto` skips it and rotation deletes it. The directory must be on a
filesystem every rank sees (shared storage on multi-node jobs), since rank 0 marks and rotates.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from scale.config import CheckpointConfig, ConfigError

COMPLETE = "COMPLETE"
META = "meta.json"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    """Checkpoint tag of an optimizer step; zero-padded so names sort by step."""
    return f"{TAG_PREFIX}{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags under `ckpt_dir` that finished saving, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE).exists())


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """Resolve an output dir, a checkpoints dir or one tag dir to (checkpoints dir, tag).

    Raises ConfigError when there is no complete checkpoint there.
    """
    path = Path(path)
    if (path / COMPLETE).exists():
        return path.parent, path.name
    for candidate in (path, path / "checkpoints"):
        tags = complete_tags(candidate)
        if tags:
            return candidate, tags[-1]
    raise ConfigError(f"no complete checkpoint (a step_* folder with a {COMPLETE} file) under {path}")


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The step/model-args/config record saved next to a checkpoint."""
    return json.loads((Path(ckpt_dir) / tag / META).read_text())


class CheckpointManager:
    """Saves every `every_steps` and at the end, keeps the newest `keep_last`, finds what to resume."""

    def __init__(self, cfg: CheckpointConfig, output_dir: str | Path, *, rank: int) -> None:
        self.cfg = cfg
        self.dir = Path(output_dir) / "checkpoints"
        self.rank = rank
        self.last_saved: Path | None = None  # named in the message when a run has to stop
        self.pinned: set[str] = set()  # tags rotation never deletes (the best checkpoint of a fine-tune)

    def due(self, step: int, final: bool) -> bool:
        """Whether to save after `step` optimizer steps."""
        if final:
            return not (self.dir / tag_for(step) / COMPLETE).exists()
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def resolve_resume(self, resume: str) -> tuple[Path, str] | None:
        """`auto`: newest complete checkpoint of this output dir, if any; `none`: None; else a path."""
        if resume.lower() == "none":
            return None
        if resume.lower() == "auto":
            tags = complete_tags(self.dir)
            return (self.dir, tags[-1]) if tags else None
        return find_checkpoint(resume)

    def save(self, engine: Any, step: int, *, client_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it. Returns the tag dir."""
        import deepspeed.comm as dist

        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
        tag_dir = self.dir / tag
        torch.save(rank_state, tag_dir / f"trainer_rank{self.rank:05d}.pt")
        dist.barrier()  # every rank's shards and state are on disk before we call it complete
        if self.rank == 0:
            (tag_dir / META).write_text(json.dumps(meta, indent=1))
            (tag_dir / COMPLETE).write_text(f"{step}\n")
            self._rotate(keep=tag)
        dist.barrier()  # nobody races ahead to a save while rank 0 still deletes
        self.last_saved = tag_dir
        return tag_dir

    def _rotate(self, keep: str) -> None:
        """Delete all but the newest `keep_last` complete tags, and unfinished tags older than `keep`."""
        complete = complete_tags(self.dir)
        doomed = [t for t in complete if t not in self.pinned][:-self.cfg.keep_last]
        doomed += [p.name for p in self.dir.iterdir()
                   if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name < keep and p.name not in complete]
        for name in doomed:
            shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self, engine: Any, ckpt_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: restore model+optimizer into `engine`; return (client_state, this rank's state)."""
        rank_file = Path(ckpt_dir) / tag / f"trainer_rank{self.rank:05d}.pt"
        if not rank_file.exists():
            raise ConfigError(f"{rank_file} is missing: the checkpoint was written by fewer ranks; resume on "
                              f"the same number of ranks (or convert with deepspeed.checkpoint.ds_to_universal)")
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        self.last_saved = Path(ckpt_dir) / tag
        return client_state or {}, rank_state
