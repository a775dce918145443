"""Data pipeline: WebDataset shards -> safe decode -> transforms -> equal-length batches per rank.

Knows nothing about the model or DeepSpeed. Public API (what the trainers use):

- `demo_shards(root: str | None = None) -> str`
    Folder holding the demo set (`train-%06d.tar`, `val-%06d.tar`, `index.json`; 12 classes,
    3072 train / 768 val images of 128x128). Generated deterministically on first use into
    `$SWINSCALE_CACHE/demo` (default `~/.cache/swinscale/demo`); safe to call from all ranks at once.
- `read_index(path) -> dict`
    `index.json` of a shard folder (or the file itself): keys `class_names`, `num_classes`,
    `splits` -> {split: {"samples": n, "shards": [{"name", "samples", "bytes"}]}}.
- `check_num_classes(path, num_classes) -> int | None`
    Call before fine-tuning: the class count in the `index.json` of `path` (shard folder or the file,
    e.g. the loader's `index=`) when it equals `num_classes`; a one-line ValueError naming both counts
    and the fix when it differs; None when it cannot be known before reading (no index.json: brace
    pattern, list file, pipe:/remote shards; or an index recording no classes).
- `SimMIMTransform(img_size, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6, scale=(0.67, 1),
  ratio=(3/4, 4/3), hflip=0.5, mean, std, interpolation)`
    PIL image -> {"image": (3, H, W) uint8, "mask": (H/model_patch, W/model_patch) uint8, 1 = masked}.
    Cropped and flipped, not normalised; `transform.mean` / `transform.std` (0-1 scale) are what
    `normalize_images` needs. The crop box and flip are torchvision's RandomResizedCrop and
    RandomHorizontalFlip draws (same seed, same box); the resize is torch's antialiased uint8
    interpolate (`data.transforms.RandomResizedCropFlipUint8`), within rounding of PIL's.
    interpolation: 'bilinear' (default) or 'bicubic'; others raise a ValueError. The image has
    channels-last strides. img_size must be a multiple of mask_patch_size; otherwise the
    constructor raises a one-line ValueError naming the nearest sizes that work.
- `normalize_images(images, mean, std, dtype=torch.float32) -> Tensor`
    uint8 (..., 3, H, W) -> `(images - mean*255) / (std*255)` in `dtype`, on the images' device
    (the trainer runs it after the host-to-device copy); equal to ToTensor + Normalize.
- `TwoViewTransform(size, scale, grayscale=0.2)`, `MultiCropTransform(global_size, local_size, local_crops,
  global_scale, local_scale, grayscale=0.2)`, `CorruptedViewsTransform(size, scale, drop_perc, drop_max_block,
  drop_align, replace_prob, replace_perc, grayscale=0.2)` (`data.views`)
    The self-supervised methods' views: PIL image -> {"view0", "view1"} (BYOL's asymmetric pair),
    {"global0", "global1", "local0", ...} (DINO multi-crop), or the pair plus per-view corruption masks
    "corrupt0"/"corrupt1" ((H, W) uint8) and "replace" (SiT's GMML); uint8 images, fixed count and sizes.
- `build_finetune_transform(img_size, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, ...)`,
  `build_eval_transform(img_size, crop_pct=0.875, ...)`
    timm `create_transform` for training (RandAugment, random erasing) and eval (resize + center crop).
- `build_mixup(num_classes, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)`
    timm `Mixup`: `images, soft_targets = mix(images, labels)` (even batch size); with
    mixup = cutmix = 0 it only label-smooths, so a loop can always use a soft-target loss.
- `ShardLoader(urls, transform, batch_size, *, rank=0, world_size=1, num_workers=4, seed=0,
  resampled=False, split="train", index=None (an index.json path, for pipe:/remote shards),
  drop_last=True, shuffle_buffer=256, interleave=4,
  prefetch_factor=2, pin_memory=False, max_pixels=PIL's limit, num_classes=None)`
    `urls`: folder (its `index.json` split, else `{split}-*.tar`, else `*.tar`), brace pattern, list
    file, `pipe:` command, or a list of those. Iterating yields the rest of the current epoch as
    dicts {"image": (B, 3, H, W) in the transform's dtype (uint8 for SimMIMTransform; channels-last
    strides when the transform's images have them, as SimMIMTransform's do: stacked without a transpose),
    "mask": (B, h, w) if the transform makes one, "label": (B,) long (-1 without .cls),
    "__key__": list[str]}, then advances the epoch.
    `num_classes` (fine-tuning; None for pretraining): a sample without `.cls` (`no_label`) or with a
    class id outside [0, num_classes) (`label_out_of_range`: negative, beyond the head, or huge) is
    skipped and counted like corrupt data, before its image is decoded, so every yielded label is a
    valid class. Without it labels are unchecked except that ids beyond int64 are `label_out_of_range`.
    `len(loader)`: batches per epoch on this rank, identical on every rank. `set_epoch(e)`
    (no-op for the current epoch, so it keeps a restored position), `forever()` (endless
    iterator over epochs), `state_dict()` / `load_state_dict(state)` (exact resume, augmentations
    and masks included: each sample's transform is seeded from (seed, epoch, rank, its place in the
    epoch plan); state is per rank and num_classes must match, num_workers may change; the caller's
    global RNGs are untouched), `corrupt_counts() -> dict[str, int]` (skips per reason on this rank;
    reasons in `data.shards.REASONS`), `padded` (samples repeated to keep batch counts equal), `num_samples`.

CLIs: `python -m data.write_shards SRC OUT [--shard-size N] [--workers W] [--val-fraction F]` and
`python -m data.check_shards PATH [--num-classes N]` (prints {"shards", "samples", "skipped", "errors"};
with --num-classes, missing and out-of-range labels are counted as the fine-tuning loader skips them).
"""
import importlib

# Lazy attributes (PEP 562): the CLIs (`python -m data.write_shards`, `data.check_shards`) start
# without importing torch and timm, which the loader and transforms need.
_EXPORTS = {"demo_shards": "demo", "read_index": "index", "check_num_classes": "index", "ShardLoader": "loader",
            "REASONS": "shards", "MaskGenerator": "transforms", "SimMIMTransform": "transforms",
            "build_eval_transform": "transforms", "build_finetune_transform": "transforms",
            "build_mixup": "transforms", "normalize_images": "transforms", "TwoViewTransform": "views",
            "MultiCropTransform": "views", "CorruptedViewsTransform": "views"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
