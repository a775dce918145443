"""Turn an image folder or a list of image paths into WebDataset shards plus `index.json`.

    python -m data.write_shards SRC OUT [--shard-size N] [--workers W] [--val-fraction F] [--seed S]

SRC is a folder with one subfolder per class (ImageNet layout; images directly in SRC are written
without a label), or a text file of image paths, one per line, optionally `path<TAB>label` where
label is a class index or a class name. OUT receives `train-%06d.tar` (and `val-%06d.tar` with
--val-fraction), each sample as `<key>.jpg|png|webp` + `<key>.cls`, and `index.json`.

Every image is decoded through the loader's own decode path before it is written, so an image that
would fail in training is reported (stderr) and left out instead. JPEG/PNG/WebP bytes are copied
unchanged; other formats PIL reads (BMP, TIFF, GIF, ...) are stored as PNG.
"""
import argparse
import io
import json
import os
import random
import sys
import tarfile
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .index import write_index
from .shards import decode_sample

SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class TarShardWriter:
    """Write samples into `folder/<split>-%06d.tar`, `shard_size` per shard, each shard atomically."""

    def __init__(self, folder: str | os.PathLike, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = Path(folder), split, shard_size
        self.shards: list[dict] = []
        self._tar = None
        self._count = 0
        self._tmp: Path | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; `members` maps extension (no dot) to bytes."""
        if self._tar is None or self._count >= self.shard_size:
            self._finish()
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._tmp = self.folder / f".{name}.tmp{os.getpid()}"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "samples": 0, "bytes": 0})
            self._count = 0
        for ext, data in members.items():
            # Fixed metadata keeps shards byte-identical across runs (the demo set relies on it).
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.shards[-1]["samples"] = self._count

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            final = self.folder / self.shards[-1]["name"]
            os.replace(self._tmp, final)
            self.shards[-1]["bytes"] = final.stat().st_size
            self._tar = None

    def close(self) -> dict:
        """Finish the last shard and return this split's index entry."""
        self._finish()
        return {"samples": sum(s["samples"] for s in self.shards), "shards": self.shards}


def list_source(src: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and class names from a class-per-subfolder tree or a path list file."""
    src = Path(src)
    if src.is_dir():
        classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
        items = [(str(p), -1) for p in sorted(src.iterdir()) if p.is_file() and p.suffix.lower() in SOURCE_EXTS]
        for label, name in enumerate(classes):
            items += [(str(p), label) for p in sorted((src / name).rglob("*"))
                      if p.is_file() and p.suffix.lower() in SOURCE_EXTS]
        return items, classes
    rows = []
    with open(src) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            path, _, label = line.partition("\t")
            if not os.path.isabs(path):
                path = str(src.parent / path)
            rows.append((path, label.strip()))
    labels = {lab for _, lab in rows if lab}
    if labels and all(lab.lstrip("-").isdigit() for lab in labels):
        return [(p, int(lab) if lab else -1) for p, lab in rows], []
    classes = sorted(labels)
    lookup = {name: i for i, name in enumerate(classes)}
    return [(p, lookup.get(lab, -1)) for p, lab in rows], classes


def load_image(path: str) -> tuple[str, bytes] | tuple[None, str]:
    """(ext, bytes) ready for a shard, or (None, reason) when training could not decode the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None, "unreadable_file"
    if not data:
        return None, "empty_member"
    img, _, reason = decode_sample({"jpg": data})
    if img is None:
        return None, reason
    fmt = Image.open(io.BytesIO(data)).format
    if fmt in _FORMAT_EXT:
        return _FORMAT_EXT[fmt], data
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000, workers: int = 4,
                 val_fraction: float = 0.0, seed: int = 0, progress: bool = True) -> dict:
    """Write SRC's images as shuffled train/val shards into OUT; returns the index (also in OUT/index.json)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    items, classes = list_source(src)
    if not items:
        raise ValueError(f"no images found in {src} (extensions: {sorted(SOURCE_EXTS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # Stratified split, then a shuffle: shards mix classes, since the loader only shuffles locally.
    by_label: dict[int, list] = {}
    for it in items:
        by_label.setdefault(it[1], []).append(it)
    splits: dict[str, list] = {"train": [], "val": []}
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = round(len(group) * val_fraction)
        splits["val"] += group[:n_val]
        splits["train"] += group[n_val:]
    index = {"class_names": classes, "num_classes": len(classes) or max(lab for _, lab in items) + 1,
             "splits": {}, "skipped": {}, "skipped_files": []}
    skipped: Counter = Counter()
    with Pool(max(1, workers)) as pool:
        for split, group in splits.items():
            if not group:
                continue
            rng.shuffle(group)
            writer = TarShardWriter(out, split, shard_size)
            results = pool.imap(load_image, [p for p, _ in group], chunksize=16)
            bar = tqdm(zip(group, results), total=len(group), desc=split, unit="img", disable=not progress)
            for n, ((path, label), (ext, data)) in enumerate(bar):
                if ext is None:
                    skipped[data] += 1
                    if len(index["skipped_files"]) < 1000:  # the full list went to stderr
                        index["skipped_files"].append([path, data])
                    print(f"skipped {path}: {data}", file=sys.stderr)
                    continue
                members = {ext: data}
                if label >= 0:
                    members["cls"] = str(label).encode()
                writer.write(f"{split}_{n:09d}", members)
            index["splits"][split] = writer.close()
    index["skipped"] = dict(skipped)
    write_index(out, index)
    return index


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints a JSON summary (samples per split, skipped per reason)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="image folder (one subfolder per class) or text file of paths [TAB label]")
    ap.add_argument("out", help="output folder for <split>-%%06d.tar and index.json")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode/validate processes")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="share of each class held out as 'val'")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.shard_size < 1 or a.workers < 1 or not 0.0 <= a.val_fraction < 1.0:
        ap.error("--shard-size and --workers must be >= 1 and --val-fraction in [0, 1)")
    if not os.path.exists(a.src):
        ap.error(f"{a.src} does not exist: pass an image folder (one subfolder per class) or a list file")
    try:
        index = write_shards(a.src, a.out, a.shard_size, a.workers, a.val_fraction, a.seed, not a.no_progress)
    except ValueError as e:  # nothing usable in SRC: said before any shard is written
        ap.error(f"{e}")
    print(json.dumps({"splits": {k: {"shards": len(v["shards"]), "samples": v["samples"]}
                                 for k, v in index["splits"].items()},
                      "classes": index["num_classes"], "skipped": index["skipped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
