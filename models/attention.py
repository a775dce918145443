"""Window-attention kernels for SwinV2, and the one rule that picks among them.

The architecture (models/swin_transformer_v2.py) computes q, k, v and the masks; this module decides how
softmax(q @ k^T + bias + mask) @ v is run and runs it. Every path gives the published model's numerics;
they differ in speed and in what they keep for backward. `attention_path` is the whole dispatch rule:
the model follows it, and scale/memory.py plans memory with it, so the plan cannot drift from what runs.

Kernels:
* "matmul": q @ k^T, softmax, @ v. Fastest for small windows on the CPU; keeps the (N, N) probabilities.
* "sdpa": `F.scaled_dot_product_attention` with the float mask (memory-efficient or cuDNN kernel on GPUs).
* "cpu_flash": torch's CPU flash kernel, with the bias gradient it lacks rebuilt a few windows at a time.
* "flex": `flex_attention` with the (heads, N, N) bias + shift mask added in its `score_mod`.
And layouts: one call per mask group (windows sorted so a group shares one mask), or on the CPU one call
over all windows with per-window masks, or the paper's "sequential self-attention": groups cut into
checkpointed chunks of windows so attention memory stops growing with the number of windows.
"""
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["ATTN_BACKENDS", "AttentionPath", "attention_path", "mlp_chunk_rows", "attend", "run_in_chunks",
           "window_partition", "window_reverse", "window_mask_groups", "CPUFlashAttentionWithBias"]

# auto: fused, sequential for large training calls; fused: the device's fastest exact kernel; sequential:
# fused in checkpointed chunks; plain: matmul + softmax anywhere; flex: flex_attention (GPU training only:
# torch has no flex_attention backward on the CPU).
ATTN_BACKENDS = ("auto", "fused", "sequential", "plain", "flex")
# Shifted-window mask value of the published model: exp(-100) is 0 after softmax in fp32/bf16.
MASK_VALUE = -100.0
# The sequential path keeps one chunk's intermediates alive at a time, each about this many
# elements (attention scores or MLP hidden units): 2^24 = 64 MiB in fp32.
SEQUENTIAL_CHUNK_ELEMENTS = 2 ** 24
# "auto" goes sequential above this many elements in one block's call (scores for attention, hidden
# units for the MLP): below it, keeping the whole call's intermediates is cheaper than recomputing.
AUTO_SEQUENTIAL_ELEMENTS = {"attention": 2 ** 31, "mlp": 2 ** 25}
# Window tokens from which the CPU flash kernel is used: below, matmul + softmax with per-window masks
# trains faster; from 1024 (window 32) on, flash keeps the (N, N) scores out of memory. Whole SwinV2-T
# training steps on 2 cores, flash vs matmul: window 12 (N=144) 2.35 vs 1.90 s, window 24 (N=576)
# 3.77 vs 3.43 s, window 32 (N=1024) 6.30 vs 6.02 s; SwinV2-B window 16 (N=256) 6.04 vs 5.55 s.
CPU_FLASH_MIN_TOKENS = 1024
# A per-window mask (num_windows, N, N) is kept for the small-window CPU path up to this size (16 MiB).
DENSE_MASK_ELEMENTS = 2 ** 22
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(frozen=True)
class AttentionPath:
    """How one block attends.

    kernel: "matmul", "sdpa", "cpu_flash" or "flex" (module docstring).
    per_window_masks: one call over all windows, each with its own mask, instead of one call per mask group
        ((windows, N, N) masks for "matmul"; patterns picked by window index inside the kernel for "flex").
    chunk_windows: windows per checkpointed chunk (sequential self-attention); 0 for one call per group.
    """
    kernel: str
    per_window_masks: bool
    chunk_windows: int


