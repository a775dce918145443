"""SwinV2 / SimMIM model tests: parity with timm, attention paths, padding, resizing, loading, FLOPs."""
import math

import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, build_simmim, estimate_flops, list_models, load_pretrained
from models.swin_transformer_v2 import SwinTransformerV2Block

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8), num_classes=7, drop_path_rate=0.0)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move zero-initialised post-norms, biases and logit scales off their init so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "logit_scale" in name or "mask_token" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def timm_twin(img_size: int, window_size, pretrained_window_sizes=(0, 0, 0, 0), **arch) -> TimmSwinV2:
    arch = {**TINY, **arch}
    return TimmSwinV2(img_size=img_size, window_size=window_size, pretrained_window_sizes=pretrained_window_sizes,
                      **arch).eval()


@pytest.mark.parametrize("img_size, window_size, pretrained, arch", [
    (64, 4, (0, 0, 0, 0), {}),
    (64, 8, (4, 4, 4, 2), {}),
    (96, 6, (0, 0, 0, 0), dict(embed_dim=24, num_heads=(3, 6, 12, 24))),
    (128, 8, (6, 6, 6, 3), dict(depths=(1, 1, 3, 1))),
    (64, (8, 4, 4, 2), (0, 0, 0, 0), {}),
])
@pytest.mark.parametrize("backend", ["fused", "sequential", "plain"])
def test_matches_timm(img_size, window_size, pretrained, arch, backend):
    reference = perturb_(timm_twin(img_size, window_size, pretrained, **arch))
    model = build_model("swinv2_tiny", img_size=img_size, window_size=window_size, pretrained_window_sizes=pretrained,
                        attn_backend=backend, **{**TINY, **arch}).eval()
    report = load_pretrained(model, reference.state_dict())
    assert not report.missing_keys and not report.unexpected_keys
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(x), reference.forward_head(reference.forward_features(x),
                                                                                     pre_logits=True),
                                   atol=1e-5, rtol=0)


def test_resolution_change_matches_timm_built_at_new_size():
    """The log-CPB transfer: 64px/window 4 -> 128px/window 8, coordinates normalised by window 4."""
    model = perturb_(build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)).eval()
    params_before = {n: p for n, p in model.named_parameters()}
    model.set_input_size(128, 8, pretrained_window_sizes=(4, 4, 4, 2))
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())
    reference = timm_twin(128, 8, (4, 4, 4, 2))
    timm_keys = {k.replace("head.", "head.fc."): v for k, v in model.state_dict().items()}
    assert not reference.load_state_dict(timm_keys, strict=False).unexpected_keys
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="set_input_size"):
        model(torch.randn(1, 3, 64, 64))


