"""What MoBY, EsViT and SiT share as tasks: views in, an EMA teacher, fp32 state of their own in checkpoints.

A method's module holds a `student` (the modules that train) and a `teacher` of the same names and
shapes (frozen), both inside the one engine so ZeRO-3 shards them alike; `MomentumTeacher` (scale/ema.py)
moves the teacher towards the student in fp32 after every optimizer step, at a momentum that rises
from the method's base value to 1 on a cosine over the run's optimizer steps (never per micro-step).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from scale.ema import MomentumTeacher, cosine_momentum
from scale.tasks.base import Task, apply_runtime_switches, device_images


class TeacherStudentTask(Task):
    """Base of the self-supervised methods with a momentum teacher. `section` is the method's config section."""

    def __init__(self, cfg: Any, info: Any, log: Callable[[str], None] = print) -> None:
        super().__init__(cfg, info, log)
        self.section = getattr(cfg, self.name)
        self.transform = self.make_transform()
        self.mean = torch.tensor(self.transform.mean, dtype=torch.float32, device=info.device)
        self.std = torch.tensor(self.transform.std, dtype=torch.float32, device=info.device)
        self.teacher: MomentumTeacher | None = None
        self.module: nn.Module | None = None
        self.momentum = self.section.momentum

    # ---- what each method supplies
    def make_transform(self) -> Any:
        """The method's view transform (`data.views`)."""
        raise NotImplementedError

    def build_method(self) -> nn.Module:
        """The method's module (student, teacher, heads), its loss computed in forward."""
        raise NotImplementedError

    def image_keys(self) -> list[str]:
        """Batch keys holding images, in the order of the module's forward arguments."""
        raise NotImplementedError

    def attach_state(self, module: nn.Module) -> None:
        """Give the module its fp32 state that must not live in the engine (queues, centres)."""

    def extra_state(self) -> dict[str, Any]:
        """That state, for checkpoints (equal on every rank)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    # ---- the Task interface
    def build_model(self) -> nn.Module:
        module = self.build_method()
        apply_runtime_switches(module.student["encoder"], self.cfg.model)
        return module

    def setup(self, engine: Any) -> None:
        self.module = engine.module
        self.teacher = MomentumTeacher(engine, engine.module.student, engine.module.teacher)
        self.attach_state(engine.module)

    def train_transform(self) -> Callable:
        return self.transform

    def inputs(self, batch: dict[str, Any], engine: Any) -> tuple:
        return tuple(device_images(batch[k], engine, self.mean, self.std) for k in self.image_keys())

    def after_optimizer_step(self, engine: Any, step: int) -> None:
        self.momentum = cosine_momentum(self.section.momentum, step, self.total_steps)
        self.teacher.update(self.momentum)

    def scalars(self) -> dict[str, float]:
        return {f"{self.name}/teacher_momentum": self.momentum}

    def model_args(self) -> dict[str, Any]:
        """The backbone's build arguments, the method, and which weights evaluation reads (`feature_prefix`)."""
        return {"name": self.cfg.model.name, **self.cfg.model.backbone_args(), "kind": self.name,
                "feature_prefix": self.feature_prefix}

    feature_prefix = "encoder."  # the weights `scale.evaluate` takes as the backbone (state-dict prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "momentum": self.momentum, **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.teacher.load_state_dict(state["teacher"])
        self.momentum = state["momentum"]
        self.load_extra_state(state)
