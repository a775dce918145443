"""Process-group setup for the deepspeed launcher, torchrun, SLURM (srun/sbatch) and plain `python`.

`deepspeed.init_distributed()` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
and ignores SLURM's variables, so under srun we translate them first. A plain
`python run_pretrain.py` gets a one-rank group, so the demo also runs without a launcher.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class DistInfo:
    """Where this process sits in the job."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 does all file and console output."""
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    return prefix if not ranges else prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_launcher_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM, or for a single process; returns what it set."""
    env = os.environ if environ is None else environ
    added: dict[str, str] = {}
    if "RANK" not in env and "SLURM_PROCID" in env:
        added = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
                 "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                 "MASTER_ADDR": env.get("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))),
                 # every task must agree on the port without talking: derive it from the job id
                 "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))}
    elif "RANK" not in env:
        added = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}
    for key, value in added.items():
        env.setdefault(key, value)
    return added


def local_world_size(environ: dict[str, str] | None = None) -> int:
    """Ranks on this machine, sharing its memory: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's
    LOCAL_SIZE, or SLURM's tasks on this node ('2(x3)' style lists give the first node's)."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in env:
            return int(env[key])
    if "SLURM_TASKS_PER_NODE" in env:
        return int(re.match(r"\d+", env["SLURM_TASKS_PER_NODE"]).group())
    return 1


def put_interpreter_bin_on_path() -> None:
    """Put this interpreter's bin folder first on PATH when it holds a ninja that PATH would not find first.

    On a CPU, `deepspeed.init_distributed` builds DeepSpeed's shared-memory comm op on first use with whatever
    `ninja` is on PATH. A venv's python started without activating the venv (`.venv/bin/python run_pretrain.py`,
    `srun .venv/bin/python ...`) would crash there on a host without a system ninja, and on a host with one it
    would rebuild the cached op (~1 min) every time runs alternate between the two ninjas, which read each
    other's build logs as stale.
    """
    bin_dir = os.path.dirname(sys.executable)
    ninja = os.path.join(bin_dir, "ninja")
    if os.access(ninja, os.X_OK) and shutil.which("ninja") != ninja:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def init_distributed() -> DistInfo:
    """Create the process group (NCCL on GPU, gloo on CPU, chosen by DeepSpeed) and pick the device."""
    import deepspeed

    map_launcher_env()
    # DeepSpeed logs every config value and bucket at INFO on every rank; our log line covers what matters
    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    put_interpreter_bin_on_path()
    deepspeed.init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        release_shm_workspace(rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shm_workspace_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for `rank` (named in its shm.cpp)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
            f"_{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_workspace(rank: int) -> None:
    """Unlink this rank's shared all-reduce workspace as soon as every rank has mapped it.

    DeepSpeed's CPU backend creates a 64 MiB /dev/shm file per rank and never unlinks it, so
    every CPU run (and every distributed test) left 128 MiB of RAM behind for good. Each rank
    maps all peers' files before `init_distributed` returns, so after a barrier the names are
    no longer needed; the mappings live on until the process exits, however it exits.
    """
    torch.distributed.barrier()
    try:
        os.unlink(shm_workspace_path(rank))
    except FileNotFoundError:  # DeepSpeed built without its shm op, or the file was never made
        pass


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init (ZeRO-3 relies on it) and reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's RNG states (drop path and anything else drawn in the main process)."""
    # numpy's key as a tensor: the state must load with torch.load(weights_only=True), which refuses ndarrays
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
