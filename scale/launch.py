"""What every entry point does the same way around its loop: CLI shape, process setup, demo data, run files.

`run_pretrain.py` and `run_finetune.py` take the same options (`--ds_config`, `--config`, the
launcher's `--local_rank`, dotted overrides), start the same way under any launcher, find the demo
shards the same way and leave the same resolved `config.yaml` and `ds_config.json` in the output dir.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from scale.config import REPO_ROOT, ConfigError, RunConfig
from scale.dist import DistInfo, map_launcher_env
from scale.ds_config import precision_of
from scale.host_memory import return_freed_host_memory
from scale.preemption import STOP


def trainer_arg_parser(description: str, demo_config: Path) -> argparse.ArgumentParser:
    """The options every trainer takes; a trainer adds its own before parsing."""
    p = argparse.ArgumentParser(description=description,
                                epilog="overrides: section.key=value words after the options, type-checked "
                                       "against the config, e.g. train.max_steps=100 output_dir=/x resume=auto")
    p.add_argument("--ds_config", default=str(REPO_ROOT / "ds_configs" / "zero3.json"),
                   help="DeepSpeed JSON (sharding, buckets); default ds_configs/zero3.json")
    p.add_argument("--config", default=None,
                   help=f"experiment YAML; omitted = the demo ({demo_config.relative_to(REPO_ROOT)})")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; LOCAL_RANK is used")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p


def start_process() -> tuple[int, bool, bool]:
    """Launcher variables (deepspeed, torchrun, SLURM or none) and the host allocator policy.

    Returns (world size, whether this is rank 0, whether a GPU is used), known before any process group.
    """
    STOP.install()  # from the first moment: SIGUSR1's default action would end the job without a checkpoint
    map_launcher_env()  # RANK/WORLD_SIZE from the launcher, SLURM, or a one-process default
    cuda = torch.cuda.is_available()
    if not cuda:  # activations live in host memory: keep its footprint to the live tensors
        return_freed_host_memory()
    return int(os.environ["WORLD_SIZE"]), os.environ["RANK"] == "0", cuda


def check_can_start(cfg: RunConfig) -> None:
    """What would only fail after init: an output dir that cannot be made, a MASTER_PORT already taken."""
    parent = Path(cfg.output_dir).absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={cfg.output_dir} cannot be created ({parent} is not a writable folder): "
                          f"choose an output_dir in a writable folder")
    # rank 0 hosts the rendezvous store on MASTER_PORT, unless torchrun's agent already does
    if os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        with socket.socket() as s:
            # as the store does: a port left in TIME_WAIT by the previous run (a requeued job reuses its port) is free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
            except OSError as e:
                if e.errno == 98:  # EADDRINUSE; any other error (a remote MASTER_ADDR) is init's to report
                    raise ConfigError(f"MASTER_PORT={os.environ['MASTER_PORT']} is in use on this host: set "
                                      f"MASTER_PORT (or --master_port) to a free port") from None


def config_error(error: Exception, is_main: bool) -> int:
    """Say what is wrong with the input in one line (from rank 0 only) and give the exit code for it."""
    if is_main:
        print(f"config error: {error}", file=sys.stderr, flush=True)
    return 2


def main_rank_log(info: DistInfo) -> Callable[[str], None]:
    """print on rank 0, nothing elsewhere: one log line per event, whatever the number of ranks."""
    return (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)


def data_path_or_demo(path: str, info: DistInfo) -> str:
    """`path`, or the demo shards when it is empty (rank 0 writes them on first use, the others wait)."""
    import deepspeed.comm as dist

    import data

    if path:
        return path
    if info.is_main:
        data.demo_shards()
    dist.barrier()
    return data.demo_shards()


def announce_device(ds: dict[str, Any], cuda: bool, log: Callable[[str], None]) -> None:
    """On a CPU, say why the numbers differ from a GPU run."""
    if not cuda:
        log("no GPU found: training in fp32 on CPU (bf16 is emulated and ~20x slower there)"
            if precision_of(ds) == "fp32" else "bf16 on CPU: emulated here, ~20x slower than fp32")


def write_run_files(cfg: RunConfig, ds: dict[str, Any], info: DistInfo) -> None:
    """The resolved config and DeepSpeed config, in the output dir, to reproduce the run (rank 0)."""
    if info.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
        with open(os.path.join(cfg.output_dir, "ds_config.json"), "w") as f:
            json.dump(ds, f, indent=1)


def exit_process(code: int) -> NoReturn:
    """`sys.exit(code)`, without the 1-2 s per process that Python's shutdown spends in garbage collection.

    torch, torchvision, timm and DeepSpeed leave millions of objects, and the collections at
    shutdown walk them all (a trainer rank: 2.3 s measured, 0.4 s frozen). Frozen objects are
    still freed and atexit handlers still run; only cyclic garbage among them is not collected,
    and every file a trainer writes is closed before this.
    """
    gc.freeze()
    sys.exit(code)
