"""SimMIM: masked image modeling with a SwinV2 encoder and a one-layer linear decoder.

Paper: `SimMIM: A Simple Framework for Masked Image Modeling`, https://arxiv.org/abs/2111.09886

Masked patches are replaced by a learned token right after the patch embedding, every
token goes through the encoder, and a 1x1 conv + PixelShuffle predicts raw pixels; the
loss is L1 on masked pixels only. The SwinV2 recipe normalises the target per pixel over
a 47x47 neighbourhood (`norm_target_patch_size=47`).
"""
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .swin_transformer_v2 import SwinTransformerV2, build_model

__all__ = ["SimMIM", "build_simmim", "local_statistics", "normalize_targets", "pixel_decoder"]


def local_statistics(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and unbiased variance of each patch_size^2 neighbourhood, cut at the border.

    Padding does not count, as in the SwinV2 SimMIM recipe.
    """
    pad = patch_size // 2
    mean = F.avg_pool2d(images, patch_size, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(images ** 2, patch_size, stride=1, padding=pad, count_include_pad=False)
    count = F.avg_pool2d(torch.ones_like(images[:, :1]), patch_size, stride=1, padding=pad,
                         count_include_pad=True) * patch_size ** 2
    var = ((mean_sq - mean ** 2) * count / (count - 1).clamp(min=1)).clamp(min=0)
    return mean, var


def normalize_targets(targets: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Standardise each pixel by the `local_statistics` of its patch_size^2 neighbourhood."""
    mean, var = local_statistics(targets, patch_size)
    return (targets - mean) / (var + 1e-6).sqrt()


def pixel_decoder(dim: int, stride: int, in_chans: int = 3, device=None, dtype=None) -> nn.Sequential:
    """SimMIM's one-layer decoder: (B, dim, h, w) tokens -> (B, in_chans, h*stride, w*stride) pixels.

    A 1x1 conv gives each token its stride x stride patch of pixels, PixelShuffle lays the patches out.
    """
    return nn.Sequential(nn.Conv2d(dim, stride ** 2 * in_chans, kernel_size=1, device=device, dtype=dtype),
                         nn.PixelShuffle(stride))


class SimMIM(nn.Module):
    """SwinV2 encoder + mask token + linear pixel decoder; `forward(images, mask)` is the loss."""

    def __init__(self, encoder: SwinTransformerV2, norm_target_patch_size: Optional[int] = None,
                 device=None, dtype=None) -> None:
        """Args:
            encoder: a SwinV2 built with num_classes=0.
            norm_target_patch_size: odd neighbourhood for per-pixel target normalisation, None for raw pixels.
        """
        super().__init__()
        if norm_target_patch_size is not None and (norm_target_patch_size < 1 or norm_target_patch_size % 2 == 0):
            raise ValueError(f"norm_target_patch_size={norm_target_patch_size} must be an odd number >= 1 or None")
        self.encoder = encoder
        self.norm_target_patch_size = norm_target_patch_size
        self.patch_size = encoder.patch_size
        self.encoder_stride = encoder.patch_size * 2 ** (len(encoder.depths) - 1)
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.embed_dim, device=device, dtype=dtype))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        self.decoder = pixel_decoder(encoder.num_features, self.encoder_stride, self.in_chans, device=device,
                                     dtype=dtype)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images and (B, H/p, W/p) mask (1 = masked) -> (B, 3, H, W) predicted pixels."""
        if mask.shape[-2:] != (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size):
            raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)} at patch "
                             f"size {self.patch_size}: it must be (B, H/{self.patch_size}, W/{self.patch_size})")

        def insert_mask_token(tokens: torch.Tensor) -> torch.Tensor:  # (B, H/p, W/p, C)
            w = mask.unsqueeze(-1).to(tokens.dtype)
            return tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w

        tokens = self.encoder.forward_tokens(images, insert_mask_token)  # B, h, w, C
        return self.decoder(tokens.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar L1 loss over masked pixels, divided by (masked pixels * channels), computed in fp32."""
        prediction = self.reconstruct(images, mask).float()
        # targets in fp32 even in bf16 training: the local variance is a difference of two close
        # means, which bf16 cancels to noise on flat regions
        targets = images.float()
        if self.norm_target_patch_size is not None:
            targets = normalize_targets(targets, self.norm_target_patch_size)
        pixel_mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        pixel_mask = pixel_mask.unsqueeze(1).float()  # B, 1, H, W
        loss = F.l1_loss(targets, prediction, reduction="none")
        return (loss * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans

    def set_grad_checkpointing(self, enable: bool = True, offload_to_cpu: bool = False) -> None:
        """Activation checkpointing of the encoder's blocks (see SwinTransformerV2)."""
        self.encoder.set_grad_checkpointing(enable, offload_to_cpu)

    def no_weight_decay(self) -> set[str]:
        """Name keywords of parameters trained without weight decay (1-D parameters come on top)."""
        return self.encoder.no_weight_decay() | {"mask_token"}

    @property
    def num_layers(self) -> int:
        """Depth groups of layer-wise LR decay, the encoder's (see SwinTransformerV2.num_layers)."""
        return self.encoder.num_layers

    def layer_id(self, param_name: str) -> int:
        """Layer-wise LR decay group: the encoder's for `encoder.*`, 0 for the mask token, last for the decoder."""
        if param_name.startswith("encoder."):
            return self.encoder.layer_id(param_name.removeprefix("encoder."))
        if param_name == "mask_token":
            return 0  # it replaces patch embeddings, so it sits with them
        if param_name.startswith("decoder."):
            return self.num_layers - 1
        raise ValueError(f"{param_name!r} is not a SimMIM parameter name (encoder.*, mask_token, decoder.*)")


def build_simmim(name: str, norm_target_patch_size: Optional[int] = None, **overrides: Any) -> SimMIM:
    """SimMIM around the registered SwinV2 `name`; overrides go to the encoder (num_classes is 0)."""
    if overrides.get("num_classes", 0) != 0:
        raise ValueError("num_classes must be 0 for a SimMIM encoder (it has no classifier head)")
    overrides["num_classes"] = 0
    encoder = build_model(name, **overrides)
    return SimMIM(encoder, norm_target_patch_size, device=overrides.get("device"), dtype=overrides.get("dtype"))
