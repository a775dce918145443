"""Training metrics: throughput, MFU, memory, data wait, console lines, TensorBoard and a JSONL log.

Only rank 0 writes; other ranks get a `NoOpLogger` so the loop never asks who it is. Keys are
namespaced (`loss/`, `lr/`, `throughput/`, `memory/`, `time/`, `data/`, `health/`) like torchtitan.
MFU = analytic model FLOPs per step (forward x 3, recomputation not counted) / step time / peak.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12) but reports the same name prefix
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None when unknown (CPUs: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU) or peak resident set size of this process (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class BaseLogger:
    """Sink for scalars and images; the no-op base is what non-zero ranks get."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalar metrics for `step`."""

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """Record one (3, H, W) image in [0, 1]."""

    def close(self) -> None:
        """Flush and release files."""


NoOpLogger = BaseLogger


class FileLogger(BaseLogger):
    """TensorBoard event files (optional) plus `metrics.jsonl`, one JSON object per logged step."""

    def __init__(self, output_dir: str | Path, tensorboard: bool) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, image.float().clamp(0, 1), step)
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def build_logger(output_dir: str | Path, *, is_main: bool, tensorboard: bool) -> BaseLogger:
    """FileLogger on rank 0, NoOpLogger elsewhere."""
    return FileLogger(output_dir, tensorboard) if is_main else NoOpLogger()


class MetricsProcessor:
    """Accumulates per-step timings and counters; every `every_steps` it prints a line and logs scalars.

    Call `data_wait(seconds)` for the time spent waiting on the loader, and `step_done(...)` after
    each optimizer step. The timer measures wall time between consecutive `step_done` calls, so
    it includes everything the loop does (what a user actually waits for).
    """

    def __init__(self, logger: BaseLogger, *, every_steps: int, total_steps: int, images_per_step: int,
                 flops_per_image: int, peak_flops: float | None, device: torch.device, world_size: int,
                 print_fn=print) -> None:
        self.logger = logger
        self.every_steps = every_steps
        self.total_steps = total_steps
        self.images_per_step = images_per_step  # global: micro x accum x ranks
        self.flops_per_step = 3 * flops_per_image * images_per_step  # fwd + bwd (2x fwd), all ranks
        self.peak_flops = peak_flops
        self.device = device
        self.world_size = world_size
        self.print = print_fn
        self.nonfinite_skips = 0
        self.overflow_skips = 0
        self._reset_window()
        self._last = time.perf_counter()
        self._ema_step_s: float | None = None

    def _reset_window(self) -> None:
        self._steps = 0
        self._time = 0.0
        self._wait = 0.0
        self._loss = 0.0
        self._extras: dict[str, float] = {}

    def restart_clock(self) -> None:
        """Exclude setup/checkpoint/image time from the next step's duration."""
        self._last = time.perf_counter()

    def data_wait(self, seconds: float) -> None:
        """Time this rank spent blocked on the data loader during the current step."""
        self._wait += seconds

    def step_done(self, step: int, *, loss: float, lr: float, grad_norm: float | None, corrupt: int,
                  extras: dict[str, float] | None = None, force: bool = False) -> dict[str, Any] | None:
        """Record one finished optimizer step; log if due. Returns the logged values, if any.

        `extras`: the task's own scalars under their TensorBoard tags (e.g. `moby/positive_similarity`),
        averaged over the logging window like the loss.
        """
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self._steps += 1
        self._time += dt
        self._loss += loss
        for key, value in (extras or {}).items():
            self._extras[key] = self._extras.get(key, 0.0) + value
        self._ema_step_s = dt if self._ema_step_s is None else 0.9 * self._ema_step_s + 0.1 * dt
        if not (force or step == 1 or step % self.every_steps == 0 or step == self.total_steps):
            return None
        step_s = self._time / self._steps
        img_s = self.images_per_step / step_s
        values = {
            "loss/train": self._loss / self._steps,
            "lr/base": lr,
            "optim/grad_norm": float("nan") if grad_norm is None else grad_norm,
            "throughput/images_per_s": img_s,
            "throughput/images_per_s_per_device": img_s / self.world_size,
            "throughput/tflops_per_device": self.flops_per_step / step_s / self.world_size / 1e12,
            "time/step_s": step_s,
            "time/data_wait_pct": 100.0 * min(1.0, self._wait / max(self._time, 1e-12)),
            "memory/peak_gib": peak_memory_gib(self.device),
            "data/corrupt_skipped": float(corrupt),
            "health/nonfinite_skips": float(self.nonfinite_skips),
            "health/overflow_skips": float(self.overflow_skips),
        }
        values.update({key: total / self._steps for key, total in self._extras.items()})
        if self.peak_flops:
            values["throughput/mfu_pct"] = 100.0 * self.flops_per_step / step_s / self.world_size / self.peak_flops
        self.logger.scalars(step, values)
        self.print(self.format_line(step, values))
        self._reset_window()
        return values

    def format_line(self, step: int, v: dict[str, float]) -> str:
        """One human-readable line per logged step."""
        eta_s = (self.total_steps - step) * (self._ema_step_s or 0.0)
        mfu = f"{v['throughput/mfu_pct']:.1f}%" if "throughput/mfu_pct" in v else "n/a"
        gn = v["optim/grad_norm"]
        return (f"step {step}/{self.total_steps} | loss {v['loss/train']:.4f} | lr {v['lr/base']:.3e} | "
                f"grad_norm {gn:.3f} | {v['throughput/images_per_s']:.1f} img/s | MFU {mfu} | "
                f"mem {v['memory/peak_gib']:.2f} GiB | data wait {v['time/data_wait_pct']:.0f}% | "
                f"corrupt {int(v['data/corrupt_skipped'])} | skipped {self.nonfinite_skips}+{self.overflow_skips} | "
                f"ETA {format_duration(eta_s)}")


def format_duration(seconds: float) -> str:
    """'1h02m03s' style."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