def attention_path(backend: str, device_type: str, *, heads: int, tokens: int, windows: int,
                   has_window_masks: bool, training: bool, chunk_windows: int = 0) -> AttentionPath:
    """The dispatch rule: which kernel and layout a block uses.

    Args:
        backend: one of ATTN_BACKENDS.
        device_type: "cpu" or "cuda" (any other accelerator is treated as "cuda").
        heads, tokens: heads and tokens per window (N).
        windows: windows in the block's call, all images of the batch.
        has_window_masks: the block built (windows, N, N) masks (small windows, several mask patterns).
        training: autograd records this call (sequential chunks and the CPU bias gradient need it).
        chunk_windows: the user's windows per chunk for the sequential path, 0 to size them automatically.
    """
    cpu = device_type == "cpu"
    if backend == "flex" and cpu and training:
        raise ValueError("attn_backend='flex' cannot train on the CPU (torch's flex_attention has no CPU backward): "
                         "use attn_backend='auto'")
    if backend == "plain":
        kernel = "matmul"
    elif backend == "flex":
        kernel = "flex"
    elif cpu:
        kernel = "matmul" if _CPU_FLASH is None or tokens < CPU_FLASH_MIN_TOKENS else "cpu_flash"
    else:
        kernel = "sdpa"
    scores_per_window = heads * tokens * tokens
    sequential = backend == "sequential" or (
        backend == "auto" and training and windows * scores_per_window > AUTO_SEQUENTIAL_ELEMENTS["attention"])
    chunk = (chunk_windows or max(1, SEQUENTIAL_CHUNK_ELEMENTS // scores_per_window)) if sequential else 0
    # small CPU windows: one matmul + softmax call over all windows (timm's way) beats sorting windows
    # into mask groups; large windows and GPUs keep the groups and their fused kernels
    per_window = kernel == "flex" or (has_window_masks and cpu and kernel == "matmul" and not sequential)
    return AttentionPath(kernel, per_window, chunk)


def mlp_chunk_rows(backend: str, *, tokens: int, hidden: int, training: bool) -> int:
    """Tokens per checkpointed chunk of the MLP on the sequential path, 0 for one call."""
    if backend == "sequential" or (backend == "auto" and training and tokens * hidden > AUTO_SEQUENTIAL_ELEMENTS["mlp"]):
        return max(1, SEQUENTIAL_CHUNK_ELEMENTS // hidden)
    return 0


class CPUFlashAttentionWithBias(torch.autograd.Function):
    """softmax(q @ k^T + bias) @ v on the CPU flash kernel, with a gradient for the bias.

    torch's CPU flash kernel takes a float mask but no gradient for it, so with the trainable
    log-CPB bias `scaled_dot_product_attention` falls back to its math path, which keeps every
    window's (heads, N, N) probabilities for backward. Here forward and the q/k/v gradients run
    in the flash kernels, and the bias gradient, the sum over windows of dS = P * (dP - rowsum(dO * O)),
    is rebuilt a few windows at a time from the saved log-sum-exp: O(N) memory per window.
    Measured on 2 CPU cores (16 windows x 3 heads x 1024 tokens, fwd+bwd): 2.8 s -> 1.3 s.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q, k, v: (W, heads, N, d), scale already folded into q; bias: (1, heads, N, N)."""
        out, lse = _CPU_FLASH(q, k, v, attn_mask=bias, scale=1.0)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=1.0)
        grad_bias = None
        if ctx.needs_input_grad[3]:
            delta = (grad_out * out).sum(-1, keepdim=True)  # W, heads, N, 1
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            chunk = max(1, SEQUENTIAL_CHUNK_ELEMENTS // bias.numel())
            for start in range(0, q.shape[0], chunk):
                piece = slice(start, start + chunk)
                probs = torch.matmul(q[piece], k[piece].transpose(-2, -1)).add_(bias).sub_(lse[piece].unsqueeze(-1))
                probs = probs.exp_()
                grad_scores = torch.matmul(grad_out[piece], v[piece].transpose(-2, -1)).sub_(delta[piece]).mul_(probs)
                grad_bias += grad_scores.sum(0, keepdim=True, dtype=torch.float32)
            grad_bias = grad_bias.to(bias.dtype)
        return grad_q, grad_k, grad_v, grad_bias


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable) -> torch.Tensor:
    """flex_attention with bias and masks added in `score_mod`: no (windows, heads, N, N) tensor is built.

    The shift mask stays additive (-100, as published) rather than a block mask: a -inf block mask would
    change the numerics, and windows of <= 1024 tokens hold too few 128-token blocks for skipping to pay.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu":  # eager reference implementation (forward only on the CPU)
        return flex_attention(q, k, v, score_mod=score_mod, scale=1.0)
    if _compiled_flex is None:  # flex_attention is only a fused kernel once compiled
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, score_mod=score_mod, scale=1.0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Callable,
           kernel: str) -> torch.Tensor:
    """softmax(q @ k^T + mask) @ v on `kernel`, scale already folded into q.

    q, k, v: (..., heads, N, d); mask broadcastable to (..., heads, N, N): a (heads, N, N) bias (+ one
    shift pattern) on the grouped layout, (windows, heads, N, N) on the per-window layout; for "flex",
    q, k, v are (windows, heads, N, d) and mask is flex_attention's score_mod.
    """
    if kernel == "matmul":
        # in place: matmul keeps its inputs for backward, not its output, so the scores need no second buffer
        return torch.softmax(torch.matmul(q, k.transpose(-2, -1)).add_(mask), dim=-1) @ v
    if kernel == "flex":
        return _flex(q, k, v, mask)
    if kernel == "cpu_flash" and mask.requires_grad and torch.is_grad_enabled():
        return CPUFlashAttentionWithBias.apply(q, k, v, mask.unsqueeze(0))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0), scale=1.0)


def run_in_chunks(fn: Callable, x: torch.Tensor, chunk: int, *args: Any) -> torch.Tensor:
    """fn over pieces of x along dim 0, concatenated: the paper's sequential processing.

    Each piece is checkpointed when training, so only the piece inputs are kept for backward
    and the intermediates are rebuilt one piece at a time.
    """
    if not torch.is_grad_enabled():
        return torch.cat([fn(piece, *args) for piece in x.split(chunk)])
    return torch.cat([checkpoint(fn, piece, *args, use_reentrant=False) for piece in x.split(chunk)])


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, num_windows, window_h * window_w, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window[0], window[0], W // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window[0] * window[1], C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, num_windows, window_h * window_w, C) -> (B, H, W, C)."""
    B, _, _, C = windows.shape
    H, W = size
    x = windows.view(B, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def window_mask_groups(size: tuple[int, int], padded: tuple[int, int], window: tuple[int, int],
                       shift: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Group the windows of a (padded, shifted) feature map by the additive mask they need.

    Most windows need no mask at all; the rest share a handful of distinct patterns (last
    row, last column, corner). Sorting windows by pattern lets attention add one (N, N)
    pattern per group instead of materialising a mask per window.

    Returns:
        order: (num_windows,) permutation that makes every group contiguous.
        patterns: (P, N, N) float masks, 0 or MASK_VALUE.
        groups: (start, end, pattern index or -1 for "no mask") over the permuted windows.
    """
    Hp, Wp = padded
    region = torch.zeros(Hp, Wp, dtype=torch.long)
    if any(shift):
        # the three bands of the published shifted-window mask, on the padded grid
        bands_h = ((0, Hp - window[0]), (Hp - window[0], Hp - shift[0]), (Hp - shift[0], Hp))
        bands_w = ((0, Wp - window[1]), (Wp - window[1], Wp - shift[1]), (Wp - shift[1], Wp))
        for i, (h0, h1) in enumerate(bands_h):
            for j, (w0, w1) in enumerate(bands_w):
                region[h0:h1, w0:w1] = 3 * i + j
    valid = torch.zeros(Hp, Wp, dtype=torch.long)
    valid[:size[0], :size[1]] = 1
    # padding is added before the cyclic shift, so the valid map is shifted like the tokens
    valid = torch.roll(valid, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    region_windows = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # nW, N
    valid_windows = window_partition(valid[None, :, :, None], window)[0, :, :, 0]
    keys, pattern_of_window = torch.unique(torch.cat([region_windows, valid_windows], 1), dim=0,
                                           return_inverse=True)
    N = window[0] * window[1]
    patterns, pattern_ids = [], []
    for key in keys:
        reg, val = key[:N], key[N:]
        blocked = (reg[:, None] != reg[None, :]) | (val[None, :] == 0)
        if blocked.any():
            pattern_ids.append(len(patterns))
            patterns.append(blocked.float() * MASK_VALUE)
        else:
            pattern_ids.append(-1)
    order = torch.argsort(pattern_of_window, stable=True)
    counts = torch.bincount(pattern_of_window, minlength=len(keys)).tolist()
    groups, start = [], 0
    for key_index, count in enumerate(counts):
        groups.append((start, start + count, pattern_ids[key_index]))
        start += count
    patterns = torch.stack(patterns) if patterns else torch.zeros(0, N, N)
    return order, patterns, groups
