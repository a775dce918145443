"""What --pretrained sources are and which windows their log-CPB MLP learned at."""
from types import SimpleNamespace

import pytest
import torch

import models
from models.swin_transformer_v2 import log_cpb_coords
from scale.config import ConfigError, load_config
from scale.pretrained import open_pretrained, stage_windows, windows_from_coords
from scale.tasks import build_task


def _microsoft_state_dict(windows, pretrained):
    """Keys and buffer shapes as Microsoft's SwinV2 checkpoints store them: (1, 2W-1, 2W-1, 2) tables."""
    sd = {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}
    for i, (w, p) in enumerate(zip(windows, pretrained)):
        for j in range(2):
            sd[f"layers.{i}.blocks.{j}.attn.relative_coords_table"] = log_cpb_coords((w, w), (p, p))[None]
    return sd


@pytest.mark.parametrize("windows, pretrained, expected", [
    ([16, 16, 16, 8], [12, 12, 12, 6], [12, 12, 12, 6]),  # a 22K->1K fine-tune at 256/w16 from 192/w12
    ([12, 12, 12, 6], [0, 0, 0, 0], [12, 12, 12, 6]),  # normalised by its own windows
    ([24, 24, 24, 12], [12, 12, 12, 6], [12, 12, 12, 6]),
])
def test_windows_recovered_from_microsoft_coordinate_tables(windows, pretrained, expected):
    sd = _microsoft_state_dict(windows, pretrained)
    assert windows_from_coords(sd) == expected
    assert windows_from_coords({f"encoder.{k}": v for k, v in sd.items()}) == expected  # SimMIM layout


def test_timm_files_keep_no_tables():
    assert windows_from_coords(models.build_model("swinv2_tiny", num_classes=0).state_dict()) is None


def test_stage_windows_clamp_to_small_stages_and_keep_pretrained_ones():
    assert stage_windows({"name": "swinv2_base", "img_size": 192, "window_size": 12}) == [12, 12, 12, 6]
    assert stage_windows({"name": "swinv2_tiny", "img_size": 64, "window_size": 4}) == [4, 4, 4, 2]
    assert stage_windows({"name": "swinv2_base", "img_size": 256, "window_size": 16,
                          "pretrained_window_sizes": [12, 12, 12, 6]}) == [12, 12, 12, 6]


def test_sources_are_identified(tmp_path):
    ms = tmp_path / "ms.pth"
    torch.save({"model": _microsoft_state_dict([8, 8, 8, 4], [0, 0, 0, 0]), "epoch": 3}, ms)
    source = open_pretrained(ms)
    assert (source.kind, source.windows) == ("file", [8, 8, 8, 4])
    export = tmp_path / "export.pt"
    torch.save({"model": {}, "model_args": {"name": "swinv2_tiny", "img_size": 64, "window_size": 4}, "step": 1},
               export)
    assert (open_pretrained(export).kind, open_pretrained(export).windows) == ("export", [4, 4, 4, 2])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable torch checkpoint"):
        open_pretrained(text)
    with pytest.raises(ConfigError, match="does not exist"):
        open_pretrained(tmp_path / "missing.pth")


def test_a_self_supervised_export_gives_the_backbone_its_evaluation_reads(tmp_path):
    """EsViT evaluates and fine-tunes its teacher: --pretrained takes `teacher.encoder.*`, not the student's."""
    tiny = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,2,2]"]
    cfg = load_config("configs/pretrain/demo_esvit.yaml", tiny)
    task = build_task("esvit", cfg, SimpleNamespace(device=torch.device("cpu")), log=lambda _: None)
    module = task.build_method()
    export = tmp_path / "esvit.pt"
    torch.save({"model": module.state_dict(), "model_args": task.model_args(), "step": 4}, export)
    source = open_pretrained(export)
    assert (source.kind, source.windows, source.feature_prefix) == ("export", [4, 4, 4, 2], "teacher.encoder.")
    classifier = models.build_model("swinv2_tiny", img_size=64, window_size=4, num_classes=12, embed_dim=16,
                                    depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
    report = models.load_pretrained(classifier, source.state_dict())
    assert report.unexpected_keys == [] and all(k.startswith("head.") for k in report.missing_keys)
    teacher = module.teacher["encoder"].state_dict()
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in teacher.items())

    vit = load_config("configs/pretrain/demo_sit.yaml", ["model.name=deit_tiny_patch16_224", "model.embed_dim=null"])
    torch.save({"model": {}, "model_args": build_task("sit", vit, SimpleNamespace(device=torch.device("cpu")),
                                                      log=lambda _: None).model_args(), "step": 1}, export)
    with pytest.raises(ConfigError, match="fine-tunes SwinV2; export it with .* --format timm"):
        open_pretrained(export)
