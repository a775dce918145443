"""Analytic forward FLOPs of SwinV2 and SimMIM, for MFU.

Counts what torch's FlopCounterMode counts (2 FLOPs per multiply-add of every matmul and
convolution, attention included); norms, softmax and elementwise ops are left out as they
are negligible and not tensor-core work. Padded windows are counted: they are computed.
"""
import math
from typing import Optional

import torch.nn as nn

from .simmim import SimMIM
from .swin_transformer_v2 import IntOrPair, SwinTransformerV2, stage_window, to_pair

__all__ = ["estimate_flops"]


def _block_flops(resolution: tuple[int, int], window: int, dim: int, heads: int, mlp_ratio: float) -> int:
    window_hw, _ = stage_window(resolution, window)
    padded_tokens = math.prod(math.ceil(r / w) * w for r, w in zip(resolution, window_hw))
    tokens = math.prod(resolution)
    window_tokens = math.prod(window_hw)
    table_rows = (2 * window_hw[0] - 1) * (2 * window_hw[1] - 1)
    cpb = 2 * table_rows * (2 * 512 + 512 * heads)
    qkv_proj = 2 * padded_tokens * dim * 4 * dim
    attention = 2 * 2 * padded_tokens * window_tokens * dim  # q @ k^T and attn @ v
    mlp = 2 * 2 * tokens * dim * int(dim * mlp_ratio)
    return cpb + qkv_proj + attention + mlp


def estimate_flops(model: nn.Module, img_size: Optional[IntOrPair] = None) -> int:
    """Forward FLOPs for one image through a SwinTransformerV2 or SimMIM at `img_size`.

    img_size defaults to the model's current input size; the window sizes are the model's.
    Training (forward + backward) is about 3x this, recomputation not counted.
    """
    simmim = model if isinstance(model, SimMIM) else None
    encoder: SwinTransformerV2 = model.encoder if simmim is not None else model
    if not isinstance(encoder, SwinTransformerV2):
        raise TypeError(f"estimate_flops takes a SwinTransformerV2 or SimMIM, not {type(model).__name__}")
    size = to_pair(img_size) if img_size is not None else encoder.img_size
    in_chans = encoder.patch_embed.proj.in_channels
    resolutions = encoder.stage_resolutions(size)
    flops = 2 * math.prod(resolutions[0]) * encoder.embed_dim * in_chans * encoder.patch_size ** 2
    for i, (resolution, depth) in enumerate(zip(resolutions, encoder.depths)):
        dim = encoder.embed_dim * 2 ** i
        if i > 0:
            flops += 2 * math.prod(resolution) * (2 * dim) * dim  # patch merging 4C_prev -> 2C_prev
        flops += depth * _block_flops(resolution, encoder.window_sizes[i], dim, encoder.num_heads[i],
                                      encoder.mlp_ratio)
    if simmim is not None:
        flops += 2 * math.prod(resolutions[-1]) * encoder.num_features * simmim.encoder_stride ** 2 * in_chans
    else:
        flops += 2 * encoder.num_features * encoder.num_classes
    return flops
