"""Every ds_configs/*.json, filled from a YAML, is accepted by DeepSpeed's own config parser."""
import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from scale.config import ConfigError, load_config
from scale.ds_config import fill_ds_config, load_ds_config, zero_stage

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def _fill(raw, overrides=(), world_size=2, cuda=False):
    cfg = load_config(None, list(overrides))
    return fill_ds_config(raw, cfg, world_size=world_size, cuda=cuda, peak_lr=1e-4)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "gpu"])
def test_accepted_by_deepspeed_parser(path, cuda):
    ds = _fill(load_ds_config(path), ["train.micro_batch_size=16", "train.grad_accum_steps=2"], world_size=1,
               cuda=cuda)
    parsed = DeepSpeedConfig(ds)  # no process group: DeepSpeed assumes world size 1
    assert parsed.train_micro_batch_size_per_gpu == 16
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.train_batch_size == 32
    assert parsed.gradient_clipping == 5.0  # explicit, not DeepSpeed's silent default
    assert parsed.bfloat16_config.enabled is cuda
    assert parsed.zero_optimization_stage == zero_stage(ds) == int(path.stem[4])


def test_every_config_sets_gradient_clipping_explicitly():
    for path in DS_CONFIGS:
        assert isinstance(json.loads(path.read_text()).get("gradient_clipping"), float), path


def test_zero3_is_tuned():
    z = json.loads((REPO / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "reduce_bucket_size",
                "stage3_max_live_parameters"):
        assert isinstance(z[key], int)
    off = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())["zero_optimization"]
    assert off["offload_optimizer"]["device"] == off["offload_param"]["device"] == "cpu"


def test_contradictions_are_reported_all_at_once():
    raw = load_ds_config(REPO / "ds_configs" / "zero2.json")
    raw.update(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=4)
    with pytest.raises(ConfigError) as e:
        _fill(raw, ["train.micro_batch_size=16", "optim.clip_grad=1.0"])
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=8 but the YAML gives 16" in msg
    assert "gradient_accumulation_steps=4 but the YAML gives 1" in msg
    assert "gradient_clipping=5.0 but the YAML gives 1.0" in msg
    assert "\n" not in msg


def test_matching_explicit_values_are_fine():
    raw = load_ds_config(REPO / "ds_configs" / "zero1.json")
    raw.update(train_micro_batch_size_per_gpu=16)
    assert _fill(raw, ["train.micro_batch_size=16"])["train_micro_batch_size_per_gpu"] == 16


def test_missing_clipping_and_scheduler_are_errors():
    raw = load_ds_config(REPO / "ds_configs" / "zero1.json")
    del raw["gradient_clipping"]
    with pytest.raises(ConfigError, match="gradient_clipping is not set"):
        _fill(raw)
    assert _fill(raw, ["optim.clip_grad=3.0"])["gradient_clipping"] == 3.0
    raw = load_ds_config(REPO / "ds_configs" / "zero1.json")
    raw["scheduler"] = {"type": "WarmupLR"}
    with pytest.raises(ConfigError, match="schedules each group itself"):
        _fill(raw)


def test_precision_follows_yaml_and_device():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    assert _fill(raw, cuda=True)["bf16"]["enabled"] is True
    assert _fill(raw, cuda=False)["bf16"]["enabled"] is False
    assert _fill(raw, ["train.precision=bf16"], cuda=False)["bf16"]["enabled"] is True
    raw["bf16"]["enabled"] = True
    with pytest.raises(ConfigError, match="bf16.enabled=True but the YAML gives False"):
        _fill(raw, ["train.precision=fp32"])


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")
