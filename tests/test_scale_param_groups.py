"""Weight-decay groups from the model's no_weight_decay() keywords plus the 1-D rule."""
import models
from scale.param_groups import build_param_groups, no_decay_names

TINY = dict(img_size=32, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4)


def test_groups_split_by_kind():
    model = models.build_simmim("swinv2_tiny", **TINY)
    groups = build_param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    names = set(no_decay_names(model))
    by_name = dict(model.named_parameters())
    for name, p in by_name.items():
        must_skip = p.ndim <= 1 or any(k in name for k in ("cpb_mlp", "logit_scale", "mask_token"))
        assert (name in names) == must_skip, name
    assert any("cpb_mlp" in n and by_name[n].ndim == 2 for n in names)  # 2-D but excluded by keyword
    assert "mask_token" in names
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert all(id(by_name[n]) not in decay_ids for n in names)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(by_name)


def test_frozen_parameters_are_left_out():
    model = models.build_simmim("swinv2_tiny", **TINY)
    model.decoder.requires_grad_(False)
    groups = build_param_groups(model, 0.05)
    total = sum(len(g["params"]) for g in groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)
