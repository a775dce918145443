"""Swin Transformer V2, from tiny to the 3B-parameter SwinV2-G, at any resolution.

Paper: `Swin Transformer V2: Scaling Up Capacity and Resolution`, https://arxiv.org/abs/2111.09883

Same numerics as Microsoft's release and timm's port (residual post-norm, scaled cosine
attention, log-spaced continuous position bias, V2 patch merging), with three additions that
large-scale training needs, whose kernels live in models/attention.py:

* the shifted-window mask kept separable from the position bias, so fused attention kernels
  never see a (windows, heads, N, N) tensor;
* a sequential attention path ("sequential self-attention" in the paper) that runs windows
  in checkpointed chunks, so attention memory stops growing with the number of windows;
* internal padding for stages whose resolution is not a multiple of the window (1536px at
  window 32 gives a 48x48 last stage); padded tokens are masked out as keys, so real tokens
  never attend to padding.

The internal layout is (B, H, W, C) like timm's; state dict keys follow timm's layout
(downsample at the start of stages 1..3) with the classifier as a plain `head` Linear.
"""
import contextlib
import functools
import inspect
import math
import re
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint

from .attention import (ATTN_BACKENDS, DENSE_MASK_ELEMENTS, AttentionPath, attend, attention_path, mlp_chunk_rows,
                        run_in_chunks, window_mask_groups, window_partition, window_reverse)

__all__ = ["SwinTransformerV2", "build_model", "list_models", "checkpoint_filter_fn", "stage_window", "ATTN_BACKENDS"]

NORMALIZE_EPS = 1e-12  # F.normalize's default, as in the published model

IntOrPair = Union[int, tuple[int, int]]


