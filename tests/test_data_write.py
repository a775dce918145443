"""write_shards CLI from a real image folder (with corrupt files) and from a path list; check_shards agrees."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from data import ShardLoader, read_index
from tests.test_data_common import REPO, epoch_keys, jpeg_bytes, to_tensor


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


def _image_folder(root):
    """3 classes x 8 images in JPEG/PNG/BMP, plus 3 broken files; returns the number of good images."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ant", "bee", "cat"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(8):
            img = Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8))
            img.save(d / f"img{i}.{['jpg', 'png', 'bmp'][i % 3]}")
    good = 24
    whole = jpeg_bytes(5, size=64)
    (root / "ant" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "bee" / "notes.jpg").write_text("not an image, just a text file named .jpg")
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "cat" / "readme.txt").write_text("ignored: not an image extension")
    return good


def test_write_folder_with_corrupt_files_then_check(tmp_path):
    good = _image_folder(tmp_path / "src")
    out = tmp_path / "shards"
    proc = _run("-m", "data.write_shards", str(tmp_path / "src"), str(out), "--shard-size", "5",
                "--workers", "2", "--val-fraction", "0.25", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["skipped"] == {"bad_image": 1, "not_image": 1, "empty_member": 1}
    for name in ("truncated.jpg", "notes.jpg", "empty.png"):
        assert name in proc.stderr
    index = read_index(out)
    assert index["class_names"] == ["ant", "bee", "cat"] and index["num_classes"] == 3
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["samples"] + val["samples"] == good
    # Stratified: round(9 * 0.25) = 2 files of each class go to val, minus any broken one among them.
    assert 4 <= val["samples"] <= 6
    assert [s["samples"] for s in train["shards"]] == [5] * (train["samples"] // 5) + \
        ([train["samples"] % 5] if train["samples"] % 5 else [])
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in train["shards"] + val["shards"]]

    for split in ("train", "val"):
        proc = _run("-m", "data.check_shards", str(out), "--split", split)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"shards": len(index["splits"][split]["shards"]),
                                           "samples": index["splits"][split]["samples"], "skipped": 0, "errors": {}}

    # Stored bytes keep their format (BMP becomes PNG) and labels match the class folders.
    ld = ShardLoader(out, to_tensor, 1, num_workers=0, split="val")
    labels = [int(b["label"]) for b in ld]
    assert len(labels) == val["samples"] and all(1 <= labels.count(c) <= 2 for c in range(3))


def test_write_from_path_list_with_names(tmp_path):
    _image_folder(tmp_path / "src")
    lines = [f"src/{c}/img{i}.jpg\t{c}" for c in ("cat", "bee") for i in (0, 3, 6)] + ["src/ant/img1.png"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    proc = _run("-m", "data.write_shards", str(tmp_path / "list.txt"), str(tmp_path / "out"), "--workers", "1",
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    index = read_index(tmp_path / "out")
    assert index["class_names"] == ["bee", "cat"] and index["splits"]["train"]["samples"] == 7
    labels = sorted(int(b["label"]) for b in ShardLoader(tmp_path / "out", to_tensor, 1, num_workers=0))
    assert labels == [-1, 0, 0, 0, 1, 1, 1]
    assert sorted(k for b in epoch_keys(ShardLoader(tmp_path / "out", to_tensor, 7, num_workers=0), 0)
                  for k in b) == [f"train_{i:09d}" for i in range(7)]
