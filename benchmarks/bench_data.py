"""Data pipeline throughput on CPU: SimMIM loader vs the raw PIL decode + crop limit, in the same run.

    python benchmarks/bench_data.py [--images 500] [--img-size 192] [--workers 0 1 2] [--rounds 5]

Generates photo-like 500x375 JPEGs (multi-scale smooth noise plus shapes, quality 90), writes them
as shards with data.write_shards, then prints one JSON object per case:

- raw_pil: Image.open + decode + torchvision's RandomResizedCrop on in-memory bytes, one process, no
  framework. This is the limit named in issue 3 (per worker = per core), kept as the reference.
- raw_simmim: our exact per-sample ops without a loader: data.shards.decode_sample (the loader's decode
  path) + the whole SimMIMTransform (crop, flip, uint8 tensor, mask). The trainer normalises on the
  device (data.normalize_images), so that cost is not the loader's.
- raw_torchvision_decode_jpeg / raw_pil_draft: faster-decoder alternatives for the same crop, to see
  whether another decoder would move the limit (draft decodes at 1/2 scale: lower quality).
- loader_wN: ShardLoader(SimMIMTransform) with N workers, uint8 batches: samples/s in steady state (time to the
  first batch excluded and reported separately), per worker, and the ratio to N x raw_pil (the issue's
  target) and to N x raw_simmim (the same per-sample work without the loader: the framework's cost).

All cases run once per round, interleaved, for --rounds rounds; each reports its best round
("samples_per_s") and its median, so other processes' load on a shared machine biases all alike.
Ratios are given from the best rounds ("ratio_to_*") and from the medians ("median_ratio_to_*").
"""
import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import ShardLoader, SimMIMTransform  # noqa: E402
from data.shards import decode_sample  # noqa: E402
from data.write_shards import write_shards  # noqa: E402


def photo_like(seed: int, w: int = 500, h: int = 375) -> Image.Image:
    """Smooth multi-scale colour noise with a few shapes: JPEG-compresses like a photo, not like flat art."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90), (16, 40), (64, 20), (250, 10)):
        small = rng.normal(0, amp, (max(2, cells * h // w), cells, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC))
                         for c in range(3)], -1)
    img = Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(10, 80))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def make_data(folder: Path, n: int) -> tuple[Path, list[bytes]]:
    """n JPEGs in folder/src/img/, shards in folder/shards; returns (shard folder, JPEG bytes)."""
    src = folder / "src" / "img"
    src.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i in range(n):
        buf = io.BytesIO()
        photo_like(i).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        (src / f"{i:05d}.jpg").write_bytes(blobs[-1])
    write_shards(folder / "src", folder / "shards", shard_size=max(1, n // 8), workers=2, progress=False)
    return folder / "shards", blobs


def raw_rate(blobs: list[bytes], fn, passes: int) -> float:
    """Samples/s of fn(bytes) in this process."""
    fn(blobs[0])
    t = time.perf_counter()
    for _ in range(passes):
        for b in blobs:
            fn(b)
    return passes * len(blobs) / (time.perf_counter() - t)


def loader_rate(shards: Path, img_size: int, workers: int, passes: int, batch: int) -> dict:
    """Steady-state samples/s of ShardLoader over `passes` epochs, plus time to the first batch."""
    ld = ShardLoader(shards, SimMIMTransform(img_size), batch, num_workers=workers, seed=0)
    steady_samples, steady_time, first = 0, 0.0, []
    for _ in range(passes):
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for b in ld:
            if t_first is None:
                t_first = time.perf_counter()
                first.append(t_first - t0)
            else:
                n += len(b["__key__"])
        steady_time += time.perf_counter() - t_first
        steady_samples += n
    return {"samples_per_s": steady_samples / steady_time, "first_batch_s": float(np.mean(first))}


def main() -> None:
    """Run all cases and print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--img-size", type=int, default=192)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="0 = decode in the main process (no IPC)")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per case; the best is reported")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)  # one core per worker, as in the loader's workers
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "pillow": Image.__version__,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        shards, blobs = make_data(Path(tmp), a.images)
        crop = T.RandomResizedCrop(a.img_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3))
        simmim = SimMIMTransform(a.img_size)

        def pil(b: bytes):
            return crop(Image.open(io.BytesIO(b)).convert("RGB"))

        def simmim_ops(b: bytes):
            return simmim(decode_sample({"jpg": b})[0])

        def pil_draft(b: bytes):
            im = Image.open(io.BytesIO(b))
            im.draft("RGB", (im.width // 2, im.height // 2))
            return crop(im.convert("RGB"))

        from torchvision.io import decode_jpeg

        def tv_decode(b: bytes):
            return crop(decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)))

        raws = {"raw_pil": pil, "raw_simmim": simmim_ops, "raw_torchvision_decode_jpeg": tv_decode,
                "raw_pil_draft": pil_draft}
        rates: dict[str, list[float]] = {k: [] for k in [*raws, *(f"loader_w{w}" for w in a.workers)]}
        first: dict[int, list[float]] = {w: [] for w in a.workers}
        # Rounds interleave every case, so load from other processes on a shared machine hits all
        # cases alike; the best round estimates each case's uncontended rate.
        for _ in range(a.rounds):
            for name, fn in raws.items():
                rates[name].append(raw_rate(blobs, fn, 1))
            for w in a.workers:
                r = loader_rate(shards, a.img_size, w, 1, a.batch_size)
                rates[f"loader_w{w}"].append(r["samples_per_s"])
                first[w].append(r["first_batch_s"])
        best = {k: max(v) for k, v in rates.items()}
        med = {k: float(np.median(v)) for k, v in rates.items()}
        common = {"images": a.images, "src_size": "500x375", "img_size": a.img_size, "rounds": a.rounds,
                  **machine, "load_avg_1m_end": round(os.getloadavg()[0], 2)}
        for name in raws:
            print(json.dumps({"case": name, "samples_per_s": round(best[name], 1), "median": round(med[name], 1),
                              "ratio_to_raw_pil": round(best[name] / best["raw_pil"], 3),
                              "median_ratio_to_raw_pil": round(med[name] / med["raw_pil"], 3), **common}))
        for w in a.workers:
            name, n = f"loader_w{w}", max(1, w)
            print(json.dumps({"case": name, "workers": w, "samples_per_s": round(best[name], 1),
                              "median": round(med[name], 1), "per_worker": round(best[name] / n, 1),
                              "ratio_to_raw_pil": round(best[name] / n / best["raw_pil"], 3),
                              "ratio_to_raw_simmim": round(best[name] / n / best["raw_simmim"], 3),
                              "median_ratio_to_raw_pil": round(med[name] / n / med["raw_pil"], 3),
                              "median_ratio_to_raw_simmim": round(med[name] / n / med["raw_simmim"], 3),
                              "first_batch_s": round(float(np.median(first[w])), 3),
                              "batch_size": a.batch_size, **common}))


if __name__ == "__main__":
    main()
