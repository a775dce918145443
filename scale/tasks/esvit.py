"""EsViT pretraining as a task: DINO's multi-crop, fp32 centres, a teacher temperature warmup, frozen prototypes.

Settings come from the config's `esvit:` section; the backbone is `model.name` (a SwinV2: the local
crops go through the same student at their own size). Epoch counts of the section (teacher
temperature warmup, prototype freezing) become optimizer steps as the LR schedule's epochs do,
so a run shortened with `train.max_steps` compresses them alike.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

import data
from scale.param_groups import build_param_groups
from scale.tasks.teacher_student import TeacherStudentTask

PROTOTYPES = ("prototypes", "scale")  # the heads' last layer (DINO's `last_layer`), frozen at first


class EsViTTask(TeacherStudentTask):
    """EsViT (Li et al., arXiv:2106.09785)."""

    name = "esvit"
    feature_prefix = "teacher.encoder."  # EsViT evaluates the teacher (its eval_linear.py and eval_knn.py)

    def make_transform(self) -> Any:
        s = self.section
        return data.MultiCropTransform(self.cfg.model.img_size, s.local_crops_size, s.local_crops,
                                       global_scale=s.global_crops_scale, local_scale=s.local_crops_scale,
                                       grayscale=s.grayscale_prob)

    def image_keys(self) -> list[str]:
        return ["global0", "global1", *(f"local{i}" for i in range(self.section.local_crops))]

    def build_method(self) -> nn.Module:
        from models.esvit import build_esvit

        s = self.section
        return build_esvit(self.cfg.model.name, out_dim=s.out_dim, dense_out_dim=s.dense_out_dim,
                           hidden_dim=s.hidden_dim, bottleneck_dim=s.bottleneck_dim,
                           norm_last_layer=s.norm_last_layer, region_loss=s.region_loss,
                           student_temp=s.student_temp, **self.cfg.model.backbone_args())

    def attach_state(self, module: nn.Module) -> None:
        from models.esvit import Centers

        s = self.section
        dims = {"head": s.out_dim, **({"dense_head": s.dense_out_dim} if s.region_loss else {})}
        module.centers = Centers(dims, s.center_momentum, self.info.device)

    def extra_state(self) -> dict[str, Any]:
        return {"centers": self.module.centers.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.module.centers.load_state_dict(state["centers"])

    def steps(self, epochs: float) -> int:
        """Optimizer steps in `epochs` epochs: the run's steps per epoch as the LR schedule counts them.

        The loader's length is not the task's to know; total_steps / train.epochs is what the LR
        schedule maps its epochs with, also when train.max_steps compresses the run.
        """
        return round(epochs * self.total_steps / self.cfg.train.epochs)

    def teacher_temp(self, step: int) -> float:
        """DINO's teacher temperature before optimizer step `step + 1`: a linear warmup, then constant."""
        s = self.section
        warmup = self.steps(s.warmup_teacher_temp_epochs)
        if step >= warmup:
            return s.teacher_temp
        return s.warmup_teacher_temp + (s.teacher_temp - s.warmup_teacher_temp) * step / warmup

    def before_step(self, engine: Any, step: int) -> None:
        self.module.teacher_temp = self.teacher_temp(step)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The usual decay groups, each split off its prototype layers, which train at LR 0 at first.

        DINO zeroes the last layer's gradients in its first epoch instead (`cancel_gradients_last_layer`),
        which under ZeRO-3 would edit nothing (`p.grad` is None there); an LR of 0 keeps the weights
        alike, though AdamW's moments already see those gradients.
        """
        frozen_steps = self.steps(self.section.freeze_last_layer_epochs)
        prototypes = {id(p) for name, p in model.named_parameters()
                      if name.split(".")[0] in ("head", "dense_head") and name.split(".")[-1] in PROTOTYPES}
        groups = []
        for group in build_param_groups(model, self.cfg.optim.weight_decay):
            for frozen in (False, True):
                params = [p for p in group["params"] if (id(p) in prototypes) == frozen]
                if params:
                    groups.append({**group, "params": params, **({"frozen_steps": frozen_steps} if frozen else {})})
        return groups

    def scalars(self) -> dict[str, float]:
        return {**super().scalars(), "esvit/teacher_temp": self.module.teacher_temp,
                "esvit/student_temp": self.section.student_temp}

    def flops_per_image(self, model: nn.Module) -> int:
        from models.backbones import backbone_flops
        from models.esvit import dino_head_flops

        def crop(size: int) -> int:  # encoder, view head on the pooled feature, region head on every final token
            tokens = math.prod(model.encoder.stage_resolutions((size, size))[-1])
            dense = tokens * dino_head_flops(model.dense_head) if self.section.region_loss else 0
            return backbone_flops(model.encoder, size) + dino_head_flops(model.head) + dense

        # every crop through the student (x3 for backward, by the metrics), the two globals through the teacher
        s = self.section
        return round(2 * crop(self.cfg.model.img_size) * (1 + 1 / 3) + s.local_crops * crop(s.local_crops_size))
