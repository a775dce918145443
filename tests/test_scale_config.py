"""Config loading: YAML + dotted overrides, type checks, one-line errors, every shipped config."""
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from scale.config import ConfigError, PretrainConfig, check_data_path, check_model_name, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_demo_is_default_and_named():
    cfg = load_config()
    assert cfg.name == "demo" and cfg.output_dir == "output/demo"
    assert cfg.resume == "auto"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    check_model_name(cfg)
    assert cfg.output_dir == f"output/{path.stem}"


def test_sizes_tiny_to_giant_present():
    stems = {p.stem for p in CONFIGS}
    assert {"demo", *(f"swinv2_{s}" for s in ("tiny", "small", "base", "large", "huge", "giant"))} <= stems


def test_interface_override_keys():
    cfg = load_config(None, ["output_dir=/x/y", "seed=7", "train.max_steps=100", "checkpoint.every_steps=50",
                             "resume=none", "model.name=swinv2_base", "data.path=/data/shards"])
    assert (cfg.output_dir, cfg.seed, cfg.train.max_steps, cfg.checkpoint.every_steps) == ("/x/y", 7, 100, 50)
    assert (cfg.resume, cfg.model.name, cfg.data.path) == ("none", "swinv2_base", "/data/shards")


def test_override_types_are_converted_and_checked():
    cfg = load_config(None, ["optim.lr=3e-4", "model.depths=[1,1,1,1]", "model.norm_target_patch_size=null"])
    assert cfg.optim.lr == 3e-4 and cfg.model.depths == [1, 1, 1, 1] and cfg.simmim.norm_target_patch_size is None
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="model.grad_checkpointing must be true or false"):
        load_config(None, ["model.grad_checkpointing=3"])


@pytest.mark.parametrize("override, fragment", [
    ("train.max_stpes=5", "unknown config key train.max_stpes"),
    ("bogus=1", "unknown config key bogus"),
    ("model.img_size=100", "model.img_size=100 must be divisible"),
    ("data.mask_patch_size=24", "simmim.mask_patch_size=24"),
    ("model.num_heads=[1,2,4]", "model.depths has 4 stages but model.num_heads has 3"),
    ("model.num_heads=[3,2,4,8]", "model.num_heads[0]=3 does not divide"),
    ("train.precision=fp16", "train.precision must be auto, bf16 or fp32"),
    ("schedule.name=step", "schedule.milestones"),
    ("train.max_steps", "not of the form"),
    ("model.attn_backend=flash", "model.attn_backend must be one of auto, fused, sequential, plain, flex"),
])
def test_errors_are_one_line_and_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="model.name='swinv2_tinny' is not registered"):
        check_model_name(load_config(None, ["model.name=swinv2_tinny"]))


def test_attention_backends_are_the_models():
    import models.attention
    from scale.config import ATTN_BACKENDS
    assert ATTN_BACKENDS == models.attention.ATTN_BACKENDS


def test_flex_attention_is_refused_on_the_cpu_before_building():
    cfg = load_config(None, ["model.attn_backend=flex"])
    check_model_name(cfg, cuda=True)
    with pytest.raises(ConfigError, match="model.attn_backend=flex trains only on GPUs") as e:
        check_model_name(cfg, cuda=False)
    assert "\n" not in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "optim.lr=2e-3"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(yaml.safe_load((tmp_path / "config.yaml").read_text()), dict)


def test_dataclasses_are_kw_only():
    with pytest.raises(TypeError):
        PretrainConfig("x")  # positional arguments are refused


def test_cli_config_error_fails_fast_in_one_line():
    """run_pretrain.py reports a bad key in one line and exits 2 before DeepSpeed or a model starts."""
    proc = subprocess.run([sys.executable, str(REPO / "run_pretrain.py"), "train.max_stpes=5"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["config error: unknown config key train.max_stpes; valid keys here: micro_batch_size, "
                     "grad_accum_steps, epochs, max_steps, precision, max_nonfinite_in_row"]


def test_model_shape_rules_are_checked_before_building(tmp_path):
    with pytest.raises(ConfigError, match="^model: ") as e:
        # only the model knows the width (96, from the registry) that these heads must divide
        check_model_name(load_config(None, ["model.embed_dim=null", "model.num_heads=[5,6,12,24]"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no \\*.tar shards"):  # a folder without shards fails before init
        check_data_path(load_config(None, [f"data.path={tmp_path}"]))
    with tarfile.open(tmp_path / "train-000000.tar", "w"):
        pass
    check_data_path(load_config(None, [f"data.path={tmp_path}"]))
    check_data_path(load_config(None, ["data.path=pipe:cat x.tar"]))
    with pytest.raises(ConfigError, match="data.path=/no/such/shards does not exist"):
        check_data_path(load_config(None, ["data.path=/no/such/shards"]))
