"""Run under `deepspeed --num_gpus 2`: a SimMIM SwinV2 built inside deepspeed.zero.Init must
equal the same model built without it (parameters, rebuilt buffers, loss).

Exits non-zero with the first difference it finds.
"""
import sys

import deepspeed
import torch

from models import build_simmim
from scale.dist import init_distributed

ARCH = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8),
            drop_path_rate=0.0)


def build(seed: int, zero_config: dict | None):
    torch.manual_seed(seed)
    if zero_config is None:
        return build_simmim("swinv2_tiny", **ARCH)
    with deepspeed.zero.Init(config_dict_or_path=zero_config):
        return build_simmim("swinv2_tiny", **ARCH)


def main() -> None:
    rank = init_distributed().rank
    base_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    reference = build(0, None).eval()
    partitioned = build(0, base_config).eval()
    assert all(p.numel() == 0 for p in partitioned.parameters()), "parameters were not partitioned"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    with deepspeed.zero.GatheredParameters(list(partitioned.parameters())), torch.no_grad():
        for (name, p_ref), (_, p_zero) in zip(reference.named_parameters(), partitioned.named_parameters()):
            if not torch.equal(p_ref, p_zero):
                sys.exit(f"rank {rank}: parameter {name} differs after zero.Init")
        for (name, b_ref), (_, b_zero) in zip(reference.named_buffers(), partitioned.named_buffers()):
            if b_ref.dtype != b_zero.dtype or not torch.equal(b_ref, b_zero):
                sys.exit(f"rank {rank}: buffer {name} differs after zero.Init")
        post_norm = partitioned.encoder.layers[2].blocks[1].norm1
        if post_norm.weight.abs().sum() != 0:
            sys.exit(f"rank {rank}: residual post-norm lost its zero init")
        loss_ref, loss_zero = reference(images, mask), partitioned(images, mask)
        if not torch.equal(loss_ref, loss_zero):
            sys.exit(f"rank {rank}: loss {loss_zero.item()} != {loss_ref.item()} unpartitioned")

    # bf16 zero.Init changes tensor-creation defaults and casts float buffers to bf16: indices must
    # stay exact integers, and tables must be the fp32 values rounded once, not computed in bf16
    bf16 = build(0, {**base_config, "bf16": {"enabled": True}})
    for (name, b_ref), (_, b_zero) in zip(reference.named_buffers(), bf16.named_buffers()):
        expected_dtype = b_ref.dtype if not b_ref.is_floating_point() else b_zero.dtype
        if b_zero.dtype != expected_dtype or not torch.equal(b_ref.to(expected_dtype), b_zero):
            sys.exit(f"rank {rank}: buffer {name} differs after bf16 zero.Init ({b_zero.dtype})")
    print(f"rank {rank}: zero.Init build identical, loss {loss_ref.item():.6f}", flush=True)


if __name__ == "__main__":
    main()
