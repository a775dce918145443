"""Start real multi-rank jobs for the tests through DeepSpeed's own launcher.

Every distributed test goes through here so that each job gets a free master port,
one OpenMP thread per rank (2 ranks share 2 cores) and the CPU accelerator.
"""
import glob
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that nothing listens on right now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(script: str, *args: str, num_procs: int = 2, timeout: float = 900,
                  env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus N script args` and fail the test with its output if it fails."""
    launcher = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(num_procs),
           "--master_port", str(port), script, *args]
    # the interpreter's bin first: a ninja from elsewhere on PATH would rebuild DeepSpeed's cached C++ ops
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leaked, f"the job left DeepSpeed's shared all-reduce workspaces behind: {leaked}"
    return proc
