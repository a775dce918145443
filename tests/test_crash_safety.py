"""Crashes under real kills: a rank killed after a checkpoint, every rank killed inside a save.

2 ranks through the deepspeed launcher, gloo, fp32, the demo model at 32x32. The test watches the
run's checkpoints folder and sends SIGKILL itself; then `resume=auto` must carry on as if nothing happened.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO_ROOT, free_port, run_deepspeed

pytestmark = pytest.mark.distributed

STEPS = 6
COMMON = ["--ds_config", "ds_configs/zero2.json", "model.img_size=32", "train.micro_batch_size=8",
          "data.num_workers=0", "schedule.warmup_epochs=0", "log.every_steps=1", "log.image_every_steps=100",
          f"train.max_steps={STEPS}", "checkpoint.every_steps=3", "checkpoint.keep_last=5", "seed=5"]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    """The deepspeed launcher running run_pretrain.py on 2 ranks, not waited for."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "run_pretrain.py", *COMMON, f"output_dir={out}", *extra]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: psutil is not installed)."""
    try:
        children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the run_pretrain.py processes the launcher started."""
    ranks = {}
    for pid in _descendants(launcher.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in cmd:
            if arg.startswith(b"--local_rank="):
                ranks[int(arg.split(b"=")[1])] = pid
    return ranks


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll every 2 ms until `condition()`; fail if the run ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the moment to kill it:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.002)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Exit code and output of a launcher that must stop by itself (no hang)."""
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the launcher hung after a rank was killed")
    return proc.returncode, out


def _export(out: Path, dest: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(out), str(dest)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dest, weights_only=True)["model"]


def test_kill_one_rank_after_a_checkpoint_then_resume_is_bitwise_equal(tmp_path):
    run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={tmp_path / 'full'}", "resume=none", timeout=600)
    out = tmp_path / "killed"
    proc = _start(out, "resume=none")
    _wait_for(lambda: (out / "checkpoints" / "step_00000003" / "COMPLETE").exists(), proc)
    ranks = _rank_pids(proc)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    code, log = _finish(proc)
    assert code != 0, log[-3000:]
    assert not (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()

    resumed = run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}", "resume=auto", timeout=600).stdout
    assert "step_00000003 at step 3" in resumed
    a, b = _export(tmp_path / "full", tmp_path / "full.pt"), _export(out, tmp_path / "killed.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_every_rank_inside_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "resume=none")
    saving = out / "checkpoints" / f"step_{STEPS:08d}"
    _wait_for(saving.exists, proc)
    for pid in _rank_pids(proc).values():
        os.kill(pid, signal.SIGKILL)
    # the kill must have landed inside the save: the new tag is there, its COMPLETE marker is not
    inside = saving.is_dir() and not (saving / "COMPLETE").exists()
    _finish(proc)
    assert inside, "the save finished before the kill: nothing was tested"
    assert not (saving / "COMPLETE").exists()

    resumed = run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}", "resume=auto", timeout=600).stdout
    assert "resumed from" in resumed and "step_00000003 at step 3" in resumed, resumed[-3000:]
    assert (saving / "COMPLETE").exists()  # the half-written tag was cleared and saved again

    # files of a COMPLETE tag damaged afterwards: one line naming the tag and the fix, no traceback
    for f in saving.glob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    code, log = _finish(_start(out, "resume=auto"))
    assert code != 0 and "Traceback" not in log, log[-3000:]
    assert sum("damaged" in line and str(saving) in line for line in log.splitlines()) == 1, log[-3000:]
