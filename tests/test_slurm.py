"""The sbatch template on a real one-node SLURM cluster (tests/slurm/start_cluster.sh): 2 srun tasks on gloo.

SLURM itself delivers the pre-timeout signal (`scancel --signal=USR1`, which is what `--signal=USR1@120`
sends) and requeues the job; the requeued job starts the same batch script again and must end with the
same weights as an uninterrupted one.
"""
import re
import subprocess
import sys
import time

import pytest

from tests.distributed import REPO_ROOT, assert_same_weights, export_weights, job_env, logged_step

pytestmark = pytest.mark.distributed

STEPS = 12
COMMON = ["--ds_config", "ds_configs/zero2.json", "model.img_size=32", "train.micro_batch_size=8",
          "data.num_workers=0", "schedule.warmup_epochs=0", "log.every_steps=1", "log.image_every_steps=100",
          f"train.max_steps={STEPS}", "checkpoint.every_steps=0", "seed=5"]


@pytest.fixture(scope="module")
def cluster():
    started = subprocess.run(["bash", str(REPO_ROOT / "tests" / "slurm" / "start_cluster.sh")],
                             capture_output=True, text=True, timeout=600)
    if started.returncode == 3:  # the script's "cannot install or start SLURM here"
        pytest.skip(f"no SLURM cluster: {started.stderr.strip().splitlines()[-1]}")
    assert started.returncode == 0, started.stdout + started.stderr


def sbatch(*args: str, wait: bool = False) -> tuple[str, subprocess.CompletedProcess]:
    """Submit the pretraining template from the repository root, as a user does; returns the job id."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=job_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=900)
    return done.stdout.split(";")[0].strip(), done  # --parsable: "id" or "id;cluster"


def job_field(job: str, key: str) -> str:
    """One field of `scontrol show job` (MinJobAge keeps ended jobs there for a day)."""
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    found = re.search(rf"\b{key}=(\S+)", shown)
    return found.group(1) if found else ""


def submit_args(tmp, name: str) -> list[str]:
    return ["--ntasks", "2", "--job-name", name, f"--output={tmp}/%x-%j.out", "scale/slurm/pretrain.sbatch",
            *COMMON, f"output_dir={tmp / name}"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    job, done = sbatch(*submit_args(tmp, "full"), wait=True)
    log = (tmp / f"full-{job}.out").read_text() if job else ""
    return tmp / "full", done, log


def test_sbatch_template_with_2_tasks_runs_the_demo_to_the_end(uninterrupted):
    out, done, log = uninterrupted
    assert done.returncode == 0, done.stderr + log[-4000:]
    assert "2 rank(s) on cpu" in log and f"done: {STEPS} steps" in log, log[-4000:]
    assert logged_step(out) == STEPS


def test_usr1_from_slurm_checkpoints_requeues_and_the_job_finishes_bitwise_equal(uninterrupted, tmp_path):
    job, done = sbatch(*submit_args(tmp_path, "preempted"))
    assert done.returncode == 0 and job, done.stderr
    out, log_file = tmp_path / "preempted", tmp_path / f"preempted-{job}.out"
    try:
        deadline = time.monotonic() + 300
        while logged_step(out) < 2:
            assert job_field(job, "JobState") in ("PENDING", "RUNNING"), log_file.read_text()[-4000:]
            assert time.monotonic() < deadline, "the job logged no second step in 300 s"
            time.sleep(0.05)
        signalled = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True)
        assert signalled.returncode == 0, signalled.stderr
        # requeued -> pending (until the begin time SLURM sets) -> running again -> completed
        while job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            assert time.monotonic() < deadline + 300, f"job {job} did not end: {job_field(job, 'JobState')}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = log_file.read_text()
    assert job_field(job, "JobState") == "COMPLETED", log[-6000:]
    assert job_field(job, "Restarts") == "1", log[-6000:]
    stops = re.findall(r"^preempted at step (\d+) \(the scheduler's warning before the time limit, received by "
                       r"2 rank\(s\)\)", log, re.M)
    assert len(stops) == 1 and 2 <= int(stops[0]) < STEPS, log[-6000:]
    assert f"requeued SLURM job {job}" in log, log[-6000:]
    assert f"job {job}, start 2: 2 task(s)" in log, log[-6000:]  # one log per job: the restart appends
    assert f"at step {stops[0]}" in log and f"done: {STEPS} steps" in log, log[-6000:]

    full, _, _ = uninterrupted
    assert_same_weights(export_weights(full, tmp_path / "full.pt"), export_weights(out, tmp_path / "requeued.pt"))