def reference_window_attention(block: SwinTransformerV2Block, x: torch.Tensor) -> torch.Tensor:
    """Attention of one block token by token, from the definition rather than the implementation.

    A real query attends to the real keys of its (shifted) window that were contiguous with it
    before the cyclic shift, i.e. neither or both wrapped around in each axis.
    """
    attn = block.attn
    B, H, W, C = x.shape
    (wh, ww), (sh, sw), (Hp, Wp) = block.window, block.shift, block.padded
    bias = attn.position_bias()  # heads, N, N
    heads, d = attn.num_heads, C // attn.num_heads
    q_all = torch.nn.functional.linear(x, attn.qkv.weight[:C], attn.q_bias)
    k_all = torch.nn.functional.linear(x, attn.qkv.weight[C:2 * C])
    v_all = torch.nn.functional.linear(x, attn.qkv.weight[2 * C:], attn.v_bias)
    scale = torch.clamp(attn.logit_scale, max=math.log(100)).exp().view(heads)
    out = torch.zeros_like(x)
    for win_r in range(Hp // wh):
        for win_c in range(Wp // ww):
            cells = [(win_r * wh + i, win_c * ww + j) for i in range(wh) for j in range(ww)]
            source = [((r + sh) % Hp, (c + sw) % Wp) for r, c in cells]  # original position of each cell
            wrapped = [(r + sh >= Hp, c + sw >= Wp) for r, c in cells]
            for qi, (qr, qc) in enumerate(source):
                if qr >= H or qc >= W:
                    continue
                keys = [ki for ki, (kr, kc) in enumerate(source)
                        if kr < H and kc < W and wrapped[ki] == wrapped[qi]]
                q = q_all[:, qr, qc].view(B, heads, d)
                k = torch.stack([k_all[:, source[ki][0], source[ki][1]] for ki in keys], 1).view(B, -1, heads, d)
                v = torch.stack([v_all[:, source[ki][0], source[ki][1]] for ki in keys], 1).view(B, -1, heads, d)
                cos = torch.einsum("bhd,bkhd->bhk", torch.nn.functional.normalize(q, dim=-1),
                                   torch.nn.functional.normalize(k, dim=-1))
                logits = cos * scale[None, :, None] + bias[:, qi, keys][None]
                out[:, qr, qc] = torch.einsum("bhk,bkhd->bhd", logits.softmax(-1), v).reshape(B, C)
    return attn.proj(out)


@pytest.mark.parametrize("resolution, window", [((8, 8), 4), ((10, 10), 4), ((9, 7), 4), ((6, 11), 3), ((26, 20), 12)])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("backend", ["fused", "sequential", "plain", "flex"])
def test_window_attention_with_padding_matches_definition(resolution, window, shifted, backend):
    torch.manual_seed(0)
    block = perturb_(SwinTransformerV2Block(16, 2, resolution, window, 0, shifted=shifted,
                                            attn_backend=backend, attn_chunk_windows=2))
    x = torch.randn(2, *resolution, 16)
    with torch.no_grad():
        torch.testing.assert_close(block._attention(x), reference_window_attention(block, x), atol=1e-5, rtol=0)


def test_attention_dispatch_rule():
    from models.attention import AttentionPath, attention_path
    small = dict(heads=3, tokens=144, windows=64, has_window_masks=True, training=True)
    assert attention_path("auto", "cpu", **small) == AttentionPath("matmul", True, 0)
    assert attention_path("auto", "cuda", **small) == AttentionPath("sdpa", False, 0)
    assert attention_path("fused", "cpu", **{**small, "tokens": 1024}) == AttentionPath("cpu_flash", False, 0)
    assert attention_path("plain", "cuda", **small) == AttentionPath("matmul", False, 0)
    assert attention_path("flex", "cuda", **small) == AttentionPath("flex", True, 0)  # patterns indexed in-kernel
    assert attention_path("sequential", "cpu", **small, chunk_windows=5) == AttentionPath("matmul", False, 5)
    # auto chunks only a training call above 2^31 scores, into 2^24-score chunks
    huge = dict(small, tokens=1024, heads=16, windows=144, has_window_masks=False)
    assert attention_path("auto", "cuda", **huge) == AttentionPath("sdpa", False, 1)
    assert attention_path("auto", "cuda", **{**huge, "training": False}) == AttentionPath("sdpa", False, 0)
    assert attention_path("auto", "cuda", **{**huge, "heads": 4}).chunk_windows == 0  # 0.6e9 scores
    assert attention_path("sequential", "cuda", **{**huge, "heads": 4}).chunk_windows == 4
    with pytest.raises(ValueError, match="flex.*CPU"):
        attention_path("flex", "cpu", **small)
    assert attention_path("flex", "cpu", **{**small, "training": False}).kernel == "flex"


@pytest.mark.parametrize("flash_min_tokens", [None, 16])
def test_attention_backends_agree_in_forward_and_backward_on_a_padded_model(monkeypatch, flash_min_tokens):
    # small chunks so that the sequential path really splits the MLP tokens too
    monkeypatch.setattr("models.attention.SEQUENTIAL_CHUNK_ELEMENTS", 4096)
    if flash_min_tokens:  # the 6x6 windows then take the CPU flash kernel and the mask groups, as large ones do
        monkeypatch.setattr("models.attention.CPU_FLASH_MIN_TOKENS", flash_min_tokens)
    torch.manual_seed(0)
    base = perturb_(build_model("swinv2_tiny", img_size=80, window_size=6, **TINY))
    x = torch.randn(2, 3, 80, 80)
    results = {}
    for backend in ("fused", "sequential", "plain"):
        base.set_attn_backend(backend, chunk_windows=3)
        base.zero_grad()
        base(x).square().sum().backward()
        results[backend] = [p.grad.clone() for p in base.parameters()]
    for backend in ("sequential", "plain"):
        for g_fused, g_other in zip(results["fused"], results[backend]):
            torch.testing.assert_close(g_other, g_fused, atol=1e-5, rtol=1e-4)


def test_cpu_flash_attention_gradients_match_autograd(monkeypatch):
    from models.attention import CPUFlashAttentionWithBias
    monkeypatch.setattr("models.attention.SEQUENTIAL_CHUNK_ELEMENTS", 3 * 144 * 144 * 2)  # 2 windows
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 3, 144, 16, requires_grad=True) for _ in range(3))
    bias = (torch.randn(1, 3, 144, 144) * 4).requires_grad_()
    grad_out = torch.randn(5, 3, 144, 16)
    CPUFlashAttentionWithBias.apply(q, k, v, bias).backward(grad_out)
    ours = [t.grad.clone() for t in (q, k, v, bias)]
    for t in (q, k, v, bias):
        t.grad = None
    (torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v).backward(grad_out)
    for mine, reference in zip(ours, (q.grad, k.grad, v.grad, bias.grad)):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)


