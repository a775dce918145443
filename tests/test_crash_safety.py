"""Crashes under real kills: a rank killed after a checkpoint, every rank killed inside a save.

2 ranks through the deepspeed launcher, gloo, fp32, the demo model at 32x32. The test watches the
run's checkpoints folder and sends SIGKILL itself; then `resume=auto` must carry on as if nothing happened.
"""
import os
import signal
from pathlib import Path

import pytest

from tests.distributed import (assert_same_weights, export_weights, finish, rank_pids, run_deepspeed,
                               start_deepspeed, wait_for)

pytestmark = pytest.mark.distributed

STEPS = 6
COMMON = ["--ds_config", "ds_configs/zero2.json", "model.img_size=32", "train.micro_batch_size=8",
          "data.num_workers=0", "schedule.warmup_epochs=0", "log.every_steps=1", "log.image_every_steps=100",
          f"train.max_steps={STEPS}", "checkpoint.every_steps=3", "checkpoint.keep_last=5", "seed=5"]


def _start(out: Path, *extra: str):
    return start_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}", *extra)


def test_kill_one_rank_after_a_checkpoint_then_resume_is_bitwise_equal(tmp_path):
    run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={tmp_path / 'full'}", "resume=none", timeout=600)
    out = tmp_path / "killed"
    proc = _start(out, "resume=none")
    wait_for(lambda: (out / "checkpoints" / "step_00000003" / "COMPLETE").exists(), proc)
    ranks = rank_pids(proc)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    code, log = finish(proc)
    assert code != 0, log[-3000:]
    assert not (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()

    resumed = run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}", "resume=auto", timeout=600).stdout
    assert "step_00000003 at step 3" in resumed
    assert_same_weights(export_weights(tmp_path / "full", tmp_path / "full.pt"),
                        export_weights(out, tmp_path / "killed.pt"))


def test_kill_every_rank_inside_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "resume=none")
    saving = out / "checkpoints" / f"step_{STEPS:08d}"
    wait_for(saving.exists, proc)
    for pid in rank_pids(proc).values():
        os.kill(pid, signal.SIGKILL)
    # the kill must have landed inside the save: the new tag is there, its COMPLETE marker is not
    inside = saving.is_dir() and not (saving / "COMPLETE").exists()
    finish(proc)
    assert inside, "the save finished before the kill: nothing was tested"
    assert not (saving / "COMPLETE").exists()

    resumed = run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}", "resume=auto", timeout=600).stdout
    assert "resumed from" in resumed and "step_00000003 at step 3" in resumed, resumed[-3000:]
    assert (saving / "COMPLETE").exists()  # the half-written tag was cleared and saved again

    # files of a COMPLETE tag damaged afterwards: one line naming the tag and the fix, no traceback
    for f in saving.glob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    code, log = finish(_start(out, "resume=auto"))
    assert code != 0 and "Traceback" not in log, log[-3000:]
    assert sum("damaged" in line and str(saving) in line for line in log.splitlines()) == 1, log[-3000:]
