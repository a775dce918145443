"""SwinV2-G (3.0B parameters) on a 24 GB, 2-core CPU box: ZeRO-3 with ZeRO-Infinity offload to disk.

    python benchmarks/bench_giant.py                          # SwinV2-G, 2 ranks, swap folder under /tmp
    python benchmarks/bench_giant.py --depths 2,2,2,2 --steps 2   # same widths, 8 blocks (0.59B), ~5 min
    python benchmarks/bench_giant.py --max-memory-gb 18.25    # stop the ranks above 17 GiB (a shared machine)
    python benchmarks/bench_giant.py --nvme-path /mnt/nvme    # swap on another disk (a subfolder, removed after)

The parent launches `deepspeed --num_gpus RANKS` on this file with `--rank-worker`. Each rank builds the
SimMIM SwinV2-G of configs/pretrain/swinv2_giant.yaml (fp32, micro-batch 1, activation checkpointing) inside
`deepspeed.zero.Init`, so no rank ever holds the whole model, and checks that it owns 1/RANKS of every
parameter. Then `deepspeed.initialize` with parameters *and* optimizer states (fp32 master weights, Adam
moments, gradients) offloaded to the swap folder through DeepSpeed's async I/O op (Debian's `libaio-dev`
must be installed: `apt-get install -y libaio-dev`), `--steps` SimMIM training steps at 192x192 on one
batch, timed phase by phase (forward, backward, optimizer), and a forward after them (the loss must move).
The sizes that decide what stays in RAM are `scale.memory`'s NVME_* constants.

The parent prints one JSON object: parameter counts, each rank's peak RSS (and the phase it fell in), the
peak size of the swap folder, times, losses, and beside each measured figure its prediction (`*_predicted`:
`scale.memory.estimate_memory` per rank, `predicted_disk_bytes` here). A run that fails or is stopped
prints the same object as far as it got, with `error` and the phase it was in (`stopped_in`).

Needs, for SwinV2-G: ~20 bytes per parameter on disk (60 GB; the run refuses to start with less free)
and ~9.5 GB of RAM per rank at the peak, 19 GB for 2 ranks (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "pretrain" / "swinv2_giant.yaml"
GB = 1e9



def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folder_bytes(path: Path) -> int:
    """Bytes the files under `path` occupy on disk (allocated blocks, as `du`)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # DeepSpeed replaces swap files while we walk
                pass
    return total


