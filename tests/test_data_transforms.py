"""Transforms: SimMIM mask geometry and ratio, size errors, timm fine-tune/eval transforms, mixup."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data import (MaskGenerator, SimMIMTransform, build_eval_transform, build_finetune_transform, build_mixup,
                  normalize_images)


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


def test_device_normalisation_matches_torchvision():
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img_size = 64
    t = SimMIMTransform(img_size, mean=mean, std=std)
    assert (t.mean, t.std) == (mean, std)
    # The same seed draws the same crop box and flip in both pipelines.
    torch.manual_seed(7)
    out = t(_img(150, 110))["image"]
    torch.manual_seed(7)
    crop = T.Compose([T.RandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip()])
    ref = T.Normalize(mean, std)(T.ToTensor()(crop(_img(150, 110))))
    got = normalize_images(out, t.mean, t.std)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-6
    batch = normalize_images(torch.stack([out, out]), torch.tensor(mean), torch.tensor(std))
    assert batch.shape == (2, *ref.shape) and torch.equal(batch[0], got)
    grey = _img(37, 23).convert("L")
    assert torch.equal(SimMIMTransform(32, mask_patch_size=16).image_transform.transforms[-1](grey),
                      T.PILToTensor()(grey.convert("RGB")))
