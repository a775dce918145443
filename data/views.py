"""Multi-view transforms of the self-supervised methods: BYOL's two asymmetric views, DINO's multi-crop,
SiT's block corruption.

Each transform maps one PIL image to a dict of uint8 (3, H, W) tensors (normalised on the device,
like SimMIM's), so `data.ShardLoader` stacks every key into its own batch. The number and sizes of
the views are fixed by the constructor: every rank sees the same crops in the same order, which
ZeRO-3 needs (a rank with other shapes would wait in another gather and hang the job).
Recipes (the seeds' code, see ../shared/SSL_METHODS.md): colour jitter (0.4, 0.4, 0.2, 0.1) with
p=0.8, grayscale p=0.2; blur sigma in [0.1, 2]; view 1 always blurred, view 2 blurred with p=0.1
and solarized with p=0.2. `grayscale` (the recipes' 0.2) is a knob for data where colour tells
instances apart but not classes (the demo set): at 1 no view keeps its colours.
"""
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

__all__ = ["TwoViewTransform", "MultiCropTransform", "CorruptedViewsTransform", "block_corruption_mask"]


def _view(size: int, scale: Sequence[float], blur: float, solarize: float, grayscale: float) -> T.Compose:
    """RandomResizedCrop + flip + colour distortion + blur/solarize, ending in a uint8 tensor."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # about a tenth of the crop, odd (BYOL)
    steps = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
             T.RandomGrayscale(p=grayscale),
             T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur)]
    if solarize > 0:
        steps.append(T.RandomSolarize(128, p=solarize))
    return T.Compose(steps + [T.PILToTensor()])


class _Views:
    """Shared by the view transforms: RGB conversion, named views, the normalisation constants."""

    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)

    def __init__(self, views: dict[str, T.Compose]) -> None:
        self.views = views

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return {name: view(img) for name, view in self.views.items()}


class TwoViewTransform(_Views):
    """BYOL's asymmetric pair (MoBY, SiT v3): {"view0", "view1"}, both `size` px."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), grayscale: float = 0.2) -> None:
        super().__init__({"view0": _view(size, scale, blur=1.0, solarize=0.0, grayscale=grayscale),
                          "view1": _view(size, scale, blur=0.1, solarize=0.2, grayscale=grayscale)})


class MultiCropTransform(_Views):
    """DINO's multi-crop (EsViT): {"global0", "global1", "local0", ..., "local{n-1}"}.

    Two global crops of `global_size` (asymmetric like BYOL's pair) and `local_crops` crops of
    `local_size` (blur p=0.5).
    """

    def __init__(self, global_size: int, local_size: int, local_crops: int,
                 global_scale: Sequence[float] = (0.4, 1.0), local_scale: Sequence[float] = (0.05, 0.4),
                 grayscale: float = 0.2) -> None:
        views = {"global0": _view(global_size, global_scale, blur=1.0, solarize=0.0, grayscale=grayscale),
                 "global1": _view(global_size, global_scale, blur=0.1, solarize=0.2, grayscale=grayscale)}
        local = _view(local_size, local_scale, blur=0.5, solarize=0.0, grayscale=grayscale)
        views.update({f"local{i}": local for i in range(local_crops)})
        super().__init__(views)


def block_corruption_mask(size: int, share: float, max_block: float, align: int,
                          rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool mask of random rectangles, edges on an `align` grid, covering >= `share` of the pixels.

    SiT's GMML corruption: blocks of up to `max_block` of the side are added until the union
    covers the share (SiT's drop_perc / drop_max_block / drop_align).
    """
    cells = max(1, size // align)  # the grid the blocks snap to
    grid = np.zeros((cells, cells), dtype=bool)
    longest = max(1, round(max_block * cells))
    while grid.mean() < share:
        h, w = rng.integers(1, longest + 1, size=2)
        top, left = rng.integers(0, cells - h + 1), rng.integers(0, cells - w + 1)
        grid[top:top + h, left:left + w] = True
    cell = math.ceil(size / cells)
    return np.kron(grid, np.ones((cell, cell), dtype=bool))[:size, :size]


class CorruptedViewsTransform(TwoViewTransform):
    """SiT v3's input: BYOL's two views plus, per view, a pixel mask of the part to corrupt.

    Keys "view0", "view1" (uint8 images), "corrupt0", "corrupt1" ((H, W) uint8, 1 = corrupted) and
    "replace" (0: the masked pixels are zero-filled after normalisation, covering >= drop_perc; 1:
    they are pasted from another image of the batch, covering >= replace_perc, which SiT does for
    `replace_prob` of the images). The masks come from the sample's seeded RNG stream, so a resumed
    run corrupts exactly the same pixels.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), drop_perc: float = 0.5,
                 drop_max_block: float = 0.3, drop_align: int = 32, replace_prob: float = 0.5,
                 replace_perc: float = 0.3, grayscale: float = 0.2) -> None:
        super().__init__(size, scale, grayscale)
        self.size, self.drop_perc, self.drop_max_block, self.drop_align = size, drop_perc, drop_max_block, drop_align
        self.replace_prob, self.replace_perc = replace_prob, replace_perc

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        out = super().__call__(img)
        # the loader seeds torch's RNG per sample: derive numpy's from it, so one seed drives the sample
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,))))
        replace = bool(rng.random() < self.replace_prob)
        share = self.replace_perc if replace else self.drop_perc
        for i in range(2):
            mask = block_corruption_mask(self.size, share, self.drop_max_block, self.drop_align, rng)
            out[f"corrupt{i}"] = torch.from_numpy(mask.astype(np.uint8))
        out["replace"] = int(replace)
        return out