def test_grad_checkpointing_and_offload_give_the_same_gradients():
    torch.manual_seed(0)
    model = perturb_(build_model("swinv2_tiny", img_size=64, window_size=4, **TINY))
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable, offload in ((False, False), (True, False), (True, True)):
        model.set_grad_checkpointing(enable, offload_to_cpu=offload)
        model.zero_grad()
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


EXPECTED_PARAMS_M = {"swinv2_tiny": 28.35, "swinv2_small": 49.73, "swinv2_base": 87.92, "swinv2_large": 196.74,
                     "swinv2_huge": 658.0, "swinv2_giant": 3002.0}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_M))
def test_parameter_counts_on_meta_device(name):
    model = build_model(name, device="meta")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(EXPECTED_PARAMS_M[name], rel=1e-3)
    assert model.num_classes == 1000


@pytest.mark.parametrize("name", list_models())
def test_every_size_builds_inside_a_meta_device_context(name):
    with torch.device("meta"):
        model = build_model(name)
        simmim = build_simmim(name)
    for module in (model, simmim):
        assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}
    plain = build_model(name, device="meta")
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert [(n, b.shape) for n, b in model.named_buffers()] == [(n, b.shape) for n, b in plain.named_buffers()]
    block = model.layers[0].blocks[1]
    assert block.mask_groups == plain.layers[0].blocks[1].mask_groups  # read back in Python while building
    # drop-path rates are plain floats rising linearly to the variant's rate
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for stage in model.layers for b in stage.blocks]
    assert all(type(r) is float for r in rates) and rates[0] == 0.0 and rates == sorted(rates) and rates[-1] > 0


def test_registry_and_main_branch_norms():
    assert list_models() == sorted(EXPECTED_PARAMS_M)
    giant = build_model("swinv2_giant", device="meta")
    extra_norms = [n for n, m in giant.named_modules() if n.endswith("main_norm") and isinstance(m, torch.nn.LayerNorm)]
    assert len(extra_norms) == 42 // 6
    assert not any(isinstance(m, torch.nn.LayerNorm) for n, m in build_model("swinv2_base", device="meta")
                   .named_modules() if n.endswith("main_norm"))
    assert build_model("swinv2_tiny", device="meta", main_norm_every=1).layers[0].blocks[0].main_norm is not None


@pytest.mark.parametrize("overrides, argument", [
    (dict(embed_dim=20, num_heads=(3, 6, 12, 24)), "num_heads"),
    (dict(window_size=0), "window_size"),
    (dict(img_size=250), "img_size"),
    (dict(num_heads=(3, 6, 12)), "num_heads"),
    (dict(pretrained_window_sizes=(8, 8)), "pretrained_window_sizes"),
    (dict(attn_backend="flash"), "attn_backend"),
    (dict(windows=8), "windows"),
])
def test_bad_arguments_raise_one_line_errors(overrides, argument):
    with pytest.raises(ValueError) as error:
        build_model("swinv2_tiny", device="meta", **overrides)
    assert argument in str(error.value) and "\n" not in str(error.value)


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="swinv2_tiny"):
        build_model("swinv3_tiny")


def microsoft_layout(state_dict: dict, prefix: str = "", old_cpb_name: bool = False) -> dict:
    """Rewrite this project's keys the way Microsoft's releases store them (the inverse mapping)."""
    import re
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        if old_cpb_name:
            key = key.replace(".cpb_mlp.", ".rpe_mlp.")
        out[prefix + key] = value
    return out


