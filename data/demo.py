"""The demo data set: 12 procedurally drawn classes, generated deterministically on first use.

Every entry point defaults to it so that a fresh checkout trains on real images with no download.
Classes differ by shape or texture only; colour, size, position, rotation and background (gradient
plus noise) are random in every class, so a model has to learn shape to beat chance.

`demo_shards()` writes 8 train shards (3072 images) and 4 val shards (768 images) of 128x128 JPEGs,
about 2 MB per shard, into `$SWINSCALE_CACHE/demo` (default `~/.cache/swinscale/demo`).
"""
import contextlib
import io
import math
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .index import INDEX_NAME, write_index
from .write_shards import TarShardWriter

CLASSES = ["disc", "square", "triangle", "ring", "cross", "star", "h_stripes", "v_stripes",
           "checkerboard", "dot_grid", "two_discs", "diagonal_stripes"]
IMG_SIZE = 128
TRAIN_PER_CLASS, VAL_PER_CLASS = 256, 64
TRAIN_SHARDS, VAL_SHARDS = 8, 4
SEED = 20240


def default_root() -> Path:
    """`$SWINSCALE_CACHE/demo`, or `~/.cache/swinscale/demo`."""
    base = os.environ.get("SWINSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swinscale")
    return Path(base) / "demo"


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> tuple[int, int, int]:
    # Keep the object's brightness away from the background's so the shape is always visible.
    while True:
        c = rng.integers(0, 256, 3)
        if avoid is None or abs(c.mean() - avoid.mean()) > 60:
            return tuple(int(v) for v in c)


_NOISE: dict[int, np.ndarray] = {}


def _noise(s: int) -> np.ndarray:
    if s not in _NOISE:
        _NOISE[s] = np.random.default_rng(SEED).standard_normal((2 * s, 2 * s, 3), dtype=np.float32)
    return _NOISE[s]


def _background(rng: np.random.Generator, s: int) -> tuple[Image.Image, np.ndarray]:
    a, b = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0, 1, s, dtype=np.float32)
    t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    img = a + (b - a) * t[..., None]
    # A random window of one fixed noise field: per-image Gaussian draws cost more than the drawing.
    oy, ox = rng.integers(0, s, 2)
    img += _noise(s)[oy:oy + s, ox:ox + s] * rng.uniform(2, 18)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(img), (a + b) / 2


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list:
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = r if inner is None or k % 2 == 0 else r * inner
        a = rot + k * math.pi / (n if inner else n / 2)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_sample(label: int, rng: np.random.Generator, s: int = IMG_SIZE) -> Image.Image:
    """One image of class `label` (index into CLASSES), all nuisance factors drawn from `rng`."""
    img, bg_mean = _background(rng, s)
    d = ImageDraw.Draw(img)
    fg = _colour(rng, bg_mean)
    name = CLASSES[label]
    r = rng.uniform(0.18, 0.32) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    rot = rng.uniform(0, 2 * math.pi)
    if name == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(3, int(r * 0.25)))
    elif name == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif name == "star":
        d.polygon(_polygon(cx, cy, r * 1.2, 5, rot, inner=0.45), fill=fg)
    elif name == "two_discs":
        r2 = r * 0.5
        for sx in (-1, 1):
            x = cx + sx * r * 0.9 * math.cos(rot)
            y = cy + sx * r * 0.9 * math.sin(rot)
            d.ellipse([x - r2, y - r2, x + r2, y + r2], fill=fg)
    else:
        # Texture classes fill a random rectangle (most of the image) with a periodic pattern.
        x0, y0 = rng.uniform(0, 0.3 * s, 2)
        x1, y1 = rng.uniform(0.7 * s, s, 2)
        period = rng.uniform(8, 18)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
        xx, yy = xx + rng.uniform(0, period), yy + rng.uniform(0, period)
        if name == "h_stripes":
            on = (yy % period) < period / 2
        elif name == "v_stripes":
            on = (xx % period) < period / 2
        elif name == "diagonal_stripes":
            sign = rng.choice([-1, 1])
            on = ((xx + sign * yy) % (period * 1.4)) < period * 0.7
        elif name == "checkerboard":
            on = ((xx // period + yy // period) % 2) == 0
        else:  # dot_grid
            on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period * 0.28) ** 2
        box = np.zeros((s, s), bool)
        box[int(y0):int(y1), int(x0):int(x1)] = True
        arr = np.asarray(img).copy()
        arr[on & box] = fg
        img = Image.fromarray(arr)
    return img


def _render(job: tuple[int, int, int]) -> bytes:
    seed, n, label = job
    buf = io.BytesIO()
    draw_sample(label, np.random.default_rng([seed, n])).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_split(folder: Path, split: str, per_class: int, shards: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    rng.shuffle(labels)
    writer = TarShardWriter(folder, split, -(-len(labels) // shards))
    jobs = [(seed, n, int(label)) for n, label in enumerate(labels)]
    # Daemonic processes (e.g. DataLoader workers) may not fork a pool; draw in-process there.
    parallel = not multiprocessing.current_process().daemon and (os.cpu_count() or 1) > 1
    with multiprocessing.Pool(min(4, os.cpu_count() or 1)) if parallel else contextlib.nullcontext() as pool:
        images = pool.imap(_render, jobs, chunksize=64) if parallel else map(_render, jobs)
        for (_, n, label), jpg in zip(jobs, images):
            writer.write(f"{split}_{n:06d}", {"jpg": jpg, "cls": str(label).encode()})
    return writer.close()


def demo_shards(root: str | os.PathLike | None = None) -> str:
    """Folder with the demo shards (`train-%06d.tar`, `val-%06d.tar`, `index.json`), made on first use.

    Safe to call from many ranks at once: each writes into its own temporary folder and renames it
    into place; the first rename wins and the others discard their copy.
    """
    root = Path(root) if root is not None else default_root()
    if (root / INDEX_NAME).exists():
        return str(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists without {INDEX_NAME}: delete it or pass another demo root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp", dir=root.parent))
    try:
        index = {"class_names": CLASSES, "num_classes": len(CLASSES), "image_size": IMG_SIZE,
                 "splits": {"train": _write_split(tmp, "train", TRAIN_PER_CLASS, TRAIN_SHARDS, SEED),
                            "val": _write_split(tmp, "val", VAL_PER_CLASS, VAL_SHARDS, SEED + 1)}}
        write_index(tmp, index)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty `root`, fails if another rank got there first
        except OSError:
            if not (root / INDEX_NAME).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(root)
