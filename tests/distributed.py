"""Start real multi-rank jobs for the tests through DeepSpeed's own launcher or torchrun (SLURM: test_slurm.py).

Every distributed test goes through here so that each job gets a free master port,
one OpenMP thread per rank (2 ranks share 2 cores) and the CPU accelerator. Tests of how a job is
launched, stopped, killed or preempted use `deepspeed`, as users run it; tests of what the training
computes use `torchrun`, which starts the ranks ~3 s sooner and returns ~3 s sooner after they exit (the
deepspeed runner and its launch.py are two more Python processes that import DeepSpeed and torch). Jobs a
test interrupts itself (kills, stop signals) are started without waiting, in their own session, and
watched through /proc (psutil is not installed).
"""
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that nothing listens on right now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a test job: CPU accelerator, one thread per rank, this checkout and venv first."""
    # the interpreter's bin first: a ninja from elsewhere on PATH would rebuild DeepSpeed's cached C++ ops
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _run_job(cmd: list[str], port: int, timeout: float, env: dict | None,
             cwd: Path | None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=job_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leaked, f"the job left DeepSpeed's shared all-reduce workspaces behind: {leaked}"
    return proc


def run_deepspeed(script: str, *args: str, num_procs: int = 2, timeout: float = 900,
                  env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus N script args` and fail the test with its output if it fails."""
    launcher = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(num_procs),
           "--master_port", str(port), script, *args]
    return _run_job(cmd, port, timeout, env, cwd)


def run_torchrun(script: str, *args: str, num_procs: int = 2, timeout: float = 900,
                 env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node N script args` and fail the test with its output if it fails."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(num_procs),
           "--master_port", str(port), script, *args]
    return _run_job(cmd, port, timeout, env, cwd)


def start_deepspeed(script: str, *args: str, num_procs: int = 2) -> subprocess.Popen:
    """The deepspeed launcher running `script` on N ranks in a session of its own, not waited for."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_procs),
           "--master_port", str(free_port()), script, *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    try:
        children = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the training processes the deepspeed launcher started."""
    ranks = {}
    for pid in descendants(launcher.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in cmd:
            if arg.startswith(b"--local_rank="):
                ranks[int(arg.split(b"=")[1])] = pid
    return ranks


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll every 2 ms until `condition()`; fail if the run ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the moment to interrupt it:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.002)


def logged_step(output_dir: Path) -> int:
    """The last optimizer step the run logged to its metrics.jsonl (0 before the first)."""
    try:
        lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((int(line.split(",")[0].split(":")[1]) for line in lines if line.endswith("}")), default=0)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Exit code and output of a job that must end by itself; the output ends when its last process does."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the job hung")
    return proc.returncode, out


def export_weights(output_dir: Path, dest: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest checkpoint, through `python -m scale.export`."""
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(output_dir), str(dest)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dest, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equal state dicts."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
