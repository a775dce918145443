"""What --pretrained sources are and which windows their log-CPB MLP learned at."""
import pytest
import torch

import models
from models.swin_transformer_v2 import log_cpb_coords
from scale.config import ConfigError
from scale.pretrained import open_pretrained, stage_windows, windows_from_coords


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
