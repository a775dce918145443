"""Transforms: SimMIM crop vs torchvision, mask geometry and ratio, size errors, timm fine-tune/eval, mixup."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from torchvision import transforms as T

from data import (MaskGenerator, SimMIMTransform, build_eval_transform, build_finetune_transform, build_mixup,
                  normalize_images)
from data.transforms import RandomResizedCropFlipUint8


def _img(w: int = 150, h: int = 110) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("img_size,mask_patch,model_patch,ratio", [(192, 32, 4, 0.6), (64, 32, 4, 0.6),
                                                                    (96, 16, 2, 0.4), ((64, 128), 32, 4, 0.5)])
def test_simmim_mask_geometry_and_ratio(img_size, mask_patch, model_patch, ratio):
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    t = SimMIMTransform(img_size, mask_patch_size=mask_patch, model_patch_size=model_patch, mask_ratio=ratio)
    out = t(_img())
    assert out["image"].shape == (3, h, w) and out["image"].dtype == torch.uint8
    mask = out["mask"]
    assert mask.shape == (h // model_patch, w // model_patch)
    s = mask_patch // model_patch
    cells = mask.view(h // mask_patch, s, w // mask_patch, s)
    # Every mask patch is all-masked or all-visible at model-patch level.
    assert torch.equal(cells.amin(dim=(1, 3)), cells.amax(dim=(1, 3)))
    n_cells = (h // mask_patch) * (w // mask_patch)
    assert int(cells[:, 0, :, 0].sum()) == math.ceil(n_cells * ratio)


def test_masks_differ_between_calls():
    gen = MaskGenerator(192)
    assert not all(torch.equal(gen(), gen()) for _ in range(3))


def test_size_not_divisible_names_the_fix():
    with pytest.raises(ValueError, match=r"img_size 100 is not a multiple of mask_patch_size 32: use img_size 96 or 1"):
        SimMIMTransform(100)
    with pytest.raises(ValueError, match="mask_patch_size 30 is not a multiple of model_patch_size 4"):
        SimMIMTransform(120, mask_patch_size=30)


def test_finetune_and_eval_transforms():
    img = _img(300, 200)
    x = build_finetune_transform(64)(img)
    assert x.shape == (3, 64, 64)
    e = build_eval_transform(64)
    assert e(img).shape == (3, 64, 64)
    assert torch.equal(e(img), e(img)), "eval transform must be deterministic"


def test_mixup_soft_targets():
    mix = build_mixup(num_classes=5, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    xm, t = mix(x, y)
    assert xm.shape == x.shape and t.shape == (4, 5)
    assert torch.allclose(t.sum(1), torch.ones(4))
    _, t0 = build_mixup(num_classes=5, mixup=0.0, cutmix=0.0, label_smoothing=0.1)(x.clone(), y)
    assert torch.allclose(t0.argmax(1), y) and torch.allclose(t0.max(1).values, torch.full((4,), 0.92))


def _torchvision(size, scale, ratio=(3 / 4, 4 / 3), interpolation="bilinear") -> T.Compose:
    """The torchvision pipeline RandomResizedCropFlipUint8 replaces, ending in a CHW uint8 tensor."""
    return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=T.InterpolationMode(interpolation)),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


def test_crop_box_and_flip_equal_torchvision():
    # Crops of exactly the output size make both resizes the identity, so any difference in the drawn
    # box or flip shows up as different pixels.
    ours = RandomResizedCropFlipUint8(40, scale=(0.2, 0.2), ratio=(1, 1))
    ref = _torchvision(40, scale=(0.2, 0.2), ratio=(1, 1))
    flips = set()
    for seed in range(8):
        img = _img(100, 80)
        torch.manual_seed(seed)
        got = ours(img)
        torch.manual_seed(seed)
        assert torch.equal(got, ref(img)), f"seed {seed}: box or flip differs from torchvision's"
        torch.manual_seed(seed)
        T.RandomResizedCrop.get_params(img, (0.2, 0.2), (1, 1))
        flips.add(bool(torch.rand(1) < 0.5))
    assert flips == {True, False}, "the seeds must cover both flip outcomes"
    assert got.shape == (3, 40, 40) and got.dtype == torch.uint8


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_is_close_to_pil(interpolation):
    ours = RandomResizedCropFlipUint8(64, scale=(0.3, 1.0), interpolation=interpolation)
    ref = _torchvision(64, scale=(0.3, 1.0), interpolation=interpolation)
    for seed in range(6):
        img = _img(150 + 40 * seed, 110)  # noise: a box off by one pixel would differ by tens of levels
        torch.manual_seed(seed)
        got = ours(img)
        torch.manual_seed(seed)
        diff = (got.int() - ref(img).int()).abs().float()
        assert diff.mean() < 0.1, f"seed {seed}: mean abs difference {diff.mean():.3f} to PIL's resize"
    # upsampling (crop smaller than the output) goes through the same filter
    torch.manual_seed(0)
    up = RandomResizedCropFlipUint8(96, scale=(0.5, 1.0), interpolation=interpolation)(_img(40, 30))
    torch.manual_seed(0)
    assert (up.int() - _torchvision(96, (0.5, 1.0), interpolation=interpolation)(_img(40, 30)).int()).abs().float().mean() < 0.1


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_non_rgb_images_are_converted(mode):
    img = _img(90, 70).convert(mode)
    t = RandomResizedCropFlipUint8((32, 48), scale=(0.5, 1.0))
    torch.manual_seed(3)
    got = t(img)
    torch.manual_seed(3)
    assert got.shape == (3, 32, 48) and got.dtype == torch.uint8
    assert torch.equal(got, t(img.convert("RGB")))


def test_unsupported_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation 'nearest' is not supported: use 'bilinear' or 'bicubic'"):
        SimMIMTransform(64, interpolation=T.InterpolationMode.NEAREST)
    with pytest.raises(ValueError, match="interpolation 'lanczos' is not supported"):
        RandomResizedCropFlipUint8(64, interpolation="lanczos")
    assert RandomResizedCropFlipUint8(64, interpolation=T.InterpolationMode.BICUBIC).mode == "bicubic"


def test_device_normalisation_matches_torchvision():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img_size = 64
    t = SimMIMTransform(img_size, mean=mean, std=std)
    assert (t.mean, t.std) == (mean, std)
    # The same seed draws the same crop box and flip in both pipelines; the resizes agree within rounding.
    torch.manual_seed(7)
    out = t(_img(150, 110))["image"]
    torch.manual_seed(7)
    crop = T.Compose([T.RandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip()])
    pil = crop(_img(150, 110))
    ref = T.Normalize(mean, std)(T.ToTensor()(pil))
    got = normalize_images(out, t.mean, t.std)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # exact: the normalisation of the same uint8 pixels
    assert (got - T.Normalize(mean, std)(out.float() / 255)).abs().max() <= 1e-6
    # close: PIL's resize differs from torch's by rounding only (1 level = 1 / (255 * std) ~ 0.017)
    assert (got - ref).abs().mean() < 0.1 / 255 / min(std)
    # A batch of channels-last images (what the loader ships) normalises like the single images.
    batch = torch.stack([out.permute(1, 2, 0)] * 2).permute(0, 3, 1, 2)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    normed = normalize_images(batch, torch.tensor(mean), torch.tensor(std))
    assert normed.shape == (2, *ref.shape) and torch.equal(normed[0], got) and torch.equal(normed[1], got)
