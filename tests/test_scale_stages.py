"""Fine-tuning configs and the stage plan: shipped recipes, batch shapes, memory refusals, length compression."""
from pathlib import Path

import pytest

from scale.config import ConfigError, load_finetune_config
from scale.memory import estimate_memory
from scale.stages import plan_stages, stage_of

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
GiB = 2 ** 30


def _plan(cfg, budget=16 * GiB, world=2, samples=1536, **kw):
    return plan_stages(cfg, world_size=world, samples_per_rank=samples, budget_bytes=budget, zero_stage=3,
                       offload="none", precision="fp32", **kw)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load_and_plan_on_an_80gb_gpu(path):
    cfg = load_finetune_config(path)
    assert cfg.output_dir == f"output/{path.stem}" and cfg.model.img_size == cfg.stages[0].img_size
    world = 64 if "giant" in path.stem else 8
    plans = plan_stages(cfg, world_size=world, samples_per_rank=1_281_167 // world, budget_bytes=72 * GiB,
                        zero_stage=3, offload="none", precision="bf16", even_micro_batch=True)
    assert all(p.micro_batch * p.grad_accum_steps * world == cfg.train.global_batch_size for p in plans)
    assert all(p.memory_bytes <= p.budget_bytes for p in plans)


def test_published_recipes_present():
    stems = {p.stem for p in RECIPES}
    assert {"demo_progressive", "swinv2_base_192to256", "swinv2_base_192to384", "swinv2_large_192to256",
            "swinv2_large_192to384", "swinv2_giant_192to640to1536"} <= stems


def test_auto_micro_batch_keeps_the_global_batch_and_fits():
    cfg = load_finetune_config(None, ["train.global_batch_size=64"])
    budget = 2 * GiB
    plans = _plan(cfg, budget=budget)
    assert [p.img_size for p in plans] == [s.img_size for s in cfg.stages]
    for p in plans:
        assert p.micro_batch * p.grad_accum_steps * 2 == 64
        assert p.memory_bytes <= budget
        bigger = [d for d in range(p.micro_batch + 1, 33) if 32 % d == 0]
        if bigger:  # the next divisor would not have fit
            args = {"name": cfg.model.name, **cfg.model.build_args()}
            assert estimate_memory(args, img_size=p.img_size, window_size=p.window_size, micro_batch=bigger[0],
                                   zero_stage=3, world_size=2, precision="fp32", task="classifier",
                                   pretrained_window_sizes=cfg.model.pretrained_window_sizes).total_bytes > budget


def test_a_stage_that_cannot_fit_is_refused_in_one_line():
    cfg = load_finetune_config(None)
    with pytest.raises(ConfigError) as e:
        _plan(cfg, budget=64 * 2 ** 20)
    assert "does not fit" in str(e.value) and "grad_checkpointing" in str(e.value) and "\n" not in str(e.value)
    path = REPO / "configs" / "finetune" / "demo_progressive.yaml"
    cfg = load_finetune_config(path, ["stages=[{img_size: 128, window_size: 8, steps: 2, micro_batch: 32}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\] \(128px window 8\): micro_batch 32 needs .* available"):
        _plan(cfg, budget=GiB // 4)


@pytest.mark.parametrize("stages, fragment", [
    ("[{img_size: 64, window_size: 4, steps: 3, micro_batch: 5}]", "does not divide"),
    ("[{img_size: 64, window_size: 4, steps: 3, micro_batch: 3}]", "does not divide"),
])
def test_micro_batch_must_divide_the_per_rank_batch(stages, fragment):
    cfg = load_finetune_config(None, [f"stages={stages}", "train.global_batch_size=64"])
    with pytest.raises(ConfigError, match=fragment):
        _plan(cfg)


def test_odd_micro_batch_with_mixup_is_refused():
    cfg = load_finetune_config(None, ["stages=[{img_size: 64, window_size: 4, steps: 3, micro_batch: 1}]",
                                      "train.global_batch_size=2"])
    with pytest.raises(ConfigError, match="odd but mixup"):
        _plan(cfg, even_micro_batch=True)
    assert _plan(cfg)[0].micro_batch == 1


def test_max_steps_compresses_every_stage_in_proportion():
    cfg = load_finetune_config(None, ["train.max_steps=40"])
    plans = _plan(cfg)
    assert plans[-1].end_step == 40 and all(p.end_step > p.start_step for p in plans)
    assert [p.start_step for p in plans[1:]] == [p.end_step for p in plans[:-1]]
    assert stage_of(plans, 0) == 0 and stage_of(plans, plans[0].end_step) == 1 and stage_of(plans, 40) == 2


@pytest.mark.parametrize("override, fragment", [
    ("stages=[]", "stages is empty"),
    ("stages=[{img_size: 64, window_size: 4}]", "exactly one of epochs > 0 or steps > 0"),
    ("stages=[{img_size: 100, window_size: 4, steps: 1}]", "stages[0]: model.img_size=100 must be divisible"),
    ("stages=[{img_size: 64, window_size: 4, steps: 1, micro_batch: big}]", "micro_batch must be an integer"),
    ("stages=[{img_size: 64, window_size: 4, steps: 1, lr: -1}]", "lr must be > 0"),
    ("stages=[{img_size: 64, windw_size: 4, steps: 1}]", "unknown config key stages[0].windw_size"),
    ("finetune.layer_decay=1.5", "finetune.layer_decay must be in (0, 1]"),
    ("finetune.ema_decay=1", "finetune.ema_decay must be in [0, 1)"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.micro_batch_size=8", "unknown config key train.micro_batch_size"),
])
def test_finetune_config_errors_are_one_line(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_finetune_config(None, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_global_batch_must_divide_over_ranks():
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        _plan(load_finetune_config(None), world=3)


@pytest.mark.parametrize("args, fragment", [
    (["--pretrained", "/no/such/weights.pth"], "--pretrained /no/such/weights.pth does not exist"),
    (["--pretrained", str(REPO / "configs")], "no complete checkpoint"),
    (["--config", str(REPO / "configs")], "is a folder"),
])
def test_cli_errors_fail_fast_in_one_line(tmp_path, args, fragment):
    """run_finetune.py refuses bad input in one line, exit 2, before DeepSpeed starts or an output dir exists."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "run_finetune.py"), *args, f"output_dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]
    assert lines[0].startswith("config error: ") and not out.exists()