def test_loads_microsoft_classification_checkpoint_file(tmp_path):
    source = perturb_(build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)).eval()
    microsoft = microsoft_layout(source.state_dict())
    # Microsoft's files also carry the position tables and masks as persistent buffers
    microsoft["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    microsoft["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    path = tmp_path / "swinv2_ms.pth"
    torch.save({"model": microsoft, "epoch": 3}, path)
    target = build_model("swinv2_tiny", img_size=64, window_size=4, **TINY).eval()
    report = load_pretrained(target, path)
    assert not report.missing_keys and not report.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


def microsoft_simmim_training_checkpoint(source, path, monkeypatch) -> None:
    """Write `source` (a SimMIM module) the way Microsoft's SimMIM `save_checkpoint` does.

    Their `SwinTransformerV2ForSimMIM` is the encoder, so the (1, 1, C) mask token is `encoder.mask_token`;
    patch merging sits at the end of each stage; the position tables and shift masks are persistent
    buffers; and next to the weights sit the optimizer, timm LR scheduler and AMP scaler states and the
    run's yacs config, a dict subclass from a package this project does not install.
    """
    import sys
    import types
    from collections import OrderedDict

    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-3)
    for p in source.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # before the weights are read: it moves them (weight decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, warmup_t=10, t_in_epochs=False)
    encoder = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    model = microsoft_layout(encoder, prefix="encoder.")
    model["encoder.mask_token"] = source.mask_token.detach().reshape(1, 1, -1).clone()
    for name, block in source.encoder.named_modules():
        if isinstance(block, SwinTransformerV2Block):
            key = f"encoder.{name}"  # blocks keep their place; only patch merging moves between layouts
            model[f"{key}.attn.relative_coords_table"] = block.attn.relative_coords_table[None].clone()
            model[f"{key}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
            if any(block.shift):
                tokens = block.window[0] * block.window[1]
                model[f"{key}.attn_mask"] = torch.zeros(len(block.window_order), tokens, tokens)
    model.update({k: v for k, v in source.state_dict().items() if k.startswith("decoder.")})

    class CfgNode(dict):
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__renamed_keys__": {},
                                  "__new_allowed__": False})

    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs_config.CfgNode = CfgNode
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}  # torch.cuda.amp.GradScaler.state_dict()
    swinv2 = CfgNode({"EMBED_DIM": 16, "DEPTHS": [2, 2, 2, 2]})
    config = CfgNode({"MODEL": CfgNode({"TYPE": "swinv2", "SWINV2": swinv2}),
                      "OUTPUT": "output/simmim", "TRAIN": CfgNode({"EPOCHS": 100})})
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "yacs", yacs)
        patch.setitem(sys.modules, "yacs.config", yacs_config)
        torch.save({"model": OrderedDict(model), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(), "scaler": scaler, "max_accuracy": 0.0, "epoch": 99,
                    "config": config}, path)


