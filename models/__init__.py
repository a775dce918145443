"""Plain-PyTorch SwinV2 and SimMIM: build, load foreign weights, count FLOPs."""
from .flops import estimate_flops
from .pretrained import LoadReport, load_pretrained, timm_mismatches, timm_model_args, to_timm_state_dict
from .simmim import SimMIM, build_simmim
from .swin_transformer_v2 import ATTN_BACKENDS, SwinTransformerV2, build_model, list_models

__all__ = ["ATTN_BACKENDS", "LoadReport", "SimMIM", "SwinTransformerV2", "build_model", "build_simmim",
           "estimate_flops", "list_models", "load_pretrained", "timm_mismatches", "timm_model_args",
           "to_timm_state_dict"]
