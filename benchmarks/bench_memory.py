"""Peak host memory of real DeepSpeed fine-tune steps on the CPU against `scale.memory`'s estimate.

    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py                 # every case
    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py --cases tiny256_z1 base192_z3

Each case runs in its own process (1 rank, no launcher: RANK/WORLD_SIZE/... set by hand, the CPU
accelerator, fp32, torch AdamW): the trainer's host allocator policy, then the RSS before the model
is built (taken as the estimate's `runtime_bytes`), then the model (under `zero.Init` for ZeRO-3),
`deepspeed.initialize`, and two steps of a cross-entropy classification loss. The peak is
`ru_maxrss`. One JSON object per case: the config, measured and estimated bytes, their ratio, and the
same two numbers less the runtime footprint (so agreement does not rest on the shared runtime term).
`--phases` adds the resident memory after each phase, for finding where a difference comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> model args and step options; every case keeps model + activations >= ~1 GB above the runtime.
# The first three are what tests/test_scale_memory.py checks (ZeRO-1/2/3, with and without checkpointing);
# the others cover the CPU flash kernel (1024-token windows) and the sequential attention path.
CASES: dict[str, dict] = {
    "tiny256_z1": dict(model={"name": "swinv2_tiny", "img_size": 256, "window_size": 8},
                       micro_batch=8, zero_stage=1, checkpointing=False),
    "tiny384_ckpt_z2": dict(model={"name": "swinv2_tiny", "img_size": 384, "window_size": 12},
                            micro_batch=6, zero_stage=2, checkpointing=True),
    "base192_z3": dict(model={"name": "swinv2_base", "img_size": 192, "window_size": 12},
                       micro_batch=4, zero_stage=3, checkpointing=False),
    "tiny512_w32_z1": dict(model={"name": "swinv2_tiny", "img_size": 512, "window_size": 32},
                           micro_batch=1, zero_stage=1, checkpointing=False),
    "small256_seq_z3": dict(model={"name": "swinv2_small", "img_size": 256, "window_size": 16,
                                   "attn_backend": "sequential"}, micro_batch=4, zero_stage=3, checkpointing=False),
}
TEST_CASES = ("tiny256_z1", "tiny384_ckpt_z2", "base192_z3")


def ds_config(zero_stage: int, micro_batch: int) -> dict:
    """A fp32 CPU config shaped like ds_configs/zero*.json after `scale.ds_config.fill_ds_config`."""
    zero = {"stage": zero_stage, "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}
    if zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if zero_stage == 3:
        zero.update(reduce_bucket_size=100_000_000, stage3_prefetch_bucket_size=100_000_000,
                    stage3_param_persistence_threshold=100_000, stage3_max_live_parameters=1_000_000_000,
                    stage3_max_reuse_distance=1_000_000_000, sub_group_size=1_000_000_000)
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch, "gradient_clipping": 5.0, "bf16": {"enabled": False},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.999],
                                                      "eps": 1e-8, "torch_adam": True, "fused": True}},
            "zero_optimization": zero, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def worker_env() -> dict[str, str]:
    """The environment of a case's process: CPU accelerator and 2 threads."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
            "PYTHONPATH": str(REPO)}


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def run_case(case: dict, phases: bool) -> dict:
    """Build, initialize and train two steps in this process; return measured and estimated bytes."""
    sys.path.insert(0, str(REPO))
    from scale.host_memory import return_freed_host_memory

    return_freed_host_memory()  # as the trainer does on CPU, before anything large is allocated
    import deepspeed
    import torch
    import torch.nn.functional as F

    import models
    from scale.dist import put_interpreter_bin_on_path
    from scale.memory import estimate_memory

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    put_interpreter_bin_on_path()  # the venv's ninja builds DeepSpeed's CPU comm op, as in scale.dist.init_distributed
    deepspeed.init_distributed()
    torch.manual_seed(0)
    model_args = dict(case["model"])
    name = model_args.pop("name")
    num_classes = model_args.get("num_classes", 1000)
    batch, stage = case["micro_batch"], case["zero_stage"]
    ds = ds_config(stage, batch)
    trace: dict[str, int] = {}
    runtime = rss_bytes()
    trace["runtime"] = runtime
    # the batch counts as activations (the patch embedding keeps it for backward)
    images = torch.randn(batch, 3, model_args["img_size"], model_args["img_size"])
    labels = torch.randint(0, num_classes, (batch,))
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = models.build_model(name, **model_args)
    if case.get("checkpointing"):
        model.set_grad_checkpointing(True)
    trace["built"] = rss_bytes()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    trace["initialized"] = rss_bytes()
    start = time.perf_counter()
    for step in range(2):
        loss = F.cross_entropy(engine(images), labels)
        trace[f"forward{step}"] = rss_bytes()
        engine.backward(loss)
        trace[f"backward{step}"] = rss_bytes()
        engine.step()
        trace[f"step{step}"] = rss_bytes()
    seconds = time.perf_counter() - start
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate = estimate_memory(case["model"], img_size=model_args["img_size"], window_size=model_args["window_size"],
                               micro_batch=batch, zero_stage=stage, checkpointing=bool(case.get("checkpointing")),
                               precision="fp32", runtime_bytes=runtime, device_type="cpu")
    out = {"measured_bytes": measured, "estimated_bytes": estimate.total_bytes,
           "ratio": round(estimate.total_bytes / measured, 3), "runtime_bytes": runtime,
           "measured_minus_runtime": measured - runtime, "estimated_minus_runtime": estimate.total_bytes - runtime,
           "ratio_minus_runtime": round((estimate.total_bytes - runtime) / (measured - runtime), 3),
           "estimate": estimate.to_dict(), "step_seconds": round(seconds / 2, 1)}
    if phases:
        out["phases"] = trace
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--phases", action="store_true", help="also report the RSS after each phase")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a case as JSON: run it in this process
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker), args.phases)))
        return
    env = worker_env()
    for name in args.cases:
        cmd = [sys.executable, __file__, "--worker", json.dumps(CASES[name])] + (["--phases"] if args.phases else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            print(json.dumps({"case": name, "error": proc.stderr[-3000:]}))
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({"case": name, "config": CASES[name], **result, "process_seconds": wall}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