def test_loads_microsoft_simmim_training_checkpoint_into_simmim_and_classifier(tmp_path, monkeypatch):
    import pickle

    source = perturb_(build_simmim("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 0})).eval()
    path = tmp_path / "ckpt_epoch_99.pth"
    microsoft_simmim_training_checkpoint(source, path, monkeypatch)
    with pytest.raises(pickle.UnpicklingError, match="yacs.config.CfgNode"):
        torch.load(path, weights_only=True)  # the weights-only loader refuses the config...
    x, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 16, 16) > 0.4).float()

    target = build_simmim("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 0}).eval()
    report = load_pretrained(target, path)  # ...load_pretrained reads the weights without importing it
    assert not report.missing_keys and not report.unexpected_keys
    torch.testing.assert_close(target.mask_token, source.mask_token, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(target(x, mask), source(x, mask))

    classifier = build_model("swinv2_tiny", img_size=64, window_size=4, **TINY).eval()
    report = load_pretrained(classifier, path)
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"]
    assert "mask_token" in report.unexpected_keys and "decoder.0.weight" in report.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(classifier.forward_features(x), source.encoder.forward_features(x))


def test_loads_released_simmim_weights_with_the_old_cpb_name():
    source = perturb_(build_simmim("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 0})).eval()
    state = source.state_dict()
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    microsoft = microsoft_layout(encoder, prefix="encoder.", old_cpb_name=True)
    microsoft["encoder.mask_token"] = state["mask_token"].reshape(1, 1, -1)
    target = build_simmim("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 0}).eval()
    report = load_pretrained(target, {"model": microsoft})
    assert sorted(report.missing_keys) == ["decoder.0.bias", "decoder.0.weight"] and not report.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.encoder.forward_features(x), source.encoder.forward_features(x))


def test_restricted_loading_runs_nothing_from_the_file(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "pwned"),)

    source = build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)
    path = tmp_path / "crafted.pth"
    torch.save({"model": source.state_dict(), "config": Payload()}, path)
    target = build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)
    assert not load_pretrained(target, path).missing_keys
    assert not (tmp_path / "pwned").exists()
    torch.testing.assert_close(target.state_dict(), source.state_dict())


def test_head_mismatch_is_skipped_other_mismatches_raise():
    source = build_model("swinv2_tiny", img_size=64, window_size=4, **TINY)
    other_head = build_model("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 3})
    assert load_pretrained(other_head, source.state_dict()).skipped_head
    wider = build_model("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "embed_dim": 32})
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_pretrained(wider, source.state_dict())


def test_simmim_loss_masks_pixels_and_trains():
    torch.manual_seed(0)
    simmim = build_simmim("swinv2_tiny", norm_target_patch_size=5, img_size=64, window_size=4,
                          **{**TINY, "num_classes": 0})
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16)
    mask[:, :8] = 1
    loss = simmim(images, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert simmim.mask_token.grad.abs().sum() > 0
    with torch.no_grad():
        prediction = simmim.reconstruct(images, mask)
    assert prediction.shape == images.shape
    raw = build_simmim("swinv2_tiny", img_size=64, window_size=4, **{**TINY, "num_classes": 0})
    with torch.no_grad():
        masked_rows = (raw.reconstruct(images, mask) - images)[:, :, :32]  # mask rows 0..7 = pixel rows 0..31
        torch.testing.assert_close(raw(images, mask), masked_rows.abs().mean())
    assert "mask_token" in simmim.no_weight_decay() and "cpb_mlp" in simmim.no_weight_decay()
    with pytest.raises(ValueError, match="mask"):
        simmim(images, mask[:, :8])


def test_normalized_targets_are_standardised_locally():
    from models.simmim import normalize_targets
    images = torch.rand(1, 3, 32, 32) * 5 + 2
    normed = normalize_targets(images, 65)  # every pixel's window covers the whole 32x32 image
    per_channel = normed.flatten(2)
    torch.testing.assert_close(per_channel.mean(-1), torch.zeros(1, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(-1), torch.ones(1, 3), atol=1e-3, rtol=0)


@pytest.mark.parametrize("img_size, window_size, simmim", [(64, 4, False), (80, 6, False), (96, 8, True)])
def test_analytic_flops_match_flop_counter(img_size, window_size, simmim):
    # FlopCounterMode has no formula for torch's CPU flash-attention op, so count on the plain path
    arch = dict(img_size=img_size, window_size=window_size, attn_backend="plain", **TINY)
    model = (build_simmim("swinv2_tiny", **{**arch, "num_classes": 0}) if simmim
             else build_model("swinv2_tiny", **arch)).eval()
    counter = FlopCounterMode(display=False)
    x = torch.randn(1, 3, img_size, img_size)
    with counter, torch.no_grad():
        model(x, torch.zeros(1, img_size // 4, img_size // 4)) if simmim else model(x)
    assert estimate_flops(model) == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_flops_of_published_sizes_are_plausible():
    # SwinV2-T at 256/window 8: timm's and Microsoft's model cards say 5.96 GMACs (5.9G FLOPs)
    assert estimate_flops(build_model("swinv2_tiny", device="meta")) / 2e9 == pytest.approx(5.96, rel=0.02)
    giant = build_model("swinv2_giant", device="meta")
    assert estimate_flops(giant, 1536) > 60 * estimate_flops(giant, 192)



def test_simmim_loss_is_computed_in_fp32_under_bf16():
    torch.manual_seed(0)
    simmim = build_simmim("swinv2_tiny", norm_target_patch_size=15, img_size=64, window_size=4,
                          **{**TINY, "num_classes": 0})
    images = torch.rand(2, 3, 64, 64) * 0.01 + 0.5  # flat: bf16 variance would cancel to noise
    mask = (torch.rand(2, 16, 16) > 0.4).float()
    loss_fp32 = simmim(images, mask)
    loss_bf16 = simmim.to(torch.bfloat16)(images.to(torch.bfloat16), mask.to(torch.bfloat16))
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=0.05)
