"""Image transforms: SimMIM pretraining (crop + token mask), fine-tuning (timm RandAugment), eval, mixup.

Augmentations come from torchvision and timm; only the SimMIM mask generator is our own, because
neither library has it. The SimMIM recipe (Xie et al., arXiv:2111.09886; Microsoft's SimMIM code):
RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3), horizontal flip, ImageNet normalisation, and a
random 60% of 32x32 mask patches, expressed at the model's 4x4 patch granularity. The normalisation
runs on the device (`normalize_images`), so loader workers produce and ship uint8 images.
"""
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torchvision import transforms as T


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class ToUint8Tensor:
    """PIL image -> (3, H, W) uint8 tensor; normalisation is left to `normalize_images` on the device.

    Widening to float in the loader worker cost about a fifth of a sample and made every batch 4x
    larger to pass between processes; uint8 crosses cheaply and one op on the device normalises it.
    """

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Convert one image (any mode) to a CHW uint8 view of HWC memory."""
        arr = np.array(img.convert("RGB") if img.mode != "RGB" else img)  # (H, W, 3) uint8, writable copy
        # No .contiguous(): the batch's torch.stack does the HWC -> CHW move anyway, at a third of the
        # cost of doing it per sample here (measured: 100 vs 280 us per 192px image).
        return torch.from_numpy(arr).permute(2, 0, 1)


def normalize_images(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                     std: Sequence[float] | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> `dtype` normalised with per-channel mean/std given on the 0-1 scale.

    The same values as ToTensor + Normalize (within float rounding). mean/std may already be tensors
    on `images.device`, which saves a host-to-device copy per call.
    """
    # (3, 1, 1) broadcasts over a single image and a batch alike; constants are formed in float32
    # before the cast so a bf16 `dtype` does not round them twice
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1) * 255
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1) * 255
    return (images.to(dtype) - m.to(dtype)) / s.to(dtype)


class MaskGenerator:
    """Random SimMIM mask: `mask_ratio` of the (H/mask_patch)x(W/mask_patch) cells, at model-patch level."""

    def __init__(self, img_size: int | tuple[int, int] = 192, mask_patch_size: int = 32,
                 model_patch_size: int = 4, mask_ratio: float = 0.6):
        h, w = _pair(img_size)
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} is not a multiple of model_patch_size "
                             f"{model_patch_size}: pick a mask_patch_size in "
                             f"{[model_patch_size * k for k in (4, 8, 16)]}")
        for side in (h, w):
            if side % mask_patch_size:
                lo, hi = side // mask_patch_size * mask_patch_size, -(-side // mask_patch_size) * mask_patch_size
                raise ValueError(f"img_size {side} is not a multiple of mask_patch_size {mask_patch_size}: "
                                 f"use img_size {lo or hi} or {hi}, or a mask_patch_size that divides {side}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} must be in [0, 1]")
        self.cells = (h // mask_patch_size, w // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.mask_count = math.ceil(self.cells[0] * self.cells[1] * mask_ratio)

    def __call__(self) -> torch.Tensor:
        """Return a (H/model_patch, W/model_patch) uint8 mask with 1 = masked token."""
        n = self.cells[0] * self.cells[1]
        mask = torch.zeros(n, dtype=torch.uint8)
        mask[torch.randperm(n)[:self.mask_count]] = 1
        mask = mask.view(*self.cells)
        # (cells_h, cells_w) -> (cells_h*scale, cells_w*scale): each cell covers scale x scale tokens
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)


class SimMIMTransform:
    """PIL image -> {"image": (3, H, W) uint8, "mask": (H/model_patch, W/model_patch) uint8, 1 = masked}.

    The image is cropped and flipped but not normalised: the trainer calls
    `normalize_images(batch["image"], transform.mean, transform.std)` on the device.
    `img_size` must be a multiple of `mask_patch_size` (the constructor says which sizes work).
    """

    def __init__(self, img_size: int | tuple[int, int] = 192, mask_patch_size: int = 32,
                 model_patch_size: int = 4, mask_ratio: float = 0.6,
                 scale: tuple[float, float] = (0.67, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
                 interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR):
        self.mean, self.std = tuple(mean), tuple(std)
        self.mask_generator = MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio)
        self.image_transform = T.Compose([
            T.RandomResizedCrop(_pair(img_size), scale=scale, ratio=ratio, interpolation=interpolation),
            T.RandomHorizontalFlip(hflip),
            ToUint8Tensor(),
        ])

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        """Crop and flip `img` (uint8) and draw a fresh mask."""
        return {"image": self.image_transform(img), "mask": self.mask_generator()}


def build_finetune_transform(img_size: int | tuple[int, int] = 224, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                             re_prob: float = 0.25, color_jitter: float = 0.4,
                             interpolation: str = "bicubic", **kwargs) -> T.Compose:
    """timm's training transform with RandAugment and random erasing (the Swin fine-tuning recipe)."""
    return create_transform(_pair(img_size), is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                            re_mode="pixel", re_count=1, color_jitter=color_jitter,
                            interpolation=interpolation, **kwargs)


def build_eval_transform(img_size: int | tuple[int, int] = 224, crop_pct: float = 0.875,
                         interpolation: str = "bicubic", **kwargs) -> T.Compose:
    """Resize to img_size / crop_pct, center-crop img_size, normalise (timm's eval transform)."""
    return create_transform(_pair(img_size), is_training=False, crop_pct=crop_pct,
                            interpolation=interpolation, **kwargs)


def build_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, prob: float = 1.0,
                switch_prob: float = 0.5, label_smoothing: float = 0.1, mode: str = "batch") -> Mixup:
    """timm Mixup/CutMix: `images, targets = mix(images, labels)` with soft (B, num_classes) targets.

    With mixup = cutmix = 0 it still returns label-smoothed one-hot targets, so the training loop
    always uses a soft-target loss and has no mixup branch. The batch size must be even.
    """
    if mixup <= 0 and cutmix <= 0:
        prob = 0.0  # timm asserts if asked to mix with both alphas 0; never mixing is what is meant
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)
