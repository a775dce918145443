"""SiT v3 pretraining as a task: BYOL's two views with GMML block corruption, the momentum teacher.

Settings come from the config's `sit:` section; the backbone is `model.name` (SwinV2, or a timm ViT
such as vit_small_patch16_224, SiT's own). The loader gives clean uint8 views and the corruption
masks; the corruption itself is applied by the module on the device, after normalisation.
"""
from __future__ import annotations

from typing import Any

from torch import nn

import data
from scale.tasks.simmim import reconstruction_grid
from scale.tasks.teacher_student import TeacherStudentTask

MASK_KEYS = ("corrupt0", "corrupt1", "replace")  # after the views, in the module's argument order


class SiTTask(TeacherStudentTask):
    """SiT (Atito et al., arXiv:2104.03602v3)."""

    name = "sit"

    def make_transform(self) -> Any:
        s = self.section
        return data.CorruptedViewsTransform(self.cfg.model.img_size, scale=s.crop_scale, drop_perc=s.drop_perc,
                                            drop_max_block=s.drop_max_block, drop_align=s.drop_align,
                                            replace_prob=s.replace_prob, replace_perc=s.replace_perc,
                                            grayscale=s.grayscale_prob)

    def image_keys(self) -> list[str]:
        return ["view0", "view1"]

    def inputs(self, batch: dict[str, Any], engine: Any) -> tuple:
        device = engine.info.device
        return (*super().inputs(batch, engine), *(batch[k].to(device, non_blocking=True) for k in MASK_KEYS))

    def build_method(self) -> nn.Module:
        from models.sit import build_sit

        s = self.section
        return build_sit(self.cfg.model.name, proj_dim=s.proj_dim, hidden_dim=s.hidden_dim,
                         temperature=s.temperature, recon_weight=s.recon_weight, decoder_depth=s.decoder_depth,
                         **self.cfg.model.backbone_args())

    def draw(self, engine: Any, step: int, batch: dict[str, Any], logger: Any) -> None:
        keys = (*self.image_keys(), *MASK_KEYS)
        view0, _, corrupt0, _, replace = self.inputs({k: batch[k][:self.cfg.log.num_images] for k in keys}, engine)
        # the encoder too: a ViT reads its class token and position embedding outside any forward() here
        with engine.evaluating(engine.module.encoder) as module:
            corrupted, prediction = module.reconstruct(view0, corrupt0, replace)
        grid = reconstruction_grid(view0, corrupt0, prediction, self.transform.mean, self.transform.std,
                                   seen=corrupted)
        logger.image(step, "sit/clean_corrupted_reconstruction", grid)

    def flops_per_image(self, model: nn.Module) -> int:
        from models.backbones import backbone_flops

        # two views through the student encoder (x3 for backward, by the metrics) and the teacher (forward only)
        return round(2 * backbone_flops(model.encoder, self.cfg.model.img_size) * (1 + 1 / 3))
