"""Weights out to timm: `to_timm_state_dict` + `timm_model_args` give a strict-loading, equal-output timm SwinV2."""
import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from models import build_model, build_simmim, timm_mismatches, timm_model_args, to_timm_state_dict
from tests.test_models import TINY, perturb_


def timm_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, logits) of the timm twin of `model`, loaded strictly from the converted weights."""
    twin = TimmSwinV2(**timm_model_args(model)).eval()
    twin.load_state_dict(to_timm_state_dict(model.state_dict()), strict=True)
    with torch.no_grad():
        return twin.forward_head(twin.forward_features(x), pre_logits=True), twin(x)


@pytest.mark.parametrize("img_size, window_size, pretrained, arch", [
    (64, 4, (0, 0, 0, 0), {}),
    (64, 8, (4, 4, 4, 2), {}),  # windows clamped to the small stages, no shift there
    (96, 6, (0, 0, 0, 0), dict(embed_dim=24, num_heads=(3, 6, 12, 24))),
    (64, (8, 4, 4, 2), (0, 0, 0, 0), dict(num_classes=0)),  # per-stage windows, headless
    (128, 8, (6, 6, 6, 3), dict(depths=(1, 1, 3, 1), mlp_ratio=2.0)),
])
def test_classifier_converts_to_timm_with_equal_outputs(img_size, window_size, pretrained, arch):
    # padded stages (e.g. 80px at window 6) are left out: timm attends to its zero padding where we mask
    # it, so outputs differ there by design; timm_mismatches reports those (next test)
    model = perturb_(build_model("swinv2_tiny", img_size=img_size, window_size=window_size,
                                 pretrained_window_sizes=pretrained, **{**TINY, **arch})).eval()
    assert timm_mismatches(model) == []
    x = torch.randn(2, 3, img_size, img_size)
    features, logits = timm_outputs(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), features, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=0)


def test_resized_model_converts_at_its_new_size():
    """After the log-CPB transfer 64px/window 4 -> 128px/window 8, timm is built at the new size."""
    model = perturb_(build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)).eval()
    model.set_input_size(128, 8, pretrained_window_sizes=(4, 4, 4, 2))
    args = timm_model_args(model)
    assert args["img_size"] == (128, 128) and args["window_size"] == (8, 8, 8, 8)
    assert args["pretrained_window_sizes"] == (4, 4, 4, 2)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_outputs(model, x)[1], atol=1e-5, rtol=0)


def test_simmim_and_task_wrapped_state_dicts_convert_to_a_headless_timm_model():
    simmim = perturb_(build_simmim("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 0})).eval()
    converted = to_timm_state_dict(simmim.state_dict())
    assert not any(k.startswith(("encoder.", "mask_token", "decoder.", "head")) for k in converted)
    twin = TimmSwinV2(**timm_model_args(simmim)).eval()
    twin.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(simmim.encoder.forward_features(x), twin(x), atol=1e-5, rtol=0)

    classifier = build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)
    wrapped = {f"encoder.{k}": v for k, v in classifier.state_dict().items()}  # the fine-tune task's layout
    converted = to_timm_state_dict(wrapped)
    assert converted.keys() == TimmSwinV2(**timm_model_args(classifier)).state_dict().keys()
    assert torch.equal(converted["head.fc.weight"], classifier.head.weight)


def test_what_timm_cannot_hold_or_compute_is_named():
    giant_like = build_model("swinv2_tiny", device="meta", main_norm_every=1, **TINY)
    with pytest.raises(ValueError, match="main-branch LayerNorm"):
        timm_model_args(giant_like)
    with pytest.raises(ValueError, match="main_norm"):
        to_timm_state_dict(giant_like.state_dict())
    padded = build_model("swinv2_tiny", device="meta", img_size=80, window_size=6, **TINY)  # 20x20 and 10x10 tokens
    notes = timm_mismatches(padded)
    assert len(notes) == 2 and notes[0].startswith("stage 0: 20x20") and notes[1].startswith("stage 1: 10x10")