def to_pair(value: IntOrPair) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def stage_window(resolution: tuple[int, int], window: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and shift a stage uses at `resolution`: clamped to the resolution, no shift then.

    Returns ((window_h, window_w), (shift_h, shift_w)) for the shifted blocks.
    """
    window_hw = tuple(min(r, window) for r in resolution)
    shift_hw = tuple(0 if r <= window else window // 2 for r in resolution)
    return window_hw, shift_hw


def scaled_unit_rows(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """`F.normalize(x, dim=-1) * scale` in one pass over x.

    Multiplying by a per-row inverse norm (scale folded in) instead of dividing and then scaling
    saves one full-size elementwise pass forward and backward; cosine attention runs it on q and k.
    """
    inverse_norm = torch.rsqrt(x.square().sum(-1, keepdim=True).clamp_min(NORMALIZE_EPS ** 2))
    return x * (inverse_norm * scale)


def log_cpb_coords(window: tuple[int, int], pretrained_window: tuple[int, int]) -> torch.Tensor:
    """Log-spaced relative coordinates (2*Wh-1, 2*Ww-1, 2) fed to the continuous position bias MLP.

    Coordinates are normalised by the pretrained window when one is given (the official
    convention for transferring to a larger window), else by the window itself.
    """
    # integer aranges, then .float(): deepspeed.zero.Init (bf16) turns every floating tensor that
    # a torch constructor makes into bf16, even with an explicit dtype, so no float constructors here
    norm = pretrained_window if pretrained_window[0] > 0 else window
    # max(.., 1): a window of 1 has only the relative coordinate 0
    coords_h = torch.arange(-(window[0] - 1), window[0]).float() / max(norm[0] - 1, 1)
    coords_w = torch.arange(-(window[1] - 1), window[1]).float() / max(norm[1] - 1, 1)
    table = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into the flattened (2*Wh-1)*(2*Ww-1) coordinate table, N = Wh*Ww."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0], dtype=torch.long),
                                        torch.arange(window[1], dtype=torch.long), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (relative[..., 0] + window[0] - 1) * (2 * window[1] - 1) + relative[..., 1] + window[1] - 1


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's DropPath, with the rate held in a buffer instead of a Python float.

    torch.compile specialises on Python floats, so blocks whose rates differ (they rise linearly with depth)
    would each compile a graph of their own, and past dynamo's recompile limit run eagerly; as a tensor the
    rate is a graph input and the blocks of a stage share one graph. The buffer is an integer (millionths):
    zero.Init and DeepSpeed's bf16 cast floating buffers, which would round 0.1 to 0.10009765625.
    """

    def __init__(self, drop_prob: float, device=None) -> None:
        super().__init__()
        self.drop_prob = drop_prob  # for reading only: forward uses the buffer
        self.register_buffer("drop_millionths", torch.tensor(round(drop_prob * 1e6), device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.drop_millionths.to(torch.float32) / 1e6
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * (torch.empty(shape, device=x.device).bernoulli_(keep) / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class ResPostNorm(nn.LayerNorm):
    """LayerNorm on the residual branch, initialised to zero as in Microsoft's SwinV2.

    The zero init lives in reset_parameters so that it runs inside the module's own
    constructor: under deepspeed.zero.Init a parent constructor would only see empty shards.
    """

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class WindowAttention(nn.Module):
    """Scaled cosine window attention with log-spaced continuous position bias (log-CPB)."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], pretrained_window: tuple[int, int],
                 backend: str = "auto", chunk_windows: int = 0, device=None, dtype=None) -> None:
        """Args:
            dim: channels C of the tokens.
            num_heads: attention heads, dividing C.
            window: (Wh, Ww) window of the coordinate tables.
            pretrained_window: window the CPB MLP was trained at, (0, 0) for none.
            backend: one of ATTN_BACKENDS.
            chunk_windows: windows per chunk on the sequential path (0: sized automatically).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.backend = backend
        self.chunk_windows = chunk_windows
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10), **dd))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, **dd), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.proj = nn.Linear(dim, dim, **dd)
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (window, pretrained, device) -> tables
        self.set_window(window, pretrained_window)

    def set_window(self, window: tuple[int, int], pretrained_window: tuple[int, int]) -> None:
        """Use the coordinate table and index of a new window (built once per device, then cached); keep the CPB MLP."""
        self.window = window
        self.pretrained_window = pretrained_window
        device = self.q_bias.device
        key = (window, pretrained_window, device)
        if key not in self.tables:
            # built on the CPU even inside `with torch.device("meta")`, then moved to the parameters' device
            with torch.device("cpu"):
                coords, index = log_cpb_coords(window, pretrained_window), relative_position_index(window)
            self.tables[key] = coords.to(device), index.to(device)
        coords, index = self.tables[key]
        self.register_buffer("relative_coords_table", coords, persistent=False)
        self.register_buffer("relative_position_index", index, persistent=False)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) log-CPB bias, 16 * sigmoid(MLP(coords)) gathered per token pair."""
        table = self.cpb_mlp(self.relative_coords_table.to(self.q_bias.dtype)).view(-1, self.num_heads)
        # the sigmoid runs on the (2Wh-1)(2Ww-1) table entries before they are spread over N^2 pairs
        table = 16 * torch.sigmoid(table)
        N = self.window[0] * self.window[1]
        # contiguous once here, so the per-window additions below read it in order
        bias = table[self.relative_position_index.view(-1)].view(N, N, self.num_heads)
        return bias.permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, groups: Sequence[tuple[int, int, int]], patterns: torch.Tensor,
                path: AttentionPath) -> torch.Tensor:
        """Attend within windows, one call (or one chunked call) per mask group.

        Args:
            x: (B, num_windows, N, C) windows, sorted so each mask group is contiguous.
            groups: (start, end, pattern index or -1) over the window axis.
            patterns: (P, N, N) additive shift/padding masks.
            path: kernel and chunking, from `models.attention.attention_path`.

        Returns:
            (B, num_windows, N, C).
        """
        B, _, N, C = x.shape
        bias = self.position_bias()
        outputs = []
        for start, end, pattern in groups:
            mask = bias if pattern < 0 else bias + patterns[pattern].to(bias.dtype)
            windows = x[:, start:end].reshape(-1, N, C)
            if path.chunk_windows:
                out = run_in_chunks(self._attend, windows, path.chunk_windows, mask, path.kernel)
            else:
                out = self._attend(windows, mask, path.kernel)
            outputs.append(out.view(B, end - start, N, C))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def forward_per_window(self, x: torch.Tensor, kernel: str, window_masks: Optional[torch.Tensor],
                           patterns: torch.Tensor, pattern_of_window: torch.Tensor) -> torch.Tensor:
        """Attend within all windows in one call, each window with its own shift/padding mask.

        "matmul" adds the (num_windows, N, N) masks to the scores (small CPU windows); "flex" picks each
        window's pattern by index inside flex_attention's score_mod, so no windows x N x N mask is built.

        Args:
            x: (B, num_windows, N, C) windows in grid order.
            window_masks: (num_windows, N, N) masks, for "matmul".
            patterns, pattern_of_window: (P, N, N) masks and each window's index into them (-1: none), for "flex".
        """
        bias = self.position_bias()
        if kernel != "flex":
            return self._attend(x, bias + window_masks.unsqueeze(1).to(bias.dtype), kernel)  # nW, heads, N, N
        B, num_windows, N, C = x.shape
        patterns = patterns.to(bias.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            score = score + bias[h, q_idx, kv_idx]
            if patterns.shape[0] == 0:
                return score
            pattern = pattern_of_window[b % num_windows]  # flex's batch is (image, window) flattened
            return score + torch.where(pattern >= 0, patterns[pattern.clamp(min=0), q_idx, kv_idx], 0.0)

        return self._attend(x.reshape(B * num_windows, N, C), score_mod, kernel).view(B, num_windows, N, C)

    def _attend(self, windows: torch.Tensor, mask: torch.Tensor | Callable, kernel: str) -> torch.Tensor:
        """(..., N, C) windows and a mask broadcastable to (..., heads, N, N) (flex: a score_mod) -> (..., N, C)."""
        *lead, N, C = windows.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(windows, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(*lead, N, 3, self.num_heads, -1).movedim(-3, 0).transpose(-3, -2).unbind(0)
        # cosine attention as dot-product attention: unit q and k, the per-head scale folded into q
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        q, k = scaled_unit_rows(q, logit_scale), scaled_unit_rows(k)
        out = attend(q, k, v, mask, kernel)
        return self.proj(out.transpose(-3, -2).reshape(*lead, N, C))


class SwinTransformerV2Block(nn.Module):
    """Window attention and MLP, each with a residual post-norm: x + drop_path(norm(f(x)))."""

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int], window: int,
                 pretrained_window: int, shifted: bool, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 main_norm: bool = False, attn_backend: str = "auto", attn_chunk_windows: int = 0,
                 device=None, dtype=None) -> None:
        """Args:
            dim, num_heads: channels and heads of this stage.
            resolution: (H, W) tokens of this stage.
            window, pretrained_window: target window (clamped to the resolution), window of pretraining.
            shifted: odd blocks shift their windows by half a window.
            main_norm: the extra LayerNorm on the main branch that SwinV2-H/G use every 6 blocks.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.shifted = shifted
        self.attn = WindowAttention(dim, num_heads, (1, 1), (0, 0), attn_backend, attn_chunk_windows, **dd)
        self.norm1 = ResPostNorm(dim, **dd)
        self.drop_path1 = DropPath(drop_path, device) if drop_path > 0 else nn.Identity()
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden, **dd))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim, **dd))
        self.norm2 = ResPostNorm(dim, **dd)
        self.drop_path2 = DropPath(drop_path, device) if drop_path > 0 else nn.Identity()
        self.main_norm = nn.LayerNorm(dim, **dd) if main_norm else nn.Identity()
        self.masks: dict[tuple, tuple] = {}  # (resolution, window, shift, device) -> what `_build_masks` returns
        self.set_input_size(resolution, window, pretrained_window)

    def set_input_size(self, resolution: tuple[int, int], window: int, pretrained_window: int) -> None:
        """Set window, shift, padding, mask groups and the attention's coordinate tables for `resolution`.

        Masks and tables are built once per size and device, then cached: a model fed several sizes
        in turn (EsViT's global and local crops through one student) switches without rebuilding them
        (~10 ms for SwinV2-T) or copying them to the device (which would also wait for the device).
        """
        self.size = (tuple(resolution), window, pretrained_window)  # the arguments, for `resized`
        self.resolution = tuple(resolution)
        self.window, shift = stage_window(resolution, window)
        self.shift = shift if self.shifted else (0, 0)
        self.padded = tuple(math.ceil(r / w) * w for r, w in zip(resolution, self.window))
        self.attn.set_window(self.window, to_pair(pretrained_window))
        device = self.norm1.weight.device
        key = (self.resolution, self.window, self.shift, device)
        if key not in self.masks:
            self.masks[key] = self._build_masks(device)
        self.mask_groups, self.sorted_windows, buffers = self.masks[key]
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    @contextlib.contextmanager
    def resized(self, size: tuple) -> Iterator[None]:
        """The block at `size` (`set_input_size`'s arguments) inside the `with`, back at its own size after it."""
        own = self.size
        if size == own:
            yield
            return
        self.set_input_size(*size)
        try:
            yield
        finally:
            self.set_input_size(*own)

    def _build_masks(self, device: torch.device) -> tuple[list, bool, dict[str, Optional[torch.Tensor]]]:
        """(mask groups, whether windows are reordered, buffers) of the current resolution, window and shift."""
        # the groups are read back into Python (counts, equality, branches): computed on the CPU even
        # inside `with torch.device("meta")`, then moved to the parameters' device
        with torch.device("cpu"):
            order, patterns, mask_groups = window_mask_groups(self.resolution, self.padded, self.window, self.shift)
            sorted_windows = not torch.equal(order, torch.arange(len(order)))
            pattern_of_window = torch.full((len(order),), -1, dtype=torch.long)
            for start, end, pattern in mask_groups:
                pattern_of_window[order[start:end]] = pattern
            window_masks = None
            if len(mask_groups) > 1 and len(order) * patterns.shape[-1] ** 2 <= DENSE_MASK_ELEMENTS:
                # integer indexing, no float constructor: under bf16 zero.Init those would come out bf16
                window_masks = torch.where((pattern_of_window >= 0)[:, None, None],
                                           patterns[pattern_of_window.clamp(min=0)], 0.0)
        buffers = {"window_order": order, "window_restore": torch.argsort(order), "mask_patterns": patterns,
                   "window_pattern": pattern_of_window, "window_masks": window_masks}
        return mask_groups, sorted_windows, {k: None if v is None else v.to(device) for k, v in buffers.items()}

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_h, pad_w = self.padded[0] - H, self.padded[1] - W
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        windows = window_partition(x, self.window)
        path = attention_path(self.attn.backend, x.device.type, heads=self.attn.num_heads, tokens=windows.shape[2],
                              windows=windows.shape[0] * windows.shape[1], has_window_masks=self.window_masks is not None,
                              training=torch.is_grad_enabled(), chunk_windows=self.attn.chunk_windows)
        if path.per_window_masks:
            windows = self.attn.forward_per_window(windows, path.kernel, self.window_masks, self.mask_patterns,
                                                   self.window_pattern)
        elif self.sorted_windows:
            windows = self.attn(windows[:, self.window_order], self.mask_groups, self.mask_patterns, path)
            windows = windows[:, self.window_restore]
        else:
            windows = self.attn(windows, self.mask_groups, self.mask_patterns, path)
        x = window_reverse(windows, self.window, self.padded)
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x[:, :H, :W] if pad_h or pad_w else x

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        rows = mlp_chunk_rows(self.attn.backend, tokens=tokens.shape[0], hidden=self.mlp.fc1.out_features,
                              training=torch.is_grad_enabled())
        if rows:
            return run_in_chunks(self._mlp_tokens, tokens, rows).view_as(x)
        return self._mlp_tokens(x)

    def _mlp_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path1(self.norm1(self._attention(x)))
        x = x + self.drop_path2(self._mlp(x))
        return self.main_norm(x)


