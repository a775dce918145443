"""Encoders for the self-supervised methods: our SwinV2 by name, or a timm ViT/DeiT by name (random init).

Every backbone here is built headless (`num_classes=0`), so `backbone(x)` is its pooled (B, C)
feature (SwinV2: mean of the normalised last-stage tokens; ViT: the class token) and
`backbone.num_features` its width; `backbone_tokens` gives the (B, N, C) final tokens without a
class token, for methods that work on tokens (EsViT's region matching, SiT's reconstruction).
"""
from typing import Any

import torch
from torch import nn

from .flops import estimate_flops
from .swin_transformer_v2 import SwinTransformerV2, build_model, list_models

__all__ = ["TIMM_PREFIXES", "backbone_flops", "backbone_stride", "backbone_tokens", "build_backbone",
           "is_timm_backbone"]

# timm families the seeds report results with (MoBY: DeiT-S, SiT: ViT-S/B)
TIMM_PREFIXES = ("vit_", "deit_")
# what a timm ViT takes from `model:`; its patch size, depth and heads come with its name
TIMM_ARGS = ("img_size", "embed_dim", "drop_path_rate", "device", "dtype")


def is_timm_backbone(name: str) -> bool:
    """Whether `name` is a timm ViT/DeiT architecture (not one of our SwinV2 names)."""
    import timm

    return name not in list_models() and name.startswith(TIMM_PREFIXES) and name in timm.list_models()


def build_backbone(name: str, **overrides: Any) -> nn.Module:
    """A headless encoder: SwinV2 `name` from our registry, or timm's `name` (ViT/DeiT), never downloaded.

    SwinV2 takes every override `build_model` takes. A timm ViT takes img_size, embed_dim and
    drop_path_rate; anything else given for it (window size, stage depths) raises a ValueError.
    """
    overrides = {**overrides, "num_classes": 0}
    if name in list_models():
        return build_model(name, **overrides)
    if not is_timm_backbone(name):
        raise ValueError(f"backbone {name!r} is neither a SwinV2 ({', '.join(list_models())}) nor a timm ViT/DeiT "
                         f"(e.g. vit_small_patch16_224, deit_small_patch16_224)")
    import timm

    unused = sorted(k for k in overrides if k not in TIMM_ARGS + ("num_classes",))
    if unused:
        raise ValueError(f"timm backbone {name} does not take {', '.join(unused)}: leave them out of model:")
    # pretrained=False: nothing is downloaded, the methods train from scratch
    vit = timm.create_model(name, pretrained=False, weight_init="skip", **overrides)
    _init_timm_vit(vit)
    return vit


def _init_timm_vit(vit: nn.Module) -> None:
    """timm's ViT init (mode ''), in timm's order, walked with Module.apply.

    timm walks the layers with its own `named_apply`, which deepspeed.zero.Init does not see: under
    ZeRO-3 every layer, partitioned as it was built, would keep torch's default init instead. zero.Init
    gathers each module's weights around `Module.apply`, so the same init goes through that; without
    ZeRO-3 the weights are exactly what `timm.create_model` gives for the same seed.
    """
    from timm.layers import trunc_normal_
    from timm.models.vision_transformer import init_weights_vit_timm

    def tokens(module: nn.Module) -> None:
        if module is vit:
            if vit.pos_embed is not None:
                trunc_normal_(vit.pos_embed, std=0.02)
            for token in (vit.cls_token, vit.reg_token):
                if token is not None:
                    nn.init.normal_(token, std=1e-6)

    def layers(module: nn.Module) -> None:
        if module is not vit:  # the root's own init_weights would walk everything again
            init_weights_vit_timm(module, needs_reset=False)  # as timm: layers keep their own reset

    vit.apply(tokens)
    vit.apply(layers)


def backbone_tokens(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, C), final normalised tokens (B, N, C) without a class token) of one forward pass."""
    if isinstance(backbone, SwinTransformerV2):
        tokens = backbone.forward_tokens(x).flatten(1, 2)  # (B, h*w, C)
        return tokens.mean(dim=1), tokens
    tokens = backbone.forward_features(x)  # timm ViT: (B, prefix + N, C) after the final norm
    pooled = backbone.forward_head(tokens, pre_logits=True)
    return pooled, tokens[:, backbone.num_prefix_tokens:]


def backbone_stride(backbone: nn.Module) -> int:
    """Pixels per side of one final token: SwinV2's patch size times its patch mergings, a ViT's patch size."""
    if isinstance(backbone, SwinTransformerV2):
        return backbone.patch_size * 2 ** (len(backbone.depths) - 1)
    return backbone.patch_embed.patch_size[0]


def backbone_flops(backbone: nn.Module, img_size: int) -> int:
    """Analytic forward FLOPs of one `img_size` image through the backbone (matmuls only, as `estimate_flops`)."""
    if isinstance(backbone, SwinTransformerV2):
        return estimate_flops(backbone, img_size)
    patch = backbone.patch_embed.patch_size[0]
    dim, tokens = backbone.embed_dim, (img_size // patch) ** 2 + backbone.num_prefix_tokens
    hidden = backbone.blocks[0].mlp.fc1.out_features
    block = 2 * tokens * dim * (4 * dim + 2 * hidden) + 2 * 2 * tokens ** 2 * dim  # qkv+proj, mlp; q@k, attn@v
    return 2 * (tokens - backbone.num_prefix_tokens) * dim * 3 * patch ** 2 + len(backbone.blocks) * block
