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

import argparse
import json
import os
import pickle
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


def damaged(tag_dir: Path, problem: str) -> ConfigError:
    """The one-line error for a checkpoint marked COMPLETE whose files were damaged afterwards."""
    return ConfigError(f"checkpoint {tag_dir} is damaged ({problem}): resume from an older one with "
                       f"resume=<older step_* folder>, or delete {tag_dir} so resume=auto takes the previous one")


def load_trainer_file(path: Path) -> dict[str, Any]:
    """A trainer_rank file, loaded weights-only so a copied run folder cannot run code through it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise damaged(path.parent, f"{path.name} holds objects other than tensors and plain data, refused "
                                   f"unread: {str(e).splitlines()[0][:120]}") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise damaged(path.parent, f"{path.name} unreadable: {str(e).splitlines()[0][:120]}") from None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        try:
            return find_checkpoint(resume)
        except ConfigError as e:
            raise ConfigError(f"resume={resume}: {e}; pass resume=auto, resume=none or a run/step_* folder") from None

    def save(self, engine: Any, step: int, *, client_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it. Returns the tag dir."""
        import deepspeed.comm as dist

        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0 and tag_dir.is_dir() and not (tag_dir / COMPLETE).exists():
            shutil.rmtree(tag_dir)  # left by a crash mid-save: stale shards must not mix into the new save
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
        torch.save(rank_state, tag_dir / f"trainer_rank{self.rank:05d}.pt")
        dist.barrier()  # every rank's shards and state are on disk before we call it complete
        if self.rank == 0:
            write_atomic(tag_dir / META, json.dumps(meta, indent=1))  # whole before COMPLETE vouches for it
            write_atomic(tag_dir / COMPLETE, f"{step}\n")
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
        """Collective: restore model+optimizer into `engine`; return (client_state, this rank's state).

        On another world size than the checkpoint's (`engine` built with `with_universal_load`), the
        rank state is `{"loaders": every old rank's loader state, "task": {}}` and holds no RNG streams.
        """
        if engine.load_universal_checkpoint():
            return self._load_elastic(engine, Path(ckpt_dir), tag)
        rank_file = Path(ckpt_dir) / tag / f"trainer_rank{self.rank:05d}.pt"
        rank_state = load_trainer_file(rank_file)  # first: a refused file must stop us before DeepSpeed unpickles
        try:
            load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                             load_lr_scheduler_states=False)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
            raise damaged(Path(ckpt_dir) / tag, f"DeepSpeed: {str(e).splitlines()[0][:160]}") from None
        if load_path is None:
            raise damaged(Path(ckpt_dir) / tag, "DeepSpeed found no model states in it")
        self.last_saved = Path(ckpt_dir) / tag
        return client_state or {}, rank_state

    def _load_elastic(self, engine: Any, ckpt_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """`load` from a checkpoint of another world size, through DeepSpeed's universal format."""
        universal = to_universal(ckpt_dir, tag, rank=self.rank)
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=universal.name,
                                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load universal checkpoint {universal}")
        states = read_rank_states(ckpt_dir, tag)
        self.last_saved = ckpt_dir / tag
        return client_state or {}, {"loaders": [s["loader"] for s in states], "task": {}}


# ---------------------------------------------------------------- elastic resume (another number of ranks)
UNIVERSAL_SUFFIX = "_universal"
CONVERTED = "CONVERTED"  # not COMPLETE: `<tag>_universal` is never a step tag; rotation deletes it as unfinished


def rank_files(ckpt_dir: Path, tag: str) -> list[Path]:
    """The per-rank trainer files of a checkpoint, by rank."""
    return sorted((Path(ckpt_dir) / tag).glob("trainer_rank*.pt"))


def saved_world_size(ckpt_dir: Path, tag: str) -> int:
    """How many ranks wrote a checkpoint (meta.json; older checkpoints: their trainer_rank files)."""
    return read_meta(ckpt_dir, tag).get("world_size") or len(rank_files(ckpt_dir, tag))


def read_rank_states(ckpt_dir: Path, tag: str) -> list[dict[str, Any]]:
    """Every rank's trainer state of a checkpoint, by rank."""
    return [load_trainer_file(f) for f in rank_files(ckpt_dir, tag)]


# what decides the weights' shapes: a checkpoint of another value cannot load (img_size and window can change)
ARCHITECTURE_KEYS = ("name", "patch_size", "embed_dim", "depths", "num_heads")


def check_resumable(ckpt_dir: Path, tag: str, cfg: Any) -> None:
    """ConfigError, before any process group, when `tag` cannot be resumed by a run of `cfg`.

    Every trainer file must load weights-only, and the checkpoint's model must have the config's shapes.
    """
    read_rank_states(ckpt_dir, tag)
    saved = read_meta(ckpt_dir, tag).get("config", {}).get("model", {})
    differ = [f"model.{k}={saved[k]} (config: {getattr(cfg.model, k)})" for k in ARCHITECTURE_KEYS
              if k in saved and saved[k] != getattr(cfg.model, k)]
    if differ:
        raise ConfigError(f"{Path(ckpt_dir) / tag} holds another model: {', '.join(differ)}; set those keys to "
                          f"the checkpoint's values, or start a new output_dir with resume=none")


def check_elastic(ckpt_dir: Path, tag: str, world_size: int) -> bool:
    """Whether resuming `tag` on `world_size` ranks is elastic; ConfigError when its task state forbids it.

    Cheap (reads rank 0's small file), so run scripts call it before building the engine.
    """
    saved = saved_world_size(ckpt_dir, tag)
    if saved == world_size:
        return False
    task = load_trainer_file(rank_files(ckpt_dir, tag)[0]).get("task") or {}
    if task:
        # The fine-tune weight EMA is kept per ZeRO-3 shard: its shards follow no universal format.
        raise ConfigError(f"{ckpt_dir / tag} was written by {saved} ranks and holds per-rank task state "
                          f"({', '.join(task)}) that cannot be re-sharded: resume on {saved} ranks")
    return True


def to_universal(ckpt_dir: Path, tag: str, *, rank: int) -> Path:
    """Collective: DeepSpeed's universal checkpoint of `tag`, converted once by rank 0 (reused if present)."""
    import deepspeed.comm as dist

    out = Path(ckpt_dir) / f"{tag}{UNIVERSAL_SUFFIX}"
    if rank == 0 and not (out / CONVERTED).exists():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a conversion cut short before
        ds_to_universal(argparse.Namespace(input_folder=str(Path(ckpt_dir) / tag), output_folder=str(tmp),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=False))
        (tmp / CONVERTED).write_text(f"{tag}\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # atomic: a folder under this name is a whole conversion
        (out.parent / "latest_universal").write_text(out.name)  # the converter named its temporary folder there
    dist.barrier()
    return out
