"""MoBY pretraining as a task: BYOL's two views, two fp32 key queues, the momentum target encoder.

Settings come from the config's `moby:` section; the backbone is `model.name` (SwinV2, or a timm
ViT/DeiT such as deit_small_patch16_224).
"""
from __future__ import annotations

from typing import Any

from torch import nn

import data
from scale.tasks.teacher_student import TeacherStudentTask


class MoBYTask(TeacherStudentTask):
    """MoBY (Xie et al., arXiv:2105.04553)."""

    name = "moby"

    def make_transform(self) -> Any:
        return data.TwoViewTransform(self.cfg.model.img_size, scale=self.section.crop_scale,
                                      grayscale=self.section.grayscale_prob)

    def image_keys(self) -> list[str]:
        return ["view0", "view1"]

    def build_method(self) -> nn.Module:
        from models.moby import build_moby

        s = self.section
        return build_moby(self.cfg.model.name, proj_dim=s.proj_dim, hidden_dim=s.hidden_dim,
                          temperature=s.temperature, **self.cfg.model.backbone_args())

    def attach_state(self, module: nn.Module) -> None:
        from models.moby import KeyQueues

        # the same seed on every rank: the queues start equal and are only written with gathered keys
        module.queues = KeyQueues(2, self.section.proj_dim, self.section.queue_size, self.cfg.seed, self.info.device)

    def extra_state(self) -> dict[str, Any]:
        return {"queues": self.module.queues.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.module.queues.load_state_dict(state["queues"])

    def scalars(self) -> dict[str, float]:
        return {**super().scalars(), "moby/temperature": self.section.temperature}

    def flops_per_image(self, model: nn.Module) -> int:
        from models.backbones import backbone_flops

        # two views through the online encoder (x3 for backward, by the metrics) and the target (forward only)
        return round(2 * backbone_flops(model.encoder, self.cfg.model.img_size) * (1 + 1 / 3))
