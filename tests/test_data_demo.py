"""The demo set: made once even when two processes ask at the same time, deterministic, learnable."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from data import ShardLoader, demo_shards, read_index
from data.check_shards import check_shards
from data.demo import CLASSES, VAL_PER_CLASS, VAL_SHARDS, SEED, _write_split
from tests.test_data_common import REPO


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    """Two processes generate the demo set into the same default cache at once (as two ranks would)."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "SWINSCALE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    code = "import data; print(data.demo_shards())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert paths == {str(cache / "demo")}
    assert not [p for p in cache.iterdir() if p.name != "demo"], "a temporary folder was left behind"
    return paths.pop()


def test_demo_index_and_shards_are_complete(demo_root):
    index = read_index(demo_root)
    assert index["num_classes"] == len(index["class_names"]) >= 10
    assert index["splits"]["train"]["samples"] == 3072 and index["splits"]["val"]["samples"] == 768
    # Enough shards for 2 ranks x 2 workers to each get whole shards.
    assert len(index["splits"]["train"]["shards"]) >= 4 and len(index["splits"]["val"]["shards"]) >= 4
    for split in ("train", "val"):
        report = check_shards(demo_root, split)
        assert report["skipped"] == 0 and report["samples"] == index["splits"][split]["samples"]
    assert demo_shards(demo_root) == demo_root  # second call: reuses, does not regenerate


def test_demo_is_deterministic(demo_root, tmp_path):
    again = _write_split(tmp_path, "val", VAL_PER_CLASS, VAL_SHARDS, SEED + 1)
    for shard in again["shards"]:
        with open(os.path.join(demo_root, shard["name"]), "rb") as f:
            assert (tmp_path / shard["name"]).read_bytes() == f.read(), shard["name"]


def test_demo_classes_are_balanced_and_images_vary(demo_root):
    batch = next(iter(ShardLoader(demo_root, lambda im: torch.from_numpy(np.asarray(im).copy()), 96,
                                  num_workers=0, split="val")))
    assert batch["image"].shape == (96, 128, 128, 3)
    labels = batch["label"].tolist()
    assert len(set(labels)) >= 8
    same = [i for i, y in enumerate(labels) if y == labels[0]]
    assert len(same) >= 2 and not torch.equal(batch["image"][same[0]], batch["image"][same[1]])


def _small_input(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.resize((32, 32), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def test_demo_is_learnable(demo_root):
    """A tiny CNN trained for one epoch gets far above the 1/12 chance level on the val split."""
    torch.manual_seed(0)
    train = [(b["image"], b["label"]) for b in ShardLoader(demo_root, _small_input, 64, num_workers=2)]
    val = [(b["image"], b["label"]) for b in ShardLoader(demo_root, _small_input, 128, num_workers=2,
                                                          split="val", drop_last=False)]
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, len(CLASSES)))
    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    for x, y in train:
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in val)
    accuracy = correct / sum(len(y) for _, y in val)
    print(f"demo val accuracy after one epoch: {accuracy:.3f}")
    assert accuracy > 3 / len(CLASSES), f"val accuracy {accuracy:.3f} is not far above chance"
