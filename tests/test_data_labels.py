"""Class labels for fine-tuning: unusable ones are skipped and counted, a class-count mismatch is reported early.

The shards are written the way real producers write them: webdataset's ShardWriter with its default
encoder (an int `cls` becomes its decimal ASCII) and the repo's `data.write_shards` from a path list.
"""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data import ShardLoader, check_num_classes, demo_shards
from data.check_shards import check_shards
from data.index import write_index
from data.shards import REASONS
from data.write_shards import write_shards
from tests.test_data_common import REPO, epoch_keys, jpeg_bytes, make_shards, to_tensor

NUM_CLASSES = 10
# Placed at every 4th sample of 4 shards x 10; None: the sample has no .cls member. 10 is one past the head.
BAD_LABELS = [-1, 12, 10**30, None, NUM_CLASSES, -1, 12, 10**30, None]
EXPECTED = {"label_out_of_range": 8, "no_label": 2}  # the 8th: label 12 on a broken image, never decoded
GOOD = 40 - sum(EXPECTED.values())


def _wds_set(folder: Path) -> dict[str, int | None]:
    """4 shards of 10 samples from webdataset's ShardWriter; returns each key's label (None: no .cls)."""
    folder.mkdir()
    labels = {}
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=10, verbose=0) as sink:
        for n in range(40):
            key = f"s{n:04d}"
            label = BAD_LABELS[(n - 3) // 4] if n % 4 == 3 and (n - 3) // 4 < len(BAD_LABELS) else n % NUM_CLASSES
            arr = np.random.default_rng(n).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            sample = {"__key__": key, "jpg": Image.fromarray(arr)}  # encoded by webdataset's default encoder
            if n == 39:
                data = jpeg_bytes(n, size=64)
                label, sample["jpg"] = 12, data[:len(data) // 2]  # truncated image with a bad label
            if label is not None:
                sample["cls"] = label
            sink.write(sample)
            labels[key] = label
    return labels


def _good_keys(labels: dict[str, int | None]) -> set[str]:
    return {k for k, y in labels.items() if y is not None and 0 <= y < NUM_CLASSES}


def _labels(loader) -> tuple[list[list[str]], dict[str, int]]:
    """Key lists of one epoch's batches, and the label the loader gave each key."""
    batches, got = [], {}
    for b in loader:
        assert b["label"].dtype == torch.long
        batches.append(b["__key__"])
        got.update(zip(b["__key__"], b["label"].tolist()))
    return batches, got


def test_reasons_are_documented():
    assert {"label_out_of_range", "no_label"} <= set(REASONS)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_only_valid_labels_are_yielded_and_bad_ones_cost_no_decode(tmp_path, num_workers):
    labels = _wds_set(tmp_path / "s")
    calls = []

    def counting(img):
        calls.append(1)
        return to_tensor(img)

    ld = ShardLoader(tmp_path / "s", counting if num_workers == 0 else to_tensor, 4, num_workers=num_workers,
                     shuffle_buffer=4, num_classes=NUM_CLASSES)
    batches, got = _labels(ld)
    assert len(batches) == len(ld) == 10 and all(len(b) == 4 for b in batches)
    assert set(got) == _good_keys(labels) and len(got) == GOOD
    assert all(got[k] == labels[k] for k in got)
    assert ld.corrupt_counts() == EXPECTED
    assert ld.padded == 40 - GOOD
    if num_workers == 0:
        assert len(calls) == GOOD  # the transform never saw a skipped sample


def test_pretraining_loader_keeps_labels_but_never_crashes_on_huge_ids(tmp_path):
    labels = _wds_set(tmp_path / "s")
    ld = ShardLoader(tmp_path / "s", to_tensor, 4, num_workers=0)
    _, got = _labels(ld)
    # No class check: -1, 12, 10 and missing (-1) come through; 10**30 cannot be an int64 label.
    assert ld.corrupt_counts() == {"label_out_of_range": 2, "bad_image": 1}
    assert len(got) == 37 and got["s0003"] == -1 and got["s0007"] == 12 and got["s0019"] == NUM_CLASSES
    assert got["s0015"] == -1 and "s0011" not in got and labels["s0011"] == 10**30


def test_two_ranks_keep_equal_batch_counts(tmp_path):
    labels = _wds_set(tmp_path / "s")
    counts, seen, lens = Counter(), set(), []
    for rank in range(2):
        ld = ShardLoader(tmp_path / "s", to_tensor, 4, rank=rank, world_size=2, num_workers=1, seed=3,
                         num_classes=NUM_CLASSES)
        batches, got = _labels(ld)
        assert all(len(b) == 4 for b in batches) and all(0 <= y < NUM_CLASSES for y in got.values())
        lens.append(len(batches))
        counts.update(ld.corrupt_counts())
        seen |= set(got)
    assert lens == [len(ld)] * 2 == [5, 5]
    assert counts == EXPECTED and seen == _good_keys(labels)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_resume_is_exact_around_label_skips(tmp_path, rank, world_size):
    _wds_set(tmp_path / "s")
    kw = dict(rank=rank, world_size=world_size, num_workers=2, shuffle_buffer=4, seed=1, num_classes=NUM_CLASSES)
    full = ShardLoader(tmp_path / "s", to_tensor, 4, **kw)
    reference, ref_labels = _labels(full)
    unpadded = len(ref_labels) // 4  # batches made only of fresh samples; later ones hold repeats
    assert full.padded and unpadded < len(reference)
    assert all(0 <= y < NUM_CLASSES for y in ref_labels.values())
    if world_size == 1:
        assert full.corrupt_counts() == EXPECTED
    for k in sorted({1, 2, unpadded - 1, unpadded, unpadded + 1, len(reference) - 1}):
        first = ShardLoader(tmp_path / "s", to_tensor, 4, **kw)
        head = []
        for b in first:
            head.append(b["__key__"])
            if len(head) == k:
                break
        state = first.state_dict()
        for num_workers in (2, 1):  # same workers: the exact order; another count: the same samples
            resumed = ShardLoader(tmp_path / "s", to_tensor, 4, **{**kw, "num_workers": num_workers})
            resumed.load_state_dict(state)
            tail, tail_labels = _labels(resumed)
            got = head + tail
            assert len(got) == len(reference) and all(len(b) == 4 for b in got), (k, num_workers)
            if num_workers == 2:
                assert got[:unpadded] == reference[:unpadded], k
            assert {x for b in got for x in b} == set(ref_labels), (k, num_workers)
            assert all(ref_labels[x] == y for x, y in tail_labels.items()), (k, num_workers)
            # Skips counted before the stop are restored and not counted again when met after it.
            assert resumed.corrupt_counts() == full.corrupt_counts(), (k, num_workers)
            assert resumed.padded == full.padded, (k, num_workers)
    # Another num_classes would skip other samples: refused, with the value to construct the loader with.
    with pytest.raises(ValueError, match="num_classes=10"):
        ShardLoader(tmp_path / "s", to_tensor, 4, **{**kw, "num_classes": 12}).load_state_dict(state)


def test_state_without_num_classes_resumes_a_pretraining_loader(tmp_path):
    make_shards(tmp_path, 2, 6)
    first = ShardLoader(tmp_path, to_tensor, 2, num_workers=0)
    head = [next(iter(first))["__key__"]]
    state = first.state_dict()
    del state["num_classes"]  # as saved before the parameter existed
    resumed = ShardLoader(tmp_path, to_tensor, 2, num_workers=0)
    resumed.load_state_dict(state)
    assert head + epoch_keys(resumed) == epoch_keys(ShardLoader(tmp_path, to_tensor, 2, num_workers=0))
    with pytest.raises(ValueError, match="num_classes=None"):
        ShardLoader(tmp_path, to_tensor, 2, num_workers=0, num_classes=3).load_state_dict(state)


def test_invalid_num_classes_is_refused(tmp_path):
    make_shards(tmp_path, 1, 4)
    with pytest.raises(ValueError, match="num_classes=0 must be >= 1"):
        ShardLoader(tmp_path, to_tensor, 2, num_classes=0)


def test_check_shards_counts_labels(tmp_path):
    _wds_set(tmp_path / "s")
    # Read back with webdataset's own pipeline: its default encoder wrote each int as ASCII digits.
    shards = str(tmp_path / "s" / "train-{000000..000003}.tar")
    cls = {s["__key__"]: s.get("cls") for s in wds.WebDataset(shards, shardshuffle=False)}
    assert len(cls) == 40 and cls["s0004"] == b"4" and cls["s0015"] is None
    assert cls["s0003"] == b"-1" and cls["s0007"] == b"12" and cls["s0011"] == str(10**30).encode()
    expected = {"shards": 4, "samples": GOOD, "skipped": sum(EXPECTED.values()), "errors": EXPECTED}
    assert check_shards(tmp_path / "s", num_classes=NUM_CLASSES) == expected
    assert check_shards(tmp_path / "s")["errors"] == {"label_out_of_range": 2, "bad_image": 1}
    proc = subprocess.run([sys.executable, "-m", "data.check_shards", str(tmp_path / "s"), "--workers", "2",
                           "--num-classes", str(NUM_CLASSES)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout) == expected


def test_check_shards_cli_passes_clean_labels_and_refuses_zero_classes(tmp_path):
    make_shards(tmp_path, 2, 4, num_classes=3)
    cmd = [sys.executable, "-m", "data.check_shards", str(tmp_path), "--workers", "1", "--num-classes"]
    ok = subprocess.run(cmd + ["3"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"shards": 2, "samples": 8, "skipped": 0, "errors": {}}
    bad = subprocess.run(cmd + ["0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--num-classes 0 must be >= 1" in bad.stderr


def test_write_shards_labels_are_checked(tmp_path):
    """The repo's writer stores any integer class id it is given: the loader and the index check catch them."""
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for n, label in enumerate(["0", "3", "9", "12", str(10**30), "", "-1", "5"]):
        (src / f"{n}.jpg").write_bytes(jpeg_bytes(n))
        rows.append(f"{n}.jpg\t{label}" if label else f"{n}.jpg")
    (src / "list.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    index = write_shards(src / "list.txt", out, shard_size=4, workers=1, progress=False)
    assert index["num_classes"] == 10**30 + 1 and index["splits"]["train"]["samples"] == 8

    ld = ShardLoader(out, to_tensor, 2, num_workers=0, shuffle_buffer=1, num_classes=NUM_CLASSES)
    _, got = _labels(ld)
    assert sorted(got.values()) == [0, 3, 5, 9]
    # "" and "-1" are written without a .cls member.
    assert ld.corrupt_counts() == {"label_out_of_range": 2, "no_label": 2}
    assert check_shards(out, num_classes=NUM_CLASSES)["errors"] == {"label_out_of_range": 2, "no_label": 2}
    with pytest.raises(ValueError, match=f"has {10**30 + 1} classes .* but the config says 10"):
        check_num_classes(out, NUM_CLASSES)


@pytest.fixture(scope="module")
def demo_root() -> str:
    """The demo set where the trainers find it (made on first use)."""
    return demo_shards()


def test_check_num_classes_on_the_demo_set(demo_root):
    root = demo_root
    assert check_num_classes(root, 12) == 12
    assert check_num_classes(Path(root) / "index.json", 12) == 12
    assert check_num_classes(f"file:{root}", 12) == 12
    with pytest.raises(ValueError) as e:
        check_num_classes(root, 10)
    msg = str(e.value)
    assert "\n" not in msg and "has 12 classes" in msg and "config says 10" in msg
    assert "set the config's num_classes to 12" in msg
    with pytest.raises(ValueError, match="has 12 classes .* says 1000"):
        check_num_classes(Path(root) / "index.json", 1000)


def test_check_num_classes_is_none_when_unknowable(tmp_path, demo_root):
    root = demo_root
    # Shards without an index: nothing to compare before reading them.
    assert check_num_classes(f"{root}/train-{{000000..000007}}.tar", 10) is None
    assert check_num_classes(f"pipe:cat {root}/train-000000.tar", 10) is None
    assert check_num_classes("https://example.com/shards/index.json", 10) is None
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "train-000000.tar").write_bytes(b"")
    assert check_num_classes(tmp_path / "bare", 10) is None
    (tmp_path / "list.txt").write_text(f"{root}/train-000000.tar\n")
    assert check_num_classes(tmp_path / "list.txt", 10) is None
    # An index that records no classes (no class_names, no num_classes) says nothing either.
    write_index(tmp_path / "bare", {"splits": {"train": {"samples": 384, "shards": [
        {"name": "train-000000.tar", "samples": 384}]}}})
    assert check_num_classes(tmp_path / "bare", 10) is None
