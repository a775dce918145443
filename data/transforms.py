"""Image transforms: SimMIM pretraining (crop + token mask), fine-tuning (timm RandAugment), eval, mixup.

Augmentations come from torchvision and timm. Ours: the SimMIM mask generator, which neither library
has, and the SimMIM crop, whose box and flip torchvision draws but whose resize torch does faster.
The SimMIM recipe (Xie et al., arXiv:2111.09886; Microsoft's SimMIM code):
RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3), horizontal flip, ImageNet normalisation, and a
random 60% of 32x32 mask patches, expressed at the model's 4x4 patch granularity. The normalisation
runs on the device (`normalize_images`), so loader workers produce and ship uint8 images.
"""
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torchvision import transforms as T


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class RandomResizedCropFlipUint8:
    """PIL image -> (3, H, W) uint8 tensor: torchvision's RandomResizedCrop box and flip, resized by torch.

    The crop box and the flip are drawn exactly as `T.RandomResizedCrop` + `T.RandomHorizontalFlip`
    draw them (same calls on torch's global RNG, so the same seed gives the same box and flip). Ours
    because of the resize: torch's vectorised uint8 antialiased interpolate, fed a view of the decoded
    pixels, makes this ~1.5x faster than torchvision's PIL path plus a uint8 conversion (no PIL crop
    image, no separate HWC -> CHW copy). Pixels match PIL's filter of the same box within rounding
    (mean absolute difference ~0.015 levels; a few pixels per image differ by more, up to ~25).

    The result has channels-last strides (a permuted view of HWC memory): `data.loader` stacks such
    images as HWC, a plain copy, into a (B, 3, H, W) batch with channels-last strides; `torch.stack`
    would instead move every image to CHW memory at ~30x the cost.
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: T.InterpolationMode | str = T.InterpolationMode.BILINEAR):
        self.size, self.scale, self.ratio, self.hflip = _pair(size), tuple(scale), tuple(ratio), hflip
        self.mode = getattr(interpolation, "value", interpolation)  # InterpolationMode or its string
        if self.mode not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation {self.mode!r} is not supported: use 'bilinear' or 'bicubic'")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Crop, resize and maybe flip one image (any PIL mode; converted to RGB if needed)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        flip = bool(torch.rand(1) < self.hflip)  # drawn after the box, as RandomHorizontalFlip does
        with warnings.catch_warnings():
            # np.asarray(img) is PIL's own read-only copy of the pixels and nothing writes to it: copying
            # it again only to silence torch's warning would cost more than the filter (~7 us)
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            hwc = torch.from_numpy(np.asarray(img))  # (H, W, 3)
        # The crop is copied once into a dense channels-last block: the uint8 kernel runs ~30% faster
        # on that than on the strided view of the whole image.
        x = hwc[i:i + h, j:j + w].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        # antialias=True is PIL's filter (bicubic a = -0.5) and the only uint8 path torch has
        out = F.interpolate(x, self.size, mode=self.mode, antialias=True)[0]  # (3, H, W), channels-last strides
        # After the resize, as torchvision does (the output is also the smaller image to copy)
        return out.flip(-1) if flip else out


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
        (ch, cw), s = self.cells, self.scale
        # (ch, cw) -> (ch*s, cw*s): each cell covers s x s tokens; one copy instead of two
        # repeat_interleaves (~10 us a sample, with the same values)
        return mask.view(ch, 1, cw, 1).expand(ch, s, cw, s).reshape(ch * s, cw * s)


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
                 interpolation: T.InterpolationMode | str = T.InterpolationMode.BILINEAR):
        self.mean, self.std = tuple(mean), tuple(std)
        self.mask_generator = MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio)
        self.image_transform = RandomResizedCropFlipUint8(img_size, scale, ratio, hflip, interpolation)

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