def ranks_memory(launcher_pid: int) -> tuple[int, int]:
    """(RSS, memory taken from the machine) summed over the rank processes under the launcher.

    The second counts the pages the ranks share (file-backed: torch's and timm's libraries, ~0.6 GB) once.
    From /proc/PID/status, whose counters cost nothing to read: smaps_rollup would give PSS, but walking
    the page tables of a 9 GB process every second holds its mmap lock and slowed the ranks 10x.
    """
    import psutil

    rss = anon = file = 0
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for child in children:
        try:
            if "--rank-worker" not in child.cmdline():
                continue
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                          if ":" in line)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        kb = {k: int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        rss += kb["VmRSS"]
        anon += kb["RssAnon"] + kb["RssShmem"]
        file = max(file, kb["RssFile"])
    return rss, anon + file


def run_config(depths: list[int] | None, img_size: int, window_size: int):
    """The giant pretraining config at micro-batch 1, fp32 (bf16 is emulated on this CPU, ~20x slower)."""
    from scale.config import load_config

    overrides = ["train.micro_batch_size=1", "train.grad_accum_steps=1", "train.precision=fp32",
                 f"model.img_size={img_size}", f"model.window_size={window_size}", "model.grad_checkpointing=true"]
    if depths:
        overrides.append(f"model.depths=[{','.join(map(str, depths))}]")
    return load_config(CONFIG, overrides)


def model_args(cfg) -> dict:
    """What `scale.memory` and the meta build take: the registry name and the config's overrides."""
    return {"name": cfg.model.name, **cfg.model.build_args()}


def parameter_sizes(cfg) -> list[int]:
    """numel of every parameter of the SimMIM model, from a build on the meta device (no memory)."""
    import models

    args = {**cfg.model.build_args(), "device": "meta"}
    model = models.build_simmim(cfg.model.name, norm_target_patch_size=cfg.simmim.norm_target_patch_size, **args)
    return [p.numel() for p in model.parameters()]


def swap_buffer_elements(sizes: list[int], world: int) -> int:
    """Elements of one weight swap buffer: it holds one rank's partition of a parameter, the largest included."""
    return math.ceil(max(sizes) / world)


def predicted_disk_bytes(sizes: list[int], world: int) -> int:
    """Bytes DeepSpeed 0.19.8 writes to the swap folder, all ranks together (read in its swap_tensor code).

    Weights: each rank's partition of every parameter whose partition is at least 1 MiB (smaller ones stay in
    RAM), in the model dtype. Optimizer: every sub-group is swappable at this size, so the fp32 master copy,
    Adam's two moments and the gradient of the whole partition go to disk, 16 bytes per element. File sizes
    are rounded up to the I/O alignment, which adds almost nothing at these sizes.
    """
    itemsize, min_swap_bytes = 4, 1 << 20
    slices = [math.ceil(n / world) for n in sizes]
    weights = sum(k * itemsize * world for k in slices if k * itemsize >= min_swap_bytes)
    optimizer = 16 * sum(math.ceil(n / world) for n in sizes) * world
    return weights + optimizer


def nvme_ds_config(cfg, world: int, nvme_path: Path, buffer_elements: int) -> dict:
    """ds_configs/zero3_offload.json with both offloads moved from RAM to `nvme_path`, filled for this run.

    The sizes that decide what stays in RAM are `scale.memory`'s NVME_* constants, so the estimate printed
    beside the measurement describes this very configuration.
    """
    from scale import memory
    from scale.ds_config import fill_ds_config, load_ds_config

    raw = load_ds_config(REPO / "ds_configs" / "zero3_offload.json")  # torch_adam false: DeepSpeedCPUAdam
    zero = raw["zero_optimization"]
    # pin_memory: no accelerator to copy to, and page-locking GBs of host memory only takes it from the kernel
    zero["offload_param"] = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": False,
                             "buffer_count": memory.NVME_PARAM_BUFFERS, "buffer_size": buffer_elements,
                             "max_in_cpu": 0}  # no weight slice kept in RAM beyond the swap buffers
    zero["offload_optimizer"] = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": False,
                                 "buffer_count": memory.NVME_OPTIMIZER_BUFFERS}
    # ds_configs/zero3*.json let up to 1e9 gathered weights (4 GB in fp32) stay live for reuse: most of this
    # machine with 2 ranks. Here a weight is gathered while its module runs and dropped right after.
    # No prefetch either: from the second pass on (a complete trace), DeepSpeed 0.19.8 prefetches slices from
    # disk by walking the trace without skipping repeats, and a weight used twice within its look-ahead (the
    # last block's forward, then its checkpoint recompute at the start of backward) is swapped in twice:
    # "AssertionError: param N already assigned swap buffer id M" (partitioned_param_swapper.py).
    zero.update(reduce_bucket_size=memory.NVME_REDUCE_BUCKET_ELEMENTS, stage3_prefetch_bucket_size=0,
                stage3_max_live_parameters=0, stage3_max_reuse_distance=0,
                sub_group_size=memory.NVME_SUB_GROUP_ELEMENTS)
    # DeepSpeed's defaults, written out: 1 MiB blocks, 8 requests in flight per handle
    raw["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                  "overlap_events": True}
    return fill_ds_config(raw, cfg, world_size=world, cuda=False, peak_lr=cfg.optim.lr)


def worker(args: argparse.Namespace) -> None:
    """One rank: build under zero.Init, check the partition, initialize, one timed step, write rank{r}.json."""
    from scale.host_memory import return_freed_host_memory

    t0 = time.perf_counter()
    return_freed_host_memory()  # as the trainer does on CPU, before anything large is allocated
    import deepspeed.comm as dist
    import torch

    import data
    from scale.dist import init_distributed, seed_everything
    from scale.engine import build_engine, partitioned
    from scale.memory import estimate_memory
    from scale.tasks import build_task

    info = init_distributed()
    rank, world = info.rank, info.world_size
    out: dict = {"rank": rank, "phases": {}, "complete": False}
    # ru_maxrss says how high, not when: a sampler notes the phase that was running at the highest sample
    watch = {"phase": "startup", "peak": 0, "peak_phase": None, "phase_peak": 0, "start": t0}

    def sample() -> None:
        live = Path(args.result_dir, f"rank{rank}.live.json")
        for i in itertools.count():
            rss = rss_bytes()
            watch["phase_peak"] = max(watch["phase_peak"], rss)
            if rss > watch["peak"]:
                watch.update(peak=rss, peak_phase=watch["phase"])
            if i % 20 == 0:  # the phase running now, for a run stopped from outside (the launcher SIGKILLs ranks)
                elapsed = round(time.perf_counter() - watch["start"], 1)
                live.write_text(json.dumps({"phase": watch["phase"], "s": elapsed,
                                            "sampled_peak_gb": round(watch["phase_peak"] / GB, 3)}))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()

    def log(msg: str) -> None:  # progress on stderr: a full run takes many minutes
        print(f"[rank {rank} {time.perf_counter() - t0:7.1f}s rss {rss_bytes() / GB:5.2f} GB] {msg}",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(name: str):
        start = time.perf_counter()
        watch.update(phase=name, phase_peak=rss_bytes(), start=start)
        yield
        out["phases"][name] = {"s": round(time.perf_counter() - start, 2), "rss_gb": round(rss_bytes() / GB, 3),
                               "sampled_peak_gb": round(max(watch["phase_peak"], rss_bytes()) / GB, 3)}
        log(f"{name} done in {out['phases'][name]['s']} s")
        save()

    def save() -> None:  # after every phase, so a run that is stopped still says how far it got
        Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(out))

    log("distributed up")
    cfg = run_config(args.depths, args.img_size, args.window_size)
    sizes = parameter_sizes(cfg)
    ds = nvme_ds_config(cfg, world, Path(args.nvme_path), swap_buffer_elements(sizes, world))
    seed_everything(cfg.seed)  # the same weights on every rank; zero.Init keeps one slice of each
    runtime = rss_bytes()
    out["runtime_gb"] = round(runtime / GB, 3)
    plan = estimate_memory(model_args(cfg), img_size=args.img_size, window_size=args.window_size, micro_batch=1,
                           zero_stage=3, world_size=world, offload="nvme", checkpointing=True, precision="fp32",
                           task="simmim", device_type="cpu", runtime_bytes=runtime)
    out["estimate"] = plan.to_dict()

    task = build_task("simmim", cfg, info, log=log)
    with phase("build"), partitioned(ds):
        module = task.build_model()

    # What this rank owns: ZeRO-3 splits each parameter into `world` equal slices (the last one padded)
    params = list(module.parameters())
    if any(p.numel() for p in params):
        raise SystemExit(f"rank {rank}: a parameter kept its full data after zero.Init")
    total = sum(p.ds_numel for p in params)
    owned = sum(max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel())) for p in params)
    on_disk = sum(p.partition_numel() for p in params if getattr(p.ds_tensor, "final_location", None) == "nvme")
    counts = torch.tensor([owned], dtype=torch.float64)
    dist.all_reduce(counts)
    if total != sum(sizes) or int(counts.item()) != total or abs(owned - total / world) > len(params):
        raise SystemExit(f"rank {rank}: owns {owned} of {total} parameters ({sizes and sum(sizes)} built on meta, "
                         f"{int(counts.item())} owned by all ranks): not a 1/{world} share")
    out.update(params_total=total, params_owned=owned, params_partition_on_disk=on_disk)
    save()

    with phase("initialize"):
        engine = build_engine(module, task.param_groups(module), ds, info)

    # a different image per rank, as a data loader would give; SimMIM's own mask generator
    gen = torch.Generator().manual_seed(1000 + rank)
    images = torch.randn(1, 3, args.img_size, args.img_size, generator=gen)
    torch.manual_seed(2000 + rank)
    mask = data.MaskGenerator(args.img_size, cfg.simmim.mask_patch_size, cfg.model.patch_size,
                              cfg.simmim.mask_ratio)().unsqueeze(0)
    ds_engine = engine.engine  # the phases one by one; Engine.micro_step runs the same three calls

    def mean_over_ranks(value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value.item() / world

    out["losses"], out["steps_s"] = [], []
    for step in range(args.steps):  # the same batch each step: its loss has to go down
        suffix = "" if step == 0 else str(step + 1)
        with phase("forward" + suffix):
            loss = ds_engine(images, mask)
        out["losses"].append(mean_over_ranks(loss))
        save()
        with phase("backward" + suffix):
            ds_engine.backward(loss)
        with phase("optimizer" + suffix):
            ds_engine.step()
        if not ds_engine.was_step_applied():
            raise SystemExit(f"rank {rank}: DeepSpeed skipped the optimizer step {step + 1}")
        step_phases = ("forward", "backward", "optimizer")
        out["steps_s"].append(round(sum(out["phases"][k + suffix]["s"] for k in step_phases), 2))

    with phase("forward_after"), torch.no_grad():  # the loss after the last update, same batch
        out["loss_after"] = mean_over_ranks(ds_engine(images, mask))
    out.update(peak_rss_gb=round(peak_rss_bytes() / GB, 3), peak_phase=watch["peak_phase"], complete=True)

    save()
    dist.barrier()
    log("done")


def launch(args: argparse.Namespace) -> None:
    """Check the disk, run the ranks, watch the swap folder, print the one JSON object."""
    cfg = run_config(args.depths, args.img_size, args.window_size)
    sizes = parameter_sizes(cfg)
    disk_predicted = predicted_disk_bytes(sizes, args.ranks)
    base = Path(args.nvme_path) if args.nvme_path else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if disk_predicted > free - 2 * GB:
        raise SystemExit(f"{base}: {free / GB:.1f} GB free, the swap files need ~{disk_predicted / GB:.1f} GB "
                         f"(+2 GB margin): give --nvme-path on a larger disk")
    swap = Path(tempfile.mkdtemp(prefix="bench_giant_swap_", dir=base))
    results = Path(tempfile.mkdtemp(prefix="bench_giant_results_"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(args.ranks), "--master_port",
           str(port), __file__, "--rank-worker", "--nvme-path", str(swap), "--result-dir", str(results),
           "--img-size", str(args.img_size), "--window-size", str(args.window_size), "--steps", str(args.steps)]
    if args.depths:
        cmd += ["--depths", ",".join(map(str, args.depths))]
    # one OpenMP thread per rank on 2 cores; this interpreter's bin first so DeepSpeed's JIT ops reuse their
    # cached builds (a ninja of another version on PATH rebuilds them)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    peaks = {"disk": 0, "rss": 0, "taken": 0, "stopped": None}
    stop = threading.Event()
    proc = None

    def watch() -> None:
        """Peak size of the swap folder and of the ranks' memory; stop the ranks above --max-memory-gb."""
        while not stop.wait(2.0):
            peaks["disk"] = max(peaks["disk"], folder_bytes(swap))  # DeepSpeed rewrites swap files in place
            rss, taken = ranks_memory(proc.pid)
            peaks["rss"], peaks["taken"] = max(peaks["rss"], rss), max(peaks["taken"], taken)
            if args.max_memory_gb and taken > args.max_memory_gb * GB and not peaks["stopped"]:
                peaks["stopped"] = f"the ranks' memory reached {taken / GB:.2f} GB, over --max-memory-gb"
                os.killpg(proc.pid, signal.SIGTERM)

    start = time.perf_counter()
    # ranks' output goes to our stderr, so stdout carries only the JSON
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's own session: its ranks, nothing else
        proc.wait()
        rc = "timeout"
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    peaks["disk"] = max(peaks["disk"], folder_bytes(swap))
    ranks = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))
             if re.fullmatch(r"rank\d+\.json", p.name)]
    for r in ranks:
        live = results / f"rank{r['rank']}.live.json"
        if not r["complete"] and live.exists():
            r["stopped_in"] = json.loads(live.read_text())
    if not args.keep_swap:
        shutil.rmtree(swap, ignore_errors=True)
    shutil.rmtree(results, ignore_errors=True)
    measured = {"disk_gb": round(peaks["disk"] / GB, 2), "disk_gb_predicted": round(disk_predicted / GB, 2),
                "ranks_peak_rss_sum_gb": round(peaks["rss"] / GB, 2),
                "ranks_peak_memory_gb": round(peaks["taken"] / GB, 2)}
    if rc != 0 or len(ranks) != args.ranks or not all(r["complete"] for r in ranks):
        # how far it got, with the same figures as a complete run where they exist
        print(json.dumps({"error": peaks["stopped"] or f"deepspeed exited {rc} after {wall:.0f} s (its output is on "
                                                       f"stderr above)",
                          **summary(cfg, args, ranks), **measured, "wall_s": round(wall, 1)}))
        raise SystemExit(1)

    print(json.dumps({**summary(cfg, args, ranks), **measured, "wall_s": round(wall, 1)}))