class PatchMerging(nn.Module):
    """V2 patch merging: concat of the 2x2 sub-grids, Linear(4C -> 2C, no bias), then LayerNorm(2C)."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(2 * dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded."""
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1:3]
        # channel order x0, x1, x2, x3 = (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.norm(self.reduction(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding with LayerNorm: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformerV2Stage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, depth: int, num_heads: int, resolution: tuple[int, int], window: int,
                 pretrained_window: int, downsample: bool, drop_path: Sequence[float], main_norm_every: int,
                 block_kwargs: dict[str, Any], device=None, dtype=None) -> None:
        """`dim` and `resolution` are the stage's own, after its patch merging."""
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.offload_checkpoints = False
        self.downsample = PatchMerging(dim // 2, **dd) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            SwinTransformerV2Block(dim, num_heads, resolution, window, pretrained_window, shifted=i % 2 == 1,
                                   drop_path=drop_path[i],
                                   main_norm=main_norm_every > 0 and (i + 1) % main_norm_every == 0,
                                   **block_kwargs, **dd)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return x

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return block(x)
        # backward recomputes the block at the size of this forward: a model fed several sizes in one step
        # (EsViT's global and local crops) has been set to another size by then
        context_fn = functools.partial(_recompute_at, block, block.size)
        if self.offload_checkpoints:
            # the only tensor kept per block is its input: park it in host memory until backward
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return checkpoint(block, x, use_reentrant=False, context_fn=context_fn)
        return checkpoint(block, x, use_reentrant=False, context_fn=context_fn)


