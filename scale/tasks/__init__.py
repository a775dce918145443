"""Training tasks: each supplies what is specific to it, the engine and the loops in `run_*.py` do the rest.

A task (see `base.Task`) builds its module, whose forward returns the loss; makes the transform;
turns a batch into the module's inputs; may hook after each optimizer step, draw what deserves a
picture, evaluate, and keep extra state in checkpoints. Nothing in `scale/` outside this package
names a task; `build_task` picks one by name.
"""
from __future__ import annotations

from typing import Any

from scale.tasks.base import Task

__all__ = ["Task", "build_task", "TASKS"]


def _simmim() -> type[Task]:
    from scale.tasks.simmim import SimMIMTask
    return SimMIMTask


def _classification() -> type[Task]:
    from scale.tasks.classification import ClassificationTask
    return ClassificationTask


def _moby() -> type[Task]:
    from scale.tasks.moby import MoBYTask
    return MoBYTask


def _esvit() -> type[Task]:
    from scale.tasks.esvit import EsViTTask
    return EsViTTask


def _sit() -> type[Task]:
    from scale.tasks.sit import SiTTask
    return SiTTask


# Imported on use: a task's module pulls in its model and data code.
TASKS = {"simmim": _simmim, "classification": _classification, "moby": _moby, "esvit": _esvit, "sit": _sit}


def build_task(name: str, cfg: Any, info: Any, log: Any = print) -> Task:
    """The task registered as `name`, configured by the run's config tree."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(TASKS)}")
    return TASKS[name]()(cfg, info, log)
