"""Stop signals under the deepspeed launcher: every rank stops after one agreed step, checkpoints, exits 75.

2 ranks, gloo, fp32, the demo model at 32x32. The test sends the signals itself, the way a scheduler
does: SIGTERM to the job's whole process group, or SIGUSR1 to one rank only (signals reach ranks at
different moments). SLURM's own delivery and requeue are in tests/test_slurm.py.
"""
import os
import signal

import pytest

from scale.preemption import EXIT_PREEMPTED, REQUEUE_SIGNALS, STOP_SIGNALS, StopSignals
from tests.distributed import (assert_same_weights, export_weights, finish, logged_step, rank_pids, run_deepspeed,
                               start_deepspeed, wait_for)


STEPS = 12
COMMON = ["--ds_config", "ds_configs/zero2.json", "model.img_size=32", "train.micro_batch_size=8",
          "data.num_workers=0", "schedule.warmup_epochs=0", "log.every_steps=1", "log.image_every_steps=100",
          f"train.max_steps={STEPS}", "checkpoint.every_steps=0", "seed=5"]


def _stopped_at(log: str) -> int:
    """The step the run said it stopped at."""
    lines = [line for line in log.splitlines() if line.startswith("preempted at step ")]
    assert len(lines) == 1, log[-3000:]  # rank 0 says it once
    return int(lines[0].split()[3])


@pytest.fixture
def stop_signals():
    """A StopSignals installed in this process, pytest's own handlers back afterwards."""
    before = {sig: signal.getsignal(sig) for sig in REQUEUE_SIGNALS + STOP_SIGNALS}
    stop = StopSignals()
    stop.install()
    yield stop
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_signals_are_recorded_as_votes_and_a_second_ctrl_c_aborts(stop_signals):
    assert stop_signals.votes() == [0.0, 0.0]
    os.kill(os.getpid(), signal.SIGTERM)  # handlers run between bytecodes, before kill() returns here
    assert stop_signals.votes() == [1.0, 0.0]
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop_signals.votes() == [1.0, 1.0]
    assert stop_signals.describe([2.0, 1.0]) == "the scheduler's warning before the time limit, received by 2 rank(s)"
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.distributed
def test_sigterm_to_the_job_checkpoints_and_resume_is_bitwise_equal(tmp_path):
    run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={tmp_path / 'full'}", timeout=600)
    out = tmp_path / "stopped"
    proc = start_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}")
    wait_for(lambda: logged_step(out) >= 2, proc)
    # what a scheduler or `kill -- -PGID` does; the one-node `deepspeed` command itself passes nothing on
    os.killpg(proc.pid, signal.SIGTERM)
    _, log = finish(proc)
    step = _stopped_at(log)
    assert 2 <= step < STEPS, log[-3000:]
    assert "received by 2 rank(s)" in log, log[-3000:]
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags == [f"step_{step:08d}"], tags
    assert (out / "checkpoints" / tags[0] / "COMPLETE").exists()

    resumed = run_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}", "resume=auto", timeout=600).stdout
    assert f"at step {step}" in resumed, resumed[-3000:]
    assert_same_weights(export_weights(tmp_path / "full", tmp_path / "full.pt"),
                        export_weights(out, tmp_path / "stopped.pt"))


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    proc = start_deepspeed("run_pretrain.py", *COMMON, f"output_dir={out}")
    wait_for(lambda: logged_step(out) >= 2, proc)
    os.kill(rank_pids(proc)[1], signal.SIGUSR1)  # rank 0 never gets it
    code, log = finish(proc)
    assert code == EXIT_PREEMPTED, log[-3000:]
    step = _stopped_at(log)
    assert "the scheduler's warning before the time limit, received by 1 rank(s)" in log, log[-3000:]
    assert "not under SLURM: rerun the same command (resume=auto)" in log, log[-3000:]
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "COMPLETE").exists() and len(list(ckpt.glob("trainer_rank*.pt"))) == 2
    assert "Traceback" not in log, log[-3000:]