def _recompute_at(block: SwinTransformerV2Block, size: tuple) -> tuple[contextlib.AbstractContextManager, ...]:
    """`checkpoint`'s context_fn: nothing around the forward, the forward's size around the recomputation."""
    return contextlib.nullcontext(), block.resized(size)


class SwinTransformerV2(nn.Module):
    """SwinV2 classifier. `forward_features` gives pooled (B, C) features, `forward` the logits."""

    def __init__(self, img_size: IntOrPair = 256, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Union[int, Sequence[int]] = 8, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, main_norm_every: int = 0,
                 attn_backend: str = "auto", attn_chunk_windows: int = 0, device=None, dtype=None) -> None:
        """Args:
            img_size: input resolution, an int or (H, W); each side divisible by patch_size.
            window_size: one window for all stages or one per stage; clamped to small stages.
            pretrained_window_sizes: per-stage window the log-CPB was pretrained at (0: none).
            drop_path_rate: stochastic depth, rising linearly over all blocks.
            main_norm_every: add a main-branch LayerNorm after every N-th block of a stage (SwinV2-H/G: 6).
            attn_backend: "fused" (the device's fastest exact kernel), "sequential" (checkpointed chunks of
                windows and tokens), "plain" (matmul + softmax, the reference), "flex" (flex_attention, GPU
                training) or "auto" (sequential when attention is large); see models/attention.py.
            attn_chunk_windows: windows per chunk on the sequential path (0: automatic).
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(depths)
        window_sizes = [window_size] * num_stages if isinstance(window_size, int) else list(window_size)
        validate_args(to_pair(img_size), patch_size, embed_dim, depths, num_heads, window_sizes,
                      pretrained_window_sizes, attn_backend, num_classes)
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.mlp_ratio = mlp_ratio
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.img_size = to_pair(img_size)
        self.window_sizes = tuple(window_sizes)
        self.pretrained_window_sizes = tuple(pretrained_window_sizes)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **dd)
        # plain floats, not torch.linspace(...).tolist(): that cannot be read back on the meta device
        drop_path = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        block_kwargs = dict(mlp_ratio=mlp_ratio, attn_backend=attn_backend, attn_chunk_windows=attn_chunk_windows)
        resolutions = self.stage_resolutions(self.img_size)
        self.layers = nn.Sequential(*[
            SwinTransformerV2Stage(embed_dim * 2 ** i, depths[i], num_heads[i], resolutions[i], window_sizes[i],
                                   pretrained_window_sizes[i], downsample=i > 0,
                                   drop_path=drop_path[sum(depths[:i]):sum(depths[:i + 1])],
                                   main_norm_every=main_norm_every, block_kwargs=block_kwargs, **dd)
            for i in range(num_stages)])
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        # deepspeed.zero.Init gathers each module's shards around Module.apply, so this init
        # gives the same weights whether or not the model is built partitioned
        self.apply(_init_weights)

    def stage_resolutions(self, img_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid (H, W) of every stage for an input of `img_size`."""
        resolution = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        resolutions = []
        for i in range(len(self.depths)):
            if i > 0:
                resolution = ((resolution[0] + 1) // 2, (resolution[1] + 1) // 2)
            resolutions.append(resolution)
        return resolutions

    def set_input_size(self, img_size: IntOrPair, window_size: Union[int, Sequence[int]],
                       pretrained_window_sizes: Optional[Sequence[int]] = None) -> None:
        """Move the model to a new resolution and window size, keeping every parameter.

        Coordinate tables, indices and masks are rebuilt; the log-CPB MLP is reused, which is
        how SwinV2 transfers its position bias to a larger window. Pass the windows the model
        was trained at as `pretrained_window_sizes` to normalise coordinates by them (the
        official convention, e.g. 192px/window 12 -> 256px/window 16 uses (12, 12, 12, 6));
        None keeps the model's current pretrained window sizes.
        """
        num_stages = len(self.depths)
        window_sizes = [window_size] * num_stages if isinstance(window_size, int) else list(window_size)
        pretrained = self.pretrained_window_sizes if pretrained_window_sizes is None else tuple(pretrained_window_sizes)
        validate_args(to_pair(img_size), self.patch_size, self.embed_dim, self.depths, self.num_heads, window_sizes,
                      pretrained, "auto", self.num_classes)
        self.img_size = to_pair(img_size)
        self.window_sizes = tuple(window_sizes)
        self.pretrained_window_sizes = pretrained
        for stage, resolution, window, pretrained_window in zip(
                self.layers, self.stage_resolutions(self.img_size), window_sizes, pretrained):
            for block in stage.blocks:
                block.set_input_size(resolution, window, pretrained_window)

    def set_attn_backend(self, backend: str, chunk_windows: int = 0) -> None:
        """Choose the attention path of every block (see ATTN_BACKENDS); numerics are the same."""
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={backend!r} is not one of {ATTN_BACKENDS}")
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.backend, module.chunk_windows = backend, chunk_windows

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile every block in place, with and without activation checkpointing.

        Compiling blocks rather than the whole model (regional compilation) keeps the graphs small: blocks
        of one stage share a graph, so a 3B model compiles about as fast as a tiny one. The blocks' forward
        is compiled, not their `__call__`, so module hooks (DeepSpeed's ZeRO-3 gathers) stay eager around it.
        """
        for stage in self.layers:
            for block in stage.blocks:
                block.forward = torch.compile(block.forward, **compile_kwargs)

    def set_grad_checkpointing(self, enable: bool = True, offload_to_cpu: bool = False) -> None:
        """Recompute each block in backward instead of keeping its activations.

        offload_to_cpu also moves the one tensor kept per block (its input) to host memory,
        for resolutions where even those inputs do not fit on the device.
        """
        for stage in self.layers:
            stage.grad_checkpointing = enable
            stage.offload_checkpoints = enable and offload_to_cpu

    def no_weight_decay(self) -> set[str]:
        """Name keywords of parameters trained without weight decay (1-D parameters come on top)."""
        return {"cpb_mlp", "logit_scale"}

    @property
    def num_layers(self) -> int:
        """Depth groups of layer-wise LR decay: the patch embedding, one per block, the final norm and head."""
        return sum(self.depths) + 2

    def layer_id(self, param_name: str) -> int:
        """Layer-wise LR decay group (0 .. num_layers - 1) of a parameter named relative to this model.

        Microsoft's SimMIM fine-tuning rule: patch embedding 0; block j of stage i (its main-branch norm
        included) sum(depths[:i]) + j + 1; the patch merging in front of stage i, which Microsoft counts
        with the last block of stage i - 1, sum(depths[:i]); final norm and head num_layers - 1.
        """
        if param_name.startswith("patch_embed."):
            return 0
        match = re.match(r"layers\.(\d+)\.(?:blocks\.(\d+)|downsample)\.", param_name)
        if match:
            before = sum(self.depths[:int(match.group(1))])
            return before if match.group(2) is None else before + int(match.group(2)) + 1
        if param_name.startswith(("norm.", "head.")):
            return self.num_layers - 1
        raise ValueError(f"{param_name!r} is not a SwinV2 parameter name (patch_embed.*, layers.*, norm.*, head.*)")

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes that map parameter names to depth groups, for layer-wise LR decay (timm's format)."""
        return dict(stem=r"^patch_embed",
                    blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+).downsample", (0,)),
                                                             (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                                                             (r"^norm", (99999,))])

    def forward_tokens(self, x: torch.Tensor, token_mask_fn: Optional[Callable] = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/32, W/32, C) normalised last-stage tokens.

        token_mask_fn, if given, edits the (B, H/p, W/p, C) patch embeddings (SimMIM masking).
        """
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} but the model is set to img_size={self.img_size}: "
                             f"call model.set_input_size(...) first")
        x = self.patch_embed(x)
        if token_mask_fn is not None:
            x = token_mask_fn(x)
        return self.norm(self.layers(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) pooled features after the final norm."""
        return self.forward_tokens(x).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits."""
        return self.head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def validate_args(img_size: tuple[int, int], patch_size: int, embed_dim: int, depths: Sequence[int],
                  num_heads: Sequence[int], window_sizes: Sequence[int], pretrained_window_sizes: Sequence[int],
                  attn_backend: str, num_classes: int) -> None:
    """Raise a one-line ValueError naming the argument for any shape the model cannot build."""
    if patch_size < 1 or img_size[0] % patch_size or img_size[1] % patch_size or min(img_size) < 1:
        raise ValueError(f"img_size={img_size} must be positive and divisible by patch_size={patch_size}")
    if len(num_heads) != len(depths):
        raise ValueError(f"num_heads={tuple(num_heads)} needs one entry per stage of depths={tuple(depths)}")
    if any(d < 1 for d in depths):
        raise ValueError(f"depths={tuple(depths)} must all be >= 1")
    if len(window_sizes) != len(depths) or any(w < 1 for w in window_sizes):
        raise ValueError(f"window_size={tuple(window_sizes)} must be >= 1, one value or one per stage")
    if len(pretrained_window_sizes) != len(depths) or any(w < 0 for w in pretrained_window_sizes):
        raise ValueError(f"pretrained_window_sizes={tuple(pretrained_window_sizes)} needs one value >= 0 per stage")
    for i, heads in enumerate(num_heads):
        dim = embed_dim * 2 ** i
        if heads < 1 or dim % heads:
            raise ValueError(f"num_heads[{i}]={heads} must divide the stage dim {dim} (embed_dim={embed_dim} * 2**{i})")
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend={attn_backend!r} is not one of {ATTN_BACKENDS}")
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes} must be >= 0 (0: no head)")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring any supported SwinV2 state dict to this file's key layout.

    Handles Microsoft's classification checkpoints (downsample at the end of a stage, stored
    coordinate/index/mask buffers), Microsoft's SimMIM checkpoints (`encoder.` prefix, the
    old `rpe_mlp` name, a (1, 1, C) `encoder.mask_token`), timm's (`head.fc`), DDP's `module.`
    prefix, and this project's own. Encoder keys come out unprefixed; SimMIM parts come out as
    `mask_token` (1, 1, 1, C) and `decoder.*`.
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    state_dict = {k.removeprefix("encoder."): v for k, v in state_dict.items()}
    # Microsoft puts patch merging at the end of stage i, timm and we at the start of stage i+1;
    # only the Microsoft layout has a downsample in stage 0
    microsoft_layout = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if any(buffer in key for buffer in ("relative_position_index", "relative_coords_table", "attn_mask",
                                            "k_bias")):
            continue  # rebuilt for the model's own window and resolution
        key = key.replace(".rpe_mlp.", ".cpb_mlp.")
        if microsoft_layout:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        key = key.replace("head.fc.", "head.")
        if key == "mask_token" and value.ndim == 3:
            value = value.reshape(1, 1, 1, -1)  # Microsoft masks (B, L, C) token lists, we (B, H, W, C) grids
        out[key] = value
    return out


_MODEL_FACTORIES: dict[str, Callable[..., SwinTransformerV2]] = {}


def register_model(factory: Callable[..., SwinTransformerV2]) -> Callable[..., SwinTransformerV2]:
    """Add a variant factory to the registry under its function name."""
    _MODEL_FACTORIES[factory.__name__] = factory
    return factory


def _create(variant_args: dict[str, Any], overrides: dict[str, Any]) -> SwinTransformerV2:
    allowed = inspect.signature(SwinTransformerV2).parameters
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}; valid: {sorted(allowed)}")
    return SwinTransformerV2(**{**variant_args, **overrides})


@register_model
def swinv2_tiny(**overrides: Any) -> SwinTransformerV2:
    """SwinV2-T @ 256x256, window 8x8 (28.3M parameters)."""
    return _create(dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), img_size=256, window_size=8,
                        drop_path_rate=0.2), overrides)


@register_model
def swinv2_small(**overrides: Any) -> SwinTransformerV2:
    """SwinV2-S @ 256x256, window 8x8 (49.7M parameters)."""
    return _create(dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), img_size=256, window_size=8,
                        drop_path_rate=0.3), overrides)


@register_model
def swinv2_base(**overrides: Any) -> SwinTransformerV2:
    """SwinV2-B @ 256x256, window 8x8 (87.9M parameters)."""
    return _create(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), img_size=256, window_size=8,
                        drop_path_rate=0.5), overrides)


@register_model
def swinv2_large(**overrides: Any) -> SwinTransformerV2:
    """SwinV2-L @ 192x192, window 12x12 (196.7M parameters), the ImageNet-22K pretraining shape."""
    return _create(dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), img_size=192,
                        window_size=12, drop_path_rate=0.2), overrides)


@register_model
def swinv2_huge(**overrides: Any) -> SwinTransformerV2:
    """SwinV2-H @ 192x192, window 12x12 (~658M parameters), main-branch LayerNorm every 6 blocks."""
    return _create(dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), img_size=192,
                        window_size=12, drop_path_rate=0.2, main_norm_every=6), overrides)


@register_model
def swinv2_giant(**overrides: Any) -> SwinTransformerV2:
    """SwinV2-G @ 192x192, window 12x12 (3.0B parameters), main-branch LayerNorm every 6 blocks."""
    return _create(dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), img_size=192,
                        window_size=12, drop_path_rate=0.2, main_norm_every=6), overrides)


def list_models() -> list[str]:
    """Names of the registered SwinV2 variants."""
    return sorted(_MODEL_FACTORIES)


def build_model(name: str, **overrides: Any) -> SwinTransformerV2:
    """A registered SwinV2 variant with constructor arguments laid over its defaults."""
    if name not in _MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _MODEL_FACTORIES[name](**overrides)
