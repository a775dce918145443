"""run_pretrain.py end to end on 2 real CPU ranks (torchrun, gloo, fp32; the deepspeed launcher: test_crash_safety.py,
test_preemption.py).

Four launches, shared by the tests below (module fixture): the demo config shrunk to 32x32 and
6 steps under ZeRO 1, 2 and 3 with the same seed, then a copy of the ZeRO-3 output with its last
checkpoint removed, continued with `resume=auto` from step 3.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.distributed import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.distributed

STEPS = 6
COMMON = ["model.img_size=32", "train.micro_batch_size=8", "data.num_workers=0", "optim.lr=0.02",
          "schedule.warmup_epochs=0", "log.every_steps=1", "log.image_every_steps=100", f"train.max_steps={STEPS}",
          "checkpoint.every_steps=3", "checkpoint.keep_last=5", "seed=3"]


def _launch(ds_config: str, out, *extra: str) -> str:
    proc = run_torchrun("run_pretrain.py", "--ds_config", f"ds_configs/{ds_config}.json", *COMMON,
                        f"output_dir={out}", *extra, timeout=600)
    return proc.stdout


def _losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/train"] for r in records]


def _export(out, dest) -> dict:
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(out), str(dest)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dest, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    # ZeRO-1 also covers gradient accumulation (2 micro-batches of 4 = the same 8 images per rank and step)
    # and activation checkpointing
    stdout = {1: _launch("zero1", root / "z1", "resume=none", "train.micro_batch_size=4", "train.grad_accum_steps=2",
                         "model.grad_checkpointing=true")}
    stdout.update({stage: _launch(f"zero{stage}", root / f"z{stage}", "resume=none") for stage in (2, 3)})
    # an interrupted run: the ZeRO-3 run as it was after its step-3 checkpoint
    resumed = root / "z3_resumed"
    shutil.copytree(root / "z3", resumed, ignore=shutil.ignore_patterns("step_00000006", "metrics.jsonl",
                                                                       "tensorboard"))
    stdout["resumed"] = _launch("zero3", resumed, "resume=auto")
    return root, stdout


def test_demo_announced_and_fp32_fallback(runs):
    _, stdout = runs
    assert "no --config given: running the demo" in stdout[1]
    assert "no GPU found: training in fp32 on CPU" in stdout[1]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_zero_stage_trains_and_loss_falls(runs, stage):
    root, stdout = runs
    losses = _losses(root / f"z{stage}")
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert f"ZeRO stage {stage}" in stdout[stage] and f"step {STEPS}/{STEPS}" in stdout[stage]
    assert "global batch 16" in stdout[stage]
    assert (root / f"z{stage}" / "config.yaml").is_file() and (root / f"z{stage}" / "ds_config.json").is_file()


def test_stage2_and_stage3_give_the_same_loss_curve(runs):
    root, _ = runs
    torch.testing.assert_close(torch.tensor(_losses(root / "z2")), torch.tensor(_losses(root / "z3")),
                               rtol=1e-4, atol=1e-5)


def test_resume_is_bitwise_equal_to_uninterrupted(runs, tmp_path):
    root, stdout = runs
    assert "at step 3" in stdout["resumed"]
    full, resumed = _losses(root / "z3"), _losses(root / "z3_resumed")
    assert resumed == full[3:]  # exact float equality, steps 4..6
    a = _export(root / "z3", tmp_path / "full.pt")["model"]
    b = _export(root / "z3_resumed", tmp_path / "resumed.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_complete_and_rotated(runs):
    root, _ = runs
    tags = sorted(p.name for p in (root / "z3" / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000003", "step_00000006"]
    for tag in tags:
        d = root / "z3" / "checkpoints" / tag
        assert (d / "COMPLETE").exists() and (d / "meta.json").exists()
        assert sorted(p.name for p in d.glob("trainer_rank*.pt")) == ["trainer_rank00000.pt", "trainer_rank00001.pt"]


def test_tensorboard_has_scalars_and_reconstruction_image(runs):
    root, _ = runs
    acc = EventAccumulator(str(root / "z3" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/train", "lr/base", "throughput/images_per_s", "optim/grad_norm", "time/data_wait_pct",
            "memory/peak_gib"} <= set(tags["scalars"])
    assert len(acc.Scalars("loss/train")) == STEPS
    assert "simmim/input_masked_reconstruction" in tags["images"]
    image = acc.Images("simmim/input_masked_reconstruction")[-1]
    assert image.step == STEPS and image.width == 3 * 32 and image.height == 4 * 32  # 4 rows: input|masked|recon


def test_nonfinite_losses_stop_the_run_naming_the_checkpoint(tmp_path):
    """An absurd LR makes the loss non-finite after step 1: skipped steps are counted, then the run stops."""
    proc = subprocess.run([sys.executable, "run_pretrain.py", "model.img_size=32", "train.micro_batch_size=8",
                           "data.num_workers=0", "optim.lr=1e35", "schedule.warmup_epochs=0", "train.max_steps=12",
                           "checkpoint.every_steps=1", "train.max_nonfinite_in_row=3", f"output_dir={tmp_path}",
                           "resume=none"], cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 non-finite losses in a row" in proc.stdout
    assert f"the last good checkpoint is {tmp_path}/checkpoints/step_00000001" in proc.stdout
