"""Per-device memory of one SwinV2 training step under DeepSpeed, and forward FLOPs, without allocating.

Before each fine-tuning stage the trainer picks (`micro_batch: auto`) or checks the micro-batch with
this, and refuses a stage that cannot fit in one line instead of running out of memory hours later.
It is arithmetic on shapes: the architecture comes from a model built once on the meta device (cached),
the window geometry from the model's own helpers (`stage_window`, `window_mask_groups`), the kernels from
the model's own dispatch rule (`models.attention.attention_path`).

Terms (per device):
* params: weights in the model dtype: all of them (ZeRO 0-2), or a 1/world share plus the gathered
  working set (ZeRO-3; zero3.json lets up to 1e9 gathered weights stay live).
* grads: gradient memory on top of the activations' peak: DeepSpeed's reduce bucket and partitions,
  the .grad that ZeRO 0-1 fill while activations are being freed, and the copies made after backward.
* optimizer: fp32 master weights and Adam's two moments, a 1/world share for ZeRO >= 1, 0 when offloaded.
* activations: the peak of tensors saved for backward plus the working set of the op running then,
  walked forward and backward over the ops each block really dispatches to (see `_block_ops`), times
  the allocator's overhead (ALLOCATOR_OVERHEAD).
* buffers: per-block coordinate tables, indices, window orders and masks at this resolution.
* runtime: given by the caller (CUDA context; on the CPU the RSS before the model is built).
benchmarks/bench_memory.py checks it against the peak RSS of real DeepSpeed steps (RESULTS.md).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models import attention
from models import swin_transformer_v2 as swin

__all__ = ["MemoryEstimate", "estimate_memory", "max_micro_batch", "device_memory_budget", "flops_per_image",
           "format_bytes"]

# settings of ds_configs/*.json that size DeepSpeed's buffers (elements)
REDUCE_BUCKET_ELEMENTS = {0: 0, 1: 200_000_000, 2: 200_000_000, 3: 100_000_000}
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000  # and as large a reuse distance: gathered weights stay live
# ZeRO-Infinity (ZeRO-3, offload="nvme": weights and optimizer on disk) for a host whose RAM holds neither:
# the settings benchmarks/bench_giant.py runs with (it reads them from here). No prefetch and a reuse
# distance of 0, so a weight is gathered only while its module runs; each of these bounds what stays in RAM.
NVME_PARAM_BUFFERS = 2  # offload_param.buffer_count: swap buffers of one rank's slice of the largest weight
NVME_OPTIMIZER_BUFFERS = 4  # offload_optimizer.buffer_count: fp32 master, 2 moments, gradient of a sub-group
NVME_SUB_GROUP_ELEMENTS = 1_000_000  # sub_group_size: a sub-group closes once it reaches this (or one weight)
# reduce_bucket_size: small weights' gradients gather here (resident once touched); SwinV2-G's largest
# (67M elements) bypass it either way. Measured peaks per rank, 0.59B-parameter giant: 4.59 GB at 1e7,
# 4.74 GB at 5e7, 5.09 GB at 7e7 (the largest weights then go through the bucket too).
NVME_REDUCE_BUCKET_ELEMENTS = 10_000_000
# gloo's reduce_scatter_tensor and all_gather_into_tensor allocate ~1.5x / ~1x their full tensor on the
# side (measured on 268 MB, torch 2.14.1), on top of the tensors ZeRO-3 itself holds
GLOO_REDUCE_SCATTER_TEMPORARIES = 1.5
CPB_HIDDEN = 512  # width of the log-CPB MLP
# Memory an allocator holds per byte of live activations: on the CPU the peak RSS of bare fwd+bwd steps
# was 1.05-1.19x (median 1.09) the tensors this module counts (which match the tensors autograd saves to
# 0.5%): sub-MiB tensors come from glibc's heap, where freed holes between kept ones stay resident. On a
# GPU the caching allocator's block rounding and fragmentation play the same part (not measured here).
ALLOCATOR_OVERHEAD = 1.1


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device needs for a training step; `total_bytes` is the sum of the other terms."""
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    buffers_bytes: int
    runtime_bytes: int
    total_bytes: int

    def to_dict(self) -> dict[str, int]:
        """Plain ints under the field names (for JSON)."""
        return {k: int(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class _Op:
    """A step of the forward, in bytes: what it keeps for backward, what else is live while it runs
    forward / backward, and the weight gradients (.grad) its backward leaves behind."""
    saved: int
    fwd: int = 0
    bwd: int = 0
    grad: int = 0


def _peak(ops: list[_Op], grads: bool = False) -> tuple[int, int]:
    """(saved total, peak live bytes) of running `ops` forward, then backward in reverse.

    Op k runs forward with everything saved before it alive, and backward with its own saved tensors
    still alive; with grads=True the weight gradients made so far count too (they grow while the
    activations shrink, so they overlap only in part).
    """
    saved, peak = 0, 0
    for op in ops:
        peak = max(peak, saved + op.saved + op.fwd)
        saved += op.saved
    remaining, made = saved, 0
    for op in reversed(ops):
        made += op.grad if grads else 0
        peak = max(peak, remaining + op.bwd + made)
        remaining -= op.saved
    return saved, peak


def _recomputed(ops: list[_Op], kept: int, fwd_extra: int = 0) -> _Op:
    """`ops` under torch.utils.checkpoint: only `kept` bytes (its inputs) stay; backward replays them."""
    peak = _peak(ops)[1]
    return _Op(saved=kept, fwd=peak + fwd_extra, bwd=peak, grad=sum(op.grad for op in ops))


@functools.lru_cache(maxsize=32)
def _arch(name: str, overrides: tuple, task: str) -> torch.nn.Module:
    """The model on the meta device at its smallest input (its weights do not depend on the resolution)."""
    import models

    args = dict(overrides)
    stages = len(args.get("depths", (0,) * 4))
    args.update(img_size=args.get("patch_size", 4) * 2 ** (stages - 1), window_size=1, device="meta")
    if task == "simmim":
        args.pop("num_classes", None)
        return models.build_simmim(name, **args)
    return models.build_model(name, **args)


def _model(model_args: dict, task: str) -> torch.nn.Module:
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items() if k not in
            ("name", "img_size", "window_size", "pretrained_window_sizes", "attn_backend", "attn_chunk_windows")}
    return _arch(model_args["name"], tuple(sorted(args.items())), task)


@functools.lru_cache(maxsize=256)
def _geometry(res: tuple, window: int, shifted: bool) -> tuple:
    """(window hw, padded hw, tokens per window, windows per image, groups) of a block, by the model's rules.

    groups: (windows per image, needs a mask pattern) of each attention call (`window_mask_groups`).
    """
    (wh, ww), shift = swin.stage_window(res, window)
    padded = (math.ceil(res[0] / wh) * wh, math.ceil(res[1] / ww) * ww)
    _, _, groups = attention.window_mask_groups(res, padded, (wh, ww), shift if shifted else (0, 0))
    n_windows = padded[0] // wh * (padded[1] // ww)
    return (wh, ww), padded, wh * ww, n_windows, tuple((end - start, pattern >= 0) for start, end, pattern in groups)


def _attention_ops(windows: int, n: int, c: int, heads: int, kind: str, ab: int) -> list[_Op]:
    """One attention call over `windows` windows of n tokens, its input windows not counted.

    Saved: qkv (its q and k views feed the norms) and per-row norms, unit q and k, the projection input,
    and either the probabilities and a copy of v (probs @ v cannot fold the strided view of qkv)
    ("matmul": matmul + softmax), or the log-sum-exp, the output being the projection input read as a
    view ("cpu_flash" / "sdpa" / "flex": O(N) per row). `kind` is the kernel `attention_path` picks.
    """
    tw = windows * n  # tokens in the call
    tc, scores = tw * c * ab, tw * heads * n * ab
    ops = [_Op(3 * tc + 4 * tw * heads * ab, fwd=2 * tc)]  # qkv; the unit q and k being made
    if kind == "matmul":
        return ops + [_Op(2 * tc, fwd=scores),  # unit q and k; the scores
                      _Op(scores, fwd=scores, bwd=2 * scores),  # softmax output; grads of probs and scores
                      _Op(tc, fwd=tc, bwd=scores + 2 * tc),  # copy of v; grads of probs and v
                      _Op(tc, bwd=2 * tc)]  # projection input
    bwd = 4 * tc  # gradients of the output, q, k and v
    if kind == "cpu_flash":  # the bias gradient is rebuilt SEQUENTIAL_CHUNK_ELEMENTS scores at a time
        bwd += 2 * max(attention.SEQUENTIAL_CHUNK_ELEMENTS, heads * n * n) * ab + heads * n * n * 4
    elif kind == "flex":  # the gradient of the captured (heads, N, N) mask is accumulated in fp32
        bwd += heads * n * n * 4
    else:  # GPU efficient attention allocates the bias gradient at the broadcast (windows, heads, N, N) shape
        bwd += windows * heads * n * n * ab
    return ops + [_Op(3 * tc + tw * heads * 4, fwd=tc, bwd=bwd), _Op(0, bwd=2 * tc)]


def _mlp_ops(tc: int, th: int) -> list[_Op]:
    """fc1 -> GELU -> fc2 -> norm2 over tokens of tc bytes (th bytes hidden)."""
    return [_Op(tc),  # fc1 input
            _Op(th, fwd=th, bwd=2 * th),  # GELU input; its backward holds the gradients of both sides
            _Op(th, bwd=tc + th),  # fc2 input
            _Op(tc, fwd=2 * tc, bwd=2 * tc)]  # norm2 input; norm2 output and the residual sum


def _block_ops(b: int, res: tuple, c: int, block: torch.nn.Module, window: int, backend: str, chunk_windows: int,
               cpu: bool, ab: int) -> list[_Op]:
    """The ops of one SwinV2 block at batch b, following `SwinTransformerV2Block`'s dispatch on this device."""
    (wh, ww), padded, n, n_windows, groups = _geometry(res, window, block.shifted)
    heads, hidden = block.attn.num_heads, block.mlp.fc1.out_features
    tokens, tp = b * res[0] * res[1], b * padded[0] * padded[1]  # tokens, padded tokens
    bias = heads * n * n * ab
    ops = [_Op((2 * wh - 1) * (2 * ww - 1) * (CPB_HIDDEN + heads + 2) * ab, fwd=2 * bias, bwd=2 * bias)]  # log-CPB
    has_window_masks = len(groups) > 1 and n_windows * n * n <= attention.DENSE_MASK_ELEMENTS
    path = attention.attention_path(backend, "cpu" if cpu else "cuda", heads=heads, tokens=n, windows=b * n_windows,
                                    has_window_masks=has_window_masks, training=True, chunk_windows=chunk_windows)
    kind = path.kernel
    if path.per_window_masks:  # one call over all windows: (windows, heads, N, N) masks, or flex's indexed ones
        masks = bias if kind == "flex" else n_windows * bias
        ops += [_Op(tp * c * ab, fwd=masks, bwd=masks)]
        ops += _attention_ops(b * n_windows, n, c, heads, kind, ab)
    else:
        # a group's windows are a view of the (sorted) windows when contiguous (one image, one window, or
        # all of them), else a copy; a single view keeps the whole (tokens, C) tensor alive for backward
        copied = [count for count, _ in groups if b > 1 and 1 < count < n_windows]
        ops.append(_Op((tp if len(copied) < len(groups) else 0) * c * ab + b * sum(copied) * n * c * ab))
    for count, patterned in () if path.per_window_masks else groups:
        w = b * count
        # each call gets one (heads, N, N) mask: the bias, or bias + pattern (a new tensor); fused kernels
        # and checkpointed chunks keep it for backward, matmul attention adds it in place and drops it
        kept_mask = bias if path.chunk_windows or kind != "matmul" else 0
        if path.chunk_windows:  # chunk inputs (counted above) and the mask stay; outputs pile up for the cat
            call = _attention_ops(min(w, path.chunk_windows), n, c, heads, kind, ab)
            ops.append(_recomputed(call, kept=kept_mask, fwd_extra=2 * w * n * c * ab))
        else:
            ops += [_Op(kept_mask, fwd=bias if patterned and not kept_mask else 0)]
            ops += _attention_ops(w, n, c, heads, kind, ab)
    # windows back to the grid (restore order, reverse, roll): two copies live; norm1 keeps its (padded) input
    ops.append(_Op(tp * c * ab, fwd=2 * tp * c * ab, bwd=2 * tp * c * ab))
    tc = tokens * c * ab
    rows = attention.mlp_chunk_rows(backend, tokens=tokens, hidden=hidden, training=True)
    if rows:
        rows = min(tokens, rows)
        ops.append(_recomputed(_mlp_ops(rows * c * ab, rows * hidden * ab)[1:], kept=tc, fwd_extra=2 * tc))
    else:
        ops += _mlp_ops(tc, tokens * hidden * ab)
    if isinstance(block.main_norm, torch.nn.LayerNorm):
        ops.append(_Op(tc, fwd=tc, bwd=tc))
    # the block's weight gradients, all counted from the start of its backward (a bound)
    return ops[:-1] + [_Op(ops[-1].saved, ops[-1].fwd, ops[-1].bwd, ab * sum(p.numel() for p in block.parameters()))]


def _model_ops(model: torch.nn.Module, b: int, img: int, windows: list[int], backend: str, chunk_windows: int,
               checkpointing: bool, cpu: bool, ab: int, task: str) -> list[_Op]:
    """Patch embedding, blocks (checkpointed or not), patch merging, final norm and head, in forward order."""
    encoder = model.encoder if task == "simmim" else model
    res = encoder.stage_resolutions((img, img))
    tokens = [b * r[0] * r[1] for r in res]
    dims = [encoder.embed_dim * 2 ** i for i in range(len(res))]
    pixels, t0 = b * img * img, tokens[0] * dims[0] * ab

    def grad(module: torch.nn.Module) -> int:
        return ab * sum(p.numel() for p in module.parameters())

    ops = [_Op(3 * pixels * ab + t0, fwd=t0, bwd=2 * t0, grad=grad(encoder.patch_embed))]  # images, norm input
    for i, stage in enumerate(encoder.layers):
        tc = tokens[i] * dims[i] * ab
        if i > 0:  # patch merging keeps the (tokens, 4C_prev) concat and the reduction's output for its norm
            ops.append(_Op(3 * tc, fwd=tc, bwd=3 * tc, grad=grad(stage.downsample)))
        for block in stage.blocks:
            inner = _block_ops(b, res[i], dims[i], block, windows[i], backend, chunk_windows, cpu, ab)
            ops.extend([_recomputed(inner, kept=tc)] if checkpointing else inner)
    last, rest = tokens[-1] * dims[-1] * ab, grad(model) - sum(op.grad for op in ops)
    if task == "simmim":  # decoder output, then the loss in fp32: prediction, targets, pixel mask, local statistics
        return ops + [_Op(last + 7 * pixels * 4, fwd=6 * 3 * pixels * 4, bwd=3 * 3 * pixels * 4, grad=rest)]
    return ops + [_Op(last, fwd=last, bwd=last, grad=rest)]


def _buffers(encoder: torch.nn.Module, img: int, windows: list[int], ab: int) -> int:
    """Per-block coordinate table (float), relative position index (int64), window order/restore/pattern, masks."""
    total = 0
    for res, stage, window in zip(encoder.stage_resolutions((img, img)), encoder.layers, windows):
        for block in stage.blocks:
            (wh, ww), _, n, n_windows, groups = _geometry(res, window, block.shifted)
            dense = len(groups) > 1 and n_windows * n * n <= attention.DENSE_MASK_ELEMENTS  # per-window masks
            masks = sum(patterned for _, patterned in groups) + (n_windows if dense else 0)
            total += (2 * wh - 1) * (2 * ww - 1) * 2 * ab + n * n * 8 + 3 * n_windows * 8 + masks * n * n * ab
    return total


def _model_states(p: int, pb: int, zero_stage: int, world: int, offload: str, cpu: bool,
                  largest: int = 0) -> dict[str, int]:
    """Bytes per device of p weights of pb bytes and their optimizer under DeepSpeed 0.19.8.

    Read in its source and measured on the CPU (fp32, 1 rank): ZeRO-1/2 flatten the weights into one
    buffer (the module's weights become views of it) and clone an fp32 master partition even for fp32
    weights; ZeRO-3 keeps a flat 1/world partition, an fp32 master clone and a zeroed gradient partition
    in the model dtype. Gradients go through a reduce bucket, a torch.empty: a GPU allocates it whole,
    on the CPU only the pages grads are copied into become resident. Adam's moments are fp32.

    Returns params, optimizer, kept (gradient memory alive through backward), accumulates (1: .grad fills
    up during backward, ZeRO 0-1), end (copies made once backward is over: reductions, the step's flat
    fp32 gradients) and overlaps (1: those copies already happen during backward). `largest`: elements of
    the largest weight (ZeRO-Infinity sizes its buffers by it).
    """
    if zero_stage == 3 and offload == "nvme" and cpu:
        return _nvme_states(p, pb, world, largest)
    bucket = REDUCE_BUCKET_ELEMENTS[zero_stage]
    bucket_bytes = min(p, bucket) * pb if cpu else bucket * pb * (2 if zero_stage == 2 else 1)  # overlap_comm: 2
    partition = pb * p // world
    cast = 4 * p // world if pb != 4 and offload == "none" else 0  # the step's fp32 copy of the gradients
    states = dict(params=pb * p, optimizer=0 if offload != "none" else 12 * p // world, kept=0, accumulates=1,
                  end=0, overlaps=0)
    if zero_stage == 0:  # the torch optimizer on the module's own weights, moments in their dtype
        states.update(optimizer=0 if offload != "none" else 2 * pb * p)
    elif zero_stage == 1:  # .grad of every weight until backward ends; the bucket is filled after it (CPU)
        states.update(kept=0 if cpu else bucket_bytes, end=max(bucket_bytes if cpu else 0, partition + cast))
    elif zero_stage == 2:  # grads go through the bucket as they arrive; the partition is made at its first flush
        states.update(kept=bucket_bytes + (partition if p > bucket else 0), accumulates=0,
                      end=(0 if p > bucket else partition) + cast)
    else:  # reduce-scatter copies of a full bucket (measured: 2 x 4P at 1 rank), during backward once p > bucket
        gathered = min(p, STAGE3_MAX_LIVE_PARAMETERS) * pb if world > 1 else 0
        states.update(params=partition + gathered, kept=partition + bucket_bytes, accumulates=0,
                      end=2 * min(p, bucket) * pb, overlaps=int(p > bucket))
    return states


def _nvme_states(p: int, pb: int, world: int, largest: int) -> dict[str, int]:
    """`_model_states` for ZeRO-Infinity on a CPU host: weights and optimizer states on disk, the NVME_* settings.

    Read in DeepSpeed 0.19.8's stage3.py and swap_tensor/ and measured with benchmarks/bench_giant.py (2 ranks,
    fp32). What stays in RAM is a set of buffers sized by the largest weight, not by the model, except one
    term: ZeRO-3 keeps each rank's whole gradient partition in a flat buffer, zero-filled (so resident) at
    initialisation, in the model dtype, and only copies it to disk at the end of each accumulation.
      params: the weight swap buffers (a rank's slice of the largest weight each) and, while a module runs,
        its gathered weight; with prefetch off and a reuse distance of 0 that is one weight at a time.
      optimizer: the optimizer swap buffers (4 x the largest sub-group in fp32: master, 2 moments, gradient)
        and the buffer the updated weights are written back through, which DeepSpeed sizes by the *full*
        weights of the largest sub-group.
      kept: the flat gradient partition and the touched part of the reduce bucket.
      end: the largest weight's full gradient, gloo's reduce-scatter temporaries, the rank's slice of it and
        the fp64 copy of that slice DeepSpeed takes for the gradient norm, live around the end of that
        weight's backward (during backward: overlaps=1).
    Against the peak RSS per rank (bench_giant.py, fp32, 192x192, micro-batch 1, checkpointing): SwinV2-G's
    widths with 8 blocks (0.59B) 4.61 GB estimated, 4.59 measured; SwinV2-G 9.47 estimated, 9.17 sampled 7 s
    into the first backward when the run was stopped at its memory cap (18.6 GB for the 2 ranks).
    Only for a CPU host: on a GPU the device holds none of these buffers (not modelled; the ZeRO-3 terms
    below are used there).
    """
    part = -(-largest // world)  # a rank's slice of the largest weight
    sub_group = min(-(-p // world), NVME_SUB_GROUP_ELEMENTS - 1 + part)  # a group closes once it reaches the size
    params = NVME_PARAM_BUFFERS * part * pb + (largest * pb if world > 1 else 0)
    optimizer = NVME_OPTIMIZER_BUFFERS * 4 * sub_group + min(p, sub_group * world) * pb
    kept = pb * -(-p // world) + min(p, NVME_REDUCE_BUCKET_ELEMENTS) * pb
    norm_copy = 8 * part  # _constant_buffered_norm2: part.to(torch.double)
    reduce = int((1 + GLOO_REDUCE_SCATTER_TEMPORARIES) * largest * pb) + part * pb if world > 1 else largest * pb
    end = reduce + norm_copy
    return dict(params=params, optimizer=optimizer, kept=kept, accumulates=0, end=end, overlaps=1)


def estimate_memory(model_args: dict, *, img_size: int, window_size: int | list[int], micro_batch: int,
                    zero_stage: int = 3, world_size: int = 1, offload: str = "none", checkpointing: bool = False,
                    attn_backend: str = "auto", precision: str = "bf16",
                    pretrained_window_sizes: list[int] | None = None, task: str = "classifier",
                    runtime_bytes: int = 0, device_type: str | None = None) -> MemoryEstimate:
    """Bytes one device needs to train `model_args` ({"name": ..., **build_model overrides}) at this shape.

    device_type picks the kernels the model dispatches to ("cuda": fused attention keeps O(N) per row;
    "cpu": matmul + softmax below 1024-token windows, the CPU flash kernel above); None means "cuda" for
    bf16 and "cpu" for fp32, the trainer's defaults. `pretrained_window_sizes` changes no memory.
    """
    if precision not in ("bf16", "fp32") or offload not in ("none", "cpu", "nvme") or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"precision={precision!r}, offload={offload!r}, zero_stage={zero_stage!r}: expected "
                         f"bf16|fp32, none|cpu|nvme, 0..3")
    if attn_backend not in attention.ATTN_BACKENDS or task not in ("classifier", "simmim") or micro_batch < 1:
        raise ValueError(f"attn_backend={attn_backend!r} (one of {attention.ATTN_BACKENDS}), task={task!r} "
                         f"(classifier|simmim), micro_batch={micro_batch} (>= 1)")
    if attn_backend == "auto":
        attn_backend = model_args.get("attn_backend", "auto")
    model = _model(model_args, task)
    encoder = model.encoder if task == "simmim" else model
    windows = [window_size] * len(encoder.depths) if isinstance(window_size, int) else list(window_size)
    cpu = (device_type or ("cuda" if precision == "bf16" else "cpu")) == "cpu"
    ab = 2 if precision == "bf16" else 4  # DeepSpeed's bf16 casts the module: weights, activations, buffers
    ops = _model_ops(model, micro_batch, img_size, windows, attn_backend, model_args.get("attn_chunk_windows", 0),
                     checkpointing, cpu, ab, task)
    p = sum(t.numel() for t in model.parameters())
    s = _model_states(p, ab, zero_stage, world_size, offload, cpu, max(t.numel() for t in model.parameters()))
    activations = _peak(ops)[1]
    during = _peak(ops, grads=True)[1] if s["accumulates"] else activations
    after = s["accumulates"] * ab * p + s["end"]  # backward done: all .grad and the copies, no activations
    grads = s["kept"] + (during + s["end"] if s["overlaps"] else max(during, after)) - activations
    activations = int(activations * ALLOCATOR_OVERHEAD)
    buffers = _buffers(encoder, img_size, windows, ab)
    total = s["params"] + grads + s["optimizer"] + activations + buffers + runtime_bytes
    return MemoryEstimate(s["params"], grads, s["optimizer"], activations, buffers, runtime_bytes, total)


def max_micro_batch(model_args: dict, *, budget_bytes: int, limit: int = 4096, **kwargs) -> int:
    """Largest micro-batch <= limit whose estimate fits `budget_bytes`, 0 when even 1 does not.

    kwargs are those of `estimate_memory` but micro_batch. Memory grows with the batch: double up to the
    first misfit, then bisect.
    """
    def fits(b: int) -> bool:
        return estimate_memory(model_args, micro_batch=b, **kwargs).total_bytes <= budget_bytes

    if limit < 1 or not fits(1):
        return 0
    good, bad = 1, None
    while bad is None and good < limit:
        step = min(2 * good, limit)
        good, bad = (step, None) if fits(step) else (good, step)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def device_memory_budget(device: torch.device, *, local_ranks: int = 1, headroom: float = 0.9) -> int:
    """Bytes one rank may plan for: a GPU's total memory, or the host's MemAvailable shared by its ranks."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * headroom)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(int(line.split()[1]) * 1024 / max(1, local_ranks) * headroom)
    raise RuntimeError("/proc/meminfo has no MemAvailable line: cannot size the host memory budget")


def flops_per_image(model_args: dict, *, img_size: int, window_size: int | list[int], task: str = "classifier") -> int:
    """Forward FLOPs of one image: `models.estimate_flops` on the meta-built model at these windows."""
    from models import estimate_flops

    model = copy.copy(_model(model_args, task))  # shallow copies, so the cached model keeps its windows
    encoder = model
    if task == "simmim":
        model._modules = dict(model._modules)
        encoder = model.encoder = copy.copy(model.encoder)
    encoder.window_sizes = tuple([window_size] * len(encoder.depths) if isinstance(window_size, int) else window_size)
    return estimate_flops(model, img_size)


def format_bytes(n: int) -> str:
    """'12.3 GiB' style, binary units."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
