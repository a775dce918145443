"""SimMIM pretraining as a task: masked images in, reconstruction loss out, a reconstruction grid to look at.

Settings come from the config's `simmim:` section (mask patch size and ratio, target normalisation).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import data
from models.simmim import local_statistics
from scale.tasks.base import Task, apply_runtime_switches, device_images


class SimMIMTask(Task):
    """SimMIM (Xie et al., arXiv:2111.09886) on a SwinV2 encoder."""

    name = "simmim"

    def __init__(self, cfg: Any, info: Any, log: Callable[[str], None] = print) -> None:
        super().__init__(cfg, info, log)
        m, s = cfg.model, cfg.simmim
        self.transform = data.SimMIMTransform(m.img_size, mask_patch_size=s.mask_patch_size,
                                              model_patch_size=m.patch_size, mask_ratio=s.mask_ratio)
        # kept on the device, so no step copies them
        self.mean = torch.tensor(self.transform.mean, dtype=torch.float32, device=info.device)
        self.std = torch.tensor(self.transform.std, dtype=torch.float32, device=info.device)

    def build_model(self) -> nn.Module:
        import models

        model = models.build_simmim(self.cfg.model.name, norm_target_patch_size=self.cfg.simmim.norm_target_patch_size,
                                    **self.cfg.model.build_args())
        apply_runtime_switches(model.encoder, self.cfg.model)
        return model

    def train_transform(self) -> Callable:
        return self.transform

    def inputs(self, batch: dict[str, Any], engine: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = device_images(batch["image"], engine, self.mean, self.std)
        return images, batch["mask"].to(engine.info.device, non_blocking=True)

    def model_args(self) -> dict[str, Any]:
        return {**super().model_args(), "norm_target_patch_size": self.cfg.simmim.norm_target_patch_size}

    def reconstruct(self, engine: Any, batch: dict[str, Any], num_images: int) -> tuple[torch.Tensor, ...]:
        """(images, mask, prediction) for the first `num_images` of `batch`. Collective under ZeRO-3."""
        images, mask = self.inputs({k: batch[k][:num_images] for k in ("image", "mask")}, engine)
        with engine.evaluating() as module:
            prediction = module.reconstruct(images, mask)
        return images, mask, prediction

    def draw(self, engine: Any, step: int, batch: dict[str, Any], logger: Any) -> None:
        images, mask, prediction = self.reconstruct(engine, batch, self.cfg.log.num_images)
        prediction = denormalize_prediction(prediction, images, self.cfg.simmim.norm_target_patch_size)
        grid = reconstruction_grid(images, mask, prediction, self.transform.mean, self.transform.std)
        logger.image(step, "simmim/input_masked_reconstruction", grid)


def denormalize_prediction(prediction: torch.Tensor, images: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """Map a prediction made against per-pixel normalised targets back to the input's space, for display.

    With target normalisation on (SimMIM's SwinV2 recipe), the decoder predicts
    (x - local mean) / local std over a `patch_size` window, so shown as-is it is a flat grey.
    Here the window statistics come from the full input, as SimMIM's own visualisations do.
    """
    if patch_size is None:
        return prediction
    mean, var = local_statistics(images.detach().float(), patch_size)
    return prediction.detach().float() * (var + 1e-6).sqrt() + mean


def reconstruction_grid(images: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, mean: list[float],
                        std: list[float], seen: torch.Tensor | None = None) -> torch.Tensor:
    """(3, rows*H, 3*W) grid: per row input | masked input | reconstruction, de-normalised to [0, 1].

    Args:
        images: (B, 3, H, W) normalised inputs.
        mask: (B, h, w) with 1 = masked patch (any patch size dividing H).
        recon: (B, 3, H, W) predicted pixels in the same normalised space.
        seen: (B, 3, H, W) normalised input the model saw, for the middle column (SiT's corrupted views);
            None: the input, grey where masked (SimMIM replaces those patches by a learned token).
    """
    images, recon = images.detach().float().cpu(), recon.detach().float().cpu()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    scale = images.shape[-1] // mask.shape[-1]
    pixel_mask = mask.detach().float().cpu().repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(1)
    shown = images * s + m
    if seen is None:
        masked = shown * (1 - pixel_mask) + 0.5 * pixel_mask  # grey where the model had to guess
    else:
        masked = seen.detach().float().cpu() * s + m
    # show the model's guess only in masked patches, the visible pixels as they were
    recon = (recon * s + m) * pixel_mask + shown * (1 - pixel_mask)
    rows = [torch.cat([a, b, c], dim=-1) for a, b, c in zip(shown, masked, recon)]  # each (3, H, 3W)
    return torch.cat(rows, dim=-2).clamp(0, 1)
