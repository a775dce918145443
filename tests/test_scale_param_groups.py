"""Weight-decay groups from the model's no_weight_decay() keywords plus the 1-D rule; layer-wise LR decay groups."""
import pytest
import torch

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


def test_without_layer_decay_the_groups_are_the_two_of_pretraining():
    model = models.build_simmim("swinv2_tiny", **TINY)
    groups = build_param_groups(model, 0.05)
    skip = set(no_decay_names(model))
    named = list(model.named_parameters())
    assert [sorted(g) for g in groups] == [["lr_scale", "params", "weight_decay"]] * 2
    assert [id(p) for p in groups[0]["params"]] == [id(p) for n, p in named if n not in skip]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for n, p in named if n in skip]


# (name, layer id) by hand from Microsoft's rule, for SwinV2-G: depths (2, 2, 42, 4), num_layers 52
GIANT_LAYER_IDS = [
    ("patch_embed.proj.weight", 0), ("patch_embed.norm.bias", 0),
    ("layers.0.blocks.0.attn.qkv.weight", 1), ("layers.0.blocks.1.norm2.weight", 2),
    ("layers.1.downsample.reduction.weight", 2), ("layers.1.downsample.norm.weight", 2),  # with stage 0's last block
    ("layers.1.blocks.0.attn.cpb_mlp.0.weight", 3), ("layers.1.blocks.1.mlp.fc2.bias", 4),
    ("layers.2.downsample.reduction.weight", 4), ("layers.2.blocks.0.attn.logit_scale", 5),
    ("layers.2.blocks.5.main_norm.weight", 10), ("layers.2.blocks.41.main_norm.bias", 46),  # the H/G extra norms
    ("layers.3.downsample.norm.bias", 46), ("layers.3.blocks.0.attn.q_bias", 47),
    ("layers.3.blocks.3.norm1.weight", 50),
    ("norm.weight", 51), ("head.weight", 51), ("head.bias", 51),
]


def test_layer_ids_follow_microsofts_rule():
    giant = models.build_model("swinv2_giant", device="meta")
    assert giant.num_layers == 52
    names = dict(giant.named_parameters())
    for name, expected in GIANT_LAYER_IDS:
        assert name in names and giant.layer_id(name) == expected, name
    simmim = models.build_simmim("swinv2_giant", device="meta")
    assert simmim.num_layers == 52
    assert simmim.layer_id("mask_token") == 0 and simmim.layer_id("decoder.0.weight") == 51
    assert simmim.layer_id("encoder.layers.2.blocks.41.main_norm.bias") == 46
    with pytest.raises(ValueError, match="not a SwinV2 parameter"):
        giant.layer_id("pos_embed")


def _check_layer_groups(model, groups, decay, layer_of, num_layers):
    names = {id(p): n for n, p in model.named_parameters()}
    skip = set(no_decay_names(model))
    keys = [(g["layer_id"], g["weight_decay"] > 0) for g in groups]
    assert keys == sorted(keys, key=lambda k: (k[0], not k[1])) and len(set(keys)) == len(keys)
    assert sorted(n for g in groups for n in map(names.get, map(id, g["params"]))) == sorted(names.values())
    for g in groups:
        assert g["lr_scale"] == pytest.approx(decay ** (num_layers - 1 - g["layer_id"]))
        for p in g["params"]:
            assert layer_of(names[id(p)]) == g["layer_id"]
            assert (names[id(p)] in skip) == (g["weight_decay"] == 0.0)
    assert {k[0] for k in keys} == set(range(num_layers))  # every depth has a parameter
    assert groups[-1]["lr_scale"] == 1.0 and groups[0]["lr_scale"] == pytest.approx(decay ** (num_layers - 1))


@pytest.mark.parametrize("name", models.list_models())
def test_layer_decay_groups_for_every_size(name):
    for model in (models.build_model(name, device="meta"), models.build_simmim(name, device="meta")):
        groups = build_param_groups(model, 0.05, layer_decay=0.75)
        _check_layer_groups(model, groups, 0.75, model.layer_id, model.num_layers)
        assert all(g["weight_decay"] in (0.05, 0.0) for g in groups)


class FinetuneTask(torch.nn.Module):
    """How the fine-tune task holds the classifier: as `encoder`, with no decay hooks of its own."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = torch.nn.Parameter(torch.ones(()))


def test_layer_decay_through_a_task_wrapper_and_on_zero3_placeholders():
    classifier = models.build_model("swinv2_tiny", **{**TINY, "num_classes": 5})
    task = FinetuneTask(classifier)
    reference = build_param_groups(task, 0.05, layer_decay=0.5)

    last = classifier.num_layers - 1  # the wrapper's own parameters count as head

    def layer_of(name):
        return classifier.layer_id(name.removeprefix("encoder.")) if name.startswith("encoder.") else last

    _check_layer_groups(task, reference, 0.5, layer_of, classifier.num_layers)
    assert any("cpb_mlp" in n for n in no_decay_names(task))  # the encoder's no-decay keywords apply
    assert reference[-1]["layer_id"] == last and any(p is task.temperature for p in reference[-1]["params"])

    # ZeRO-3 leaves empty placeholders behind and the real shape in ds_shape
    for p in task.parameters():
        p.ds_shape = tuple(p.shape)
        p.data = torch.empty(0)
    partitioned = build_param_groups(task, 0.05, layer_decay=0.5)
    assert [[id(p) for p in g["params"]] for g in partitioned] == [[id(p) for p in g["params"]] for g in reference]
    assert [(g["layer_id"], g["weight_decay"], g["lr_scale"]) for g in partitioned] == \
        [(g["layer_id"], g["weight_decay"], g["lr_scale"]) for g in reference]


def test_layer_decay_needs_a_model_with_layer_ids():
    with pytest.raises(TypeError, match="layer_id"):
        build_param_groups(torch.nn.Linear(2, 2), 0.05, layer_decay=0.9)
    assert len(build_param_groups(torch.nn.Linear(2, 2), 0.05)) == 2