def summary(cfg, args: argparse.Namespace, ranks: list[dict]) -> dict:
    """The figures of the ranks' result files, each measured one beside its prediction; a stopped run has fewer."""
    done = [r for r in ranks if "params_total" in r]
    if not done:
        return {"phases_done": {}}
    r0 = done[0]
    plan = r0["estimate"]
    phases = [k for k in r0["phases"] if all(k in r["phases"] for r in done)]
    out = {"model": cfg.model.name, "depths": list(cfg.model.depths or ()) or None, "img_size": args.img_size,
           "window_size": args.window_size, "ranks": args.ranks, "precision": "fp32", "micro_batch": 1,
           "params_total": r0["params_total"],
           "params_per_rank": [r["params_owned"] for r in done],
           "params_per_rank_predicted": math.ceil(r0["params_total"] / args.ranks),
           "params_partition_on_disk_per_rank": [r["params_partition_on_disk"] for r in done],
           "peak_rss_gb": [r.get("peak_rss_gb") or max(p["sampled_peak_gb"] for p in r["phases"].values())
                           for r in done],
           "peak_rss_gb_predicted": round(plan["total_bytes"] / GB, 2),
           "estimate_gb": {k.removesuffix("_bytes"): round(v / GB, 3) for k, v in plan.items()},
           "peak_rss_phase": [r.get("peak_phase") for r in done],
           "runtime_gb": [r["runtime_gb"] for r in done],
           "phases_s": {k: max(r["phases"][k]["s"] for r in done) for k in phases},
           "rss_gb_after_phase": {k: [r["phases"][k]["rss_gb"] for r in done] for k in phases},
           "rss_gb_phase_peak": {k: [r["phases"][k]["sampled_peak_gb"] for r in done] for k in phases}}
    if r0.get("losses"):
        out.update(loss=round(r0["losses"][0], 6), losses=[round(v, 6) for v in r0["losses"]])
    if r0.get("steps_s"):
        steps = min(len(r["steps_s"]) for r in done)
        out.update(step_s=max(r["steps_s"][0] for r in done),
                   steps_s=[max(r["steps_s"][i] for r in done) for i in range(steps)])
    if any("stopped_in" in r for r in done):
        out["stopped_in"] = [r.get("stopped_in") for r in done]
    if "loss_after" in r0:
        out["loss_after"] = round(r0["loss_after"], 6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="blocks per stage, e.g. 2,2,2,2 (default: SwinV2-G's 2,2,42,4); widths stay the giant's")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="training steps (the first has no trace to prefetch by)")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--window-size", type=int, default=12)
    p.add_argument("--nvme-path", default=None,
                   help="folder for the swap files (a fresh subfolder is made there and removed at the end; "
                        "default: the system temp folder)")
    p.add_argument("--keep-swap", action="store_true", help="leave the swap subfolder behind")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the ranks are stopped")
    p.add_argument("--max-memory-gb", type=float, default=0,
                   help="stop the ranks when the memory they take together (shared library pages counted once) "
                        "exceeds this (0: never), on a shared machine")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)  # set by the parent's launch
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # some launchers pass it
    args = p.parse_args()
    if args.rank_worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
