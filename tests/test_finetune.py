"""run_finetune.py end to end on 2 real CPU ranks (torchrun; the preempted run under `deepspeed --num_gpus 2`, as
users stop it; gloo, fp32, ZeRO-3).

Launches shared by the tests below (module fixture): the demo pretraining cut to 12 steps; the demo progressive
fine-tune (64/w4 -> 96/w6 -> 128/w8) from it, shortened to 200 steps (a small SwinV2 needs ~150 steps at
64 px before it separates the classes, then climbs fast); and a copy of that fine-tune cut back to its
checkpoint in the middle of stage 2, continued with `resume=auto`, stopped by SIGTERM to the job a
few steps later (a preemption inside a stage) and continued again to the end.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.distributed import REPO_ROOT, finish, logged_step, run_torchrun, start_deepspeed, wait_for

pytestmark = pytest.mark.distributed

FINETUNE_STEPS = 200  # stages get 185, 8 and 7 steps (6 : 0.25 : 0.25 epochs)
MID_STAGE_2 = 188  # a checkpoint inside stage 2 (steps 186-193)
COMMON = ["data.num_workers=0", "log.every_steps=1", "seed=5"]


def _losses(out) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (its evaluation records carry no loss)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train"] for r in records if "loss/train" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    pretrain = root / "pretrain"
    # a few SimMIM steps: the fine-tune starts from a real run's weights and windows (12 of the demo's 96
    # steps; the classes separate in the fine-tune either way)
    run_torchrun("run_pretrain.py", *COMMON, "train.max_steps=12", "checkpoint.every_steps=0",
                 f"output_dir={pretrain}", timeout=600)
    stdout = {}
    full = root / "full"
    stdout["full"] = run_torchrun("run_finetune.py", "--pretrained", str(pretrain), *COMMON,
                                  f"train.max_steps={FINETUNE_STEPS}", f"checkpoint.every_steps={MID_STAGE_2}",
                                  "checkpoint.keep_last=5", f"output_dir={full}", timeout=900).stdout
    resumed = root / "resumed"
    later = [f"step_{s:08d}" for s in range(MID_STAGE_2 + 1, FINETUNE_STEPS + 1)]
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns(*later, "metrics.json", "metrics.jsonl",
                                                                 "tensorboard"))
    args = ["--pretrained", str(pretrain), *COMMON, f"train.max_steps={FINETUNE_STEPS}",
            f"checkpoint.every_steps={MID_STAGE_2}", "checkpoint.keep_last=5", f"output_dir={resumed}"]
    proc = start_deepspeed("run_finetune.py", *args)
    wait_for(lambda: logged_step(resumed) > MID_STAGE_2, proc, timeout=600)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stdout["preempted"] = finish(proc)  # the one-node `deepspeed` command itself dies of the signal
    stdout["resumed"] = run_torchrun("run_finetune.py", *args, timeout=900).stdout
    return root, stdout


def test_metrics_json_has_every_stage_and_beats_chance(runs):
    root, stdout = runs
    metrics = json.loads((root / "full" / "metrics.json").read_text())
    assert metrics["num_classes"] == 12
    stages = metrics["stages"]
    assert [(s["img_size"], s["window_size"]) for s in stages] == [(64, 4), (96, 6), (128, 8)]
    assert [s["steps"] for s in stages] == [185, 8, 7]
    for s in stages:
        assert {"top1", "top5", "epochs"} <= set(s) and 0 <= s["top1"] <= s["top5"] <= 100
    chance = 100 / 12
    # well above chance at the last stage's resolution (this shortened schedule gives ~21%, the full demo ~49%)
    assert stages[-1]["top1"] > 2 * chance, stages
    assert "loaded run weights" in stdout["full"] and "RANDOM INIT" not in stdout["full"]
    assert "log-CPB normalised by windows [4, 4, 4, 2]" in stdout["full"]  # the pretraining's 64/w4 windows


def test_each_stage_keeps_the_global_batch(runs):
    _, stdout = runs
    for line in [l for l in stdout["full"].splitlines() if l.startswith("stage ") and "micro-batch" in l]:
        micro, accum = int(line.split("micro-batch ")[1].split()[0]), int(line.split(" x ")[1].split()[0])
        assert micro * accum * 2 == 64, line


def test_resume_mid_stage_2_and_after_a_preemption_is_bitwise_equal(runs):
    root, stdout = runs
    assert f"at step {MID_STAGE_2}" in stdout["preempted"]
    stopped = [line for line in stdout["preempted"].splitlines() if line.startswith("preempted at step ")]
    assert len(stopped) == 1, stdout["preempted"][-3000:]
    step = int(stopped[0].split()[3])
    assert MID_STAGE_2 < step < FINETUNE_STEPS and f"at step {step}" in stdout["resumed"], stopped
    full = json.loads((root / "full" / "metrics.json").read_text())
    resumed = json.loads((root / "resumed" / "metrics.json").read_text())
    assert resumed["stages"] == full["stages"]  # exact float equality of every stage's top1/top5
    losses, again = _losses(root / "full"), _losses(root / "resumed")
    assert sorted(again) == list(range(MID_STAGE_2 + 1, FINETUNE_STEPS + 1))
    assert all(again[s] == losses[s] for s in again)


def test_best_checkpoint_is_kept_and_exports_for_timm(runs, tmp_path):
    root, _ = runs
    metrics = json.loads((root / "full" / "metrics.json").read_text())
    best = root / "full" / "checkpoints" / metrics["best"]["checkpoint"]
    assert (best / "COMPLETE").exists()
    out = tmp_path / "timm.pt"
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(best), str(out), "--format", "timm"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import timm.models.swin_transformer_v2 as timm_swin

    import models

    meta = json.loads((best / "meta.json").read_text())
    args = {k: v for k, v in meta["model_args"].items() if k not in ("kind", "name", "drop_path_rate")}
    ours = models.build_model(meta["model_args"]["name"], **args)
    models.load_pretrained(ours, torch.load(out, weights_only=True))
    theirs = timm_swin.SwinTransformerV2(**models.timm_model_args(ours))
    theirs.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, args["img_size"], args["img_size"])
    torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=1e-4, atol=1e-5)
