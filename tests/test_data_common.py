"""Shared helpers for the data tests: tiny real shards on disk (no mocks), a picklable transform."""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.index import write_index
from data.write_shards import TarShardWriter


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """A small random JPEG."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_shards(folder: Path, n_shards: int, per_shard: int, split: str = "train", write_index_file: bool = True,
                num_classes: int = 3) -> list[str]:
    """Write n_shards x per_shard labelled 16 px JPEG samples; returns all keys."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = TarShardWriter(folder, split, per_shard)
    keys = []
    for n in range(n_shards * per_shard):
        key = f"{split}_{n:06d}"
        writer.write(key, {"jpg": jpeg_bytes(n), "cls": str(n % num_classes).encode()})
        keys.append(key)
    entry = writer.close()
    if write_index_file:
        write_index(folder, {"class_names": [f"c{i}" for i in range(num_classes)],
                             "num_classes": num_classes, "splits": {split: entry}})
    return keys


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> (3, 16, 16) float: the cheapest transform, so tests time the pipeline, not resizing."""
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def epoch_keys(loader, epoch: int | None = None) -> list[list[str]]:
    """Key lists of every batch of one epoch."""
    if epoch is not None:
        loader.set_epoch(epoch)
    return [b["__key__"] for b in loader]


REPO = Path(__file__).resolve().parents[1]
