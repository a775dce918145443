"""Stop at a step every rank agrees on when the job is about to be taken away; checkpoint; come back.

Who sends what:
  * SLURM, `--signal=USR1@120` in scale/slurm/*.sbatch: SIGUSR1 to every task 120 s before the time limit.
    Stop, checkpoint, and requeue the job (`scontrol requeue`), which restarts with `resume=auto`.
  * SIGTERM: DeepSpeed's per-node launcher when it gets SIGINT/SIGTERM (it passes on only those, to one
    rank after another, and kills what is left 30 s later), torchrun's agent, `scancel`, SLURM's
    preemption and time limit, `kill` of the job's process group. Stop and checkpoint, no requeue: a
    cancelled job stays cancelled, and a preempting SLURM requeues the job by itself.
  * SIGINT (Ctrl-C): as SIGTERM; a second Ctrl-C stops at once, without the checkpoint.

Signals reach the ranks at different moments, so a rank that stopped on its own would leave the others
waiting in a collective. The handler only records the signal; `Trainer.train` adds every rank's record
to the all-reduce it does after each step anyway, so all ranks see the same sum after the same step
and stop together: no extra communication per step.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable

# sysexits.h EX_TEMPFAIL, "try again later": the job did not fail, it was stopped with a checkpoint
EXIT_PREEMPTED = 75

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # a scheduler's warning before the time limit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by `Trainer.train` once every rank stopped after the same step and the checkpoint is written."""

    def __init__(self, step: int, checkpoint: str, signals: str, requeue: bool) -> None:
        super().__init__(f"preempted at step {step} ({signals}): checkpoint {checkpoint}; resume with resume=auto")
        self.step, self.checkpoint, self.requeue = step, checkpoint, requeue


class StopSignals:
    """Which stop signals this process has received. The handler only records: it may run at any bytecode."""

    def __init__(self) -> None:
        self.received: set[int] = set()

    def install(self) -> None:
        """Catch the stop signals from now on (in the main thread, before any process group exists)."""
        for sig in REQUEUE_SIGNALS + STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and signum in self.received:
            raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now, checkpoint or not
        self.received.add(signum)

    def votes(self) -> list[float]:
        """[asked to stop, asked to stop and requeue] as 0/1, summed over the ranks by the step's all-reduce."""
        requeue = any(s in self.received for s in REQUEUE_SIGNALS)
        return [float(bool(self.received)), float(requeue)]

    def describe(self, summed: list[float]) -> str:
        """The agreed stop, in words, from the summed votes."""
        stopped, requeue = int(summed[0]), int(summed[1])
        kind = "the scheduler's warning before the time limit" if requeue else "SIGTERM or Ctrl-C"
        return f"{kind}, received by {stopped} rank(s)"


STOP = StopSignals()  # signals are per process: one record for the whole program


def requeue_job(log: Callable[[str], None]) -> None:
    """Put this SLURM job back in the queue (rank 0, after every rank's checkpoint is on disk).

    The requeued job starts the same batch script again, whose `resume=auto` takes the checkpoint.
    Outside SLURM there is nothing to requeue: the user reruns the same command.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log("not under SLURM: rerun the same command (resume=auto) to continue")
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"could not requeue SLURM job {job} ({e}): resubmit the same sbatch command to continue")
        return
    if done.returncode != 0:
        log(f"could not requeue SLURM job {job} ({done.stderr.strip() or done.returncode}): resubmit the same "
            f"sbatch command to continue")
    else:
        log(f"requeued SLURM job {job}: it restarts from this checkpoint")
