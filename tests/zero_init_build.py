"""Run on 2 ranks (`torchrun --nproc_per_node 2`): a SimMIM SwinV2 built inside deepspeed.zero.Init must
equal the same model built without it (parameters, rebuilt buffers, loss).

    tests/zero_init_build.py          a small SwinV2 (also under bf16 zero.Init), a timm DeiT backbone
                                      (whose weights must be timm's own init) and a small EsViT
    tests/zero_init_build.py giant    SwinV2-G's widths (embed 512 -> 4096) with fewer blocks: each rank holds
                                      half of every weight, and the output equals the unpartitioned model's

Exits non-zero with the first difference it finds.
"""
import gc
import sys

import deepspeed
import torch

from models import build_simmim
from models.backbones import build_backbone
from models.esvit import build_esvit
from scale.dist import init_distributed

ARCH = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8),
            drop_path_rate=0.0)


def build(seed: int, zero_config: dict | None):
    torch.manual_seed(seed)
    if zero_config is None:
        return build_simmim("swinv2_tiny", **ARCH)
    with deepspeed.zero.Init(config_dict_or_path=zero_config):
        return build_simmim("swinv2_tiny", **ARCH)


# SwinV2-G's widths and heads with 6 blocks instead of 50 (340M parameters instead of 3.0B): the stage-4 blocks
# (201M each) and the 67M-element MLP weights are the giant's own. Two blocks in stages 1-2 keep shifted windows.
GIANT_DEPTHS = (2, 2, 1, 1)
GIANT_IMG, GIANT_WINDOW = 64, 4  # 16x16 tokens in stage 1: shifted 4x4 windows; the last stage is 2x2


def build_giant(zero_config: dict | None):
    torch.manual_seed(0)
    args = dict(img_size=GIANT_IMG, window_size=GIANT_WINDOW, depths=GIANT_DEPTHS, drop_path_rate=0.0)
    if zero_config is None:
        return build_simmim("swinv2_giant", **args)
    with deepspeed.zero.Init(config_dict_or_path=zero_config):
        return build_simmim("swinv2_giant", **args)


def giant() -> None:
    """Each rank owns a 1/world slice of every weight, and the partitioned model computes what the whole one does.

    Memory: the reference (1.4 GB in fp32) is dropped before the partitioned model is gathered for its forward,
    and weights are compared one module at a time, so a rank peaks near 2 copies of the model, not 3.
    """
    import deepspeed.comm as dist

    info = init_distributed()
    rank, world = info.rank, info.world_size
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    partitioned = build_giant(config).eval()
    params = list(partitioned.parameters())
    if any(p.numel() for p in params):
        sys.exit(f"rank {rank}: a parameter kept its full data after zero.Init")
    # ZeRO-3 cuts every weight into `world` slices of ceil(numel / world), the last one padded
    total = sum(p.ds_numel for p in params)
    owned = sum(max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel())) for p in params)
    if any(p.partition_numel() != -(-p.ds_numel // world) or p.ds_tensor.numel() != p.partition_numel()
           for p in params):
        sys.exit(f"rank {rank}: a slice is not ceil(numel / {world}) elements")
    counts = torch.tensor([owned], dtype=torch.float64)
    dist.all_reduce(counts)
    if int(counts.item()) != total or abs(owned - total / world) > len(params):
        sys.exit(f"rank {rank}: owns {owned} of {total} parameters, all ranks {int(counts.item())}")

    reference = build_giant(None).eval()
    if sum(p.numel() for p in reference.parameters()) != total:
        sys.exit(f"rank {rank}: {total} parameters under zero.Init, {sum(p.numel() for p in reference.parameters())} "
                 f"without")
    reference_modules = dict(reference.named_modules())
    for name, module in partitioned.named_modules():  # one module's weights gathered at a time
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own]):
            for pname, p in own:
                if not torch.equal(p, getattr(reference_modules[name], pname)):
                    sys.exit(f"rank {rank}: parameter {name}.{pname} differs after zero.Init")
    images = torch.randn(1, 3, GIANT_IMG, GIANT_IMG, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(1, GIANT_IMG // 4, GIANT_IMG // 4, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    with torch.no_grad():
        expected = (reference.reconstruct(images, mask), reference(images, mask))
    del reference, reference_modules
    gc.collect()
    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        got = (partitioned.reconstruct(images, mask), partitioned(images, mask))
    for what, a, b in zip(("reconstruction", "loss"), expected, got):
        if not torch.equal(a, b):
            sys.exit(f"rank {rank}: {what} differs from the unpartitioned model's "
                     f"(max abs difference {(a - b).abs().max().item():.3g})")
    print(f"rank {rank}: giant zero.Init owns {owned} of {total} parameters, output identical, "
          f"loss {got[1].item():.6f}", flush=True)


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
    timm_and_esvit_init_survive_zero_init(rank, base_config)
    print(f"rank {rank}: zero.Init build identical, loss {loss_ref.item():.6f}", flush=True)


def timm_and_esvit_init_survive_zero_init(rank: int, zero_config: dict) -> None:
    """timm initialises a ViT through its own module walk and EsViT's DINO head its layers after building them,
    neither of which zero.Init sees on its own: built under zero.Init, both must hold the weights their
    plain builds draw with the same seed (a timm backbone: exactly timm.create_model's)."""
    import timm

    cases = {"timm backbone": (lambda: build_backbone("deit_tiny_patch16_224", img_size=32),
                               lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32,
                                                         num_classes=0)),
             "EsViT": (lambda: build_esvit("swinv2_tiny", out_dim=32, dense_out_dim=16, hidden_dim=32,
                                           bottleneck_dim=8, **ARCH),) * 2}
    for what, (build, build_reference) in cases.items():
        torch.manual_seed(0)
        expected = dict(build_reference().named_parameters())
        for zero in (False, True):
            torch.manual_seed(0)
            with deepspeed.zero.Init(config_dict_or_path=zero_config, enabled=zero):
                model = build()
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=zero):
                for name, p in model.named_parameters():
                    if not torch.equal(p, expected[name]):
                        sys.exit(f"rank {rank}: {what} parameter {name} is not its plain build's init "
                                 f"({'under' if zero else 'without'} zero.Init)")

if __name__ == "__main__":
    giant() if "giant" in sys.argv[1:] else main()  # the deepspeed launcher would add --local_rank=N
