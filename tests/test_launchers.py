"""The trainer under torchrun: 2 processes on one node, and 2 "nodes" x 1 process on this machine.

With 2 nodes of 1 process each, every process has LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1 while RANK
is 0 and 1: a path that took the local rank for the global one would have two rank 0s, writing the
same trainer file and both printing. torchrun also runs the tests of training results (tests/distributed.py);
the deepspeed launcher the tests of stopping, killing and preempting; SLURM's srun is in tests/test_slurm.py.
Last, a venv's python run without activating the venv, on a host whose PATH has no ninja.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import REPO_ROOT, free_port, job_env

pytestmark = pytest.mark.distributed

STEPS = 3
COMMON = ["model.img_size=32", "train.micro_batch_size=8", "data.num_workers=0", "log.every_steps=1",
          "log.image_every_steps=100", f"train.max_steps={STEPS}", "seed=5"]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _assert_trained_on_two_ranks(out: Path, log: str) -> None:
    assert "2 rank(s) on cpu" in log, log[-3000:]
    assert log.count(f"step {STEPS}/{STEPS}") == 1, log[-3000:]  # rank 0 alone prints
    final = out / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").exists()
    assert sorted(p.name for p in final.glob("trainer_rank*.pt")) == ["trainer_rank00000.pt", "trainer_rank00001.pt"]


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "run_pretrain.py",
                           *COMMON, f"output_dir={out}"], cwd=REPO_ROOT, env=job_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_trained_on_two_ranks(out, proc.stdout)


def test_torchrun_two_nodes_of_one_process(tmp_path):
    out, port = tmp_path / "run", str(free_port())
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", port, "run_pretrain.py", *COMMON,
                               f"output_dir={out}"], cwd=REPO_ROOT, env=job_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    _assert_trained_on_two_ranks(out, results[0][0])
    assert "step " not in results[1][0], results[1][0][-2000:]  # node 1's only rank is rank 1: silent


def test_venv_python_started_without_activation_on_a_host_without_ninja(tmp_path):
    """`.venv/bin/python run_pretrain.py` with only a compiler on PATH: DeepSpeed's CPU comm op must be built (or
    loaded) with the venv's own ninja; it raised "ninja not being installed" at init before
    scale.dist.init_distributed saw to it."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("c++", "cc", "gcc", "g++", "as", "ld"):  # what a JIT build of the op runs, ninja aside
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    env = {**job_env(), "PATH": str(tools), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run_pretrain.py", *COMMON, "train.max_steps=1", "checkpoint.every_steps=0",
                           f"output_dir={out}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "done: 1 steps" in proc.stdout
