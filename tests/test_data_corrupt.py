"""Corrupt input of every kind is skipped and counted exactly, never a crash; pickles are never loaded."""
import io
import json
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from data import ShardLoader
from data.check_shards import check_shards
from data.index import write_index
from data.write_shards import TarShardWriter
from tests.test_data_common import REPO, epoch_keys, jpeg_bytes, make_shards, to_tensor


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb that costs nothing to store."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _corrupt_set(folder: Path) -> tuple[dict[str, int], int]:
    """Three good shards plus one shard of each corruption kind; returns (expected counts, good samples)."""
    folder.mkdir()
    good = len(make_shards(folder, 3, 8, write_index_file=False))
    w = TarShardWriter(folder, "bad", 100)
    truncated_jpeg = jpeg_bytes(1, size=64)
    bad = [
        {"jpg": truncated_jpeg[:len(truncated_jpeg) // 2], "cls": b"1"},  # bad_image
        {"cls": b"2"},                                                  # no_image
        {"txt": b"caption only"},                                       # no_image
        {"jpg": b"", "cls": b"1"},                                      # empty_member
        {"png": b"this is not an image at all", "cls": b"0"},           # not_image
        {"jpg": jpeg_bytes(2), "cls": b"seven"},                        # bad_label
        {"png": _png_claiming(20000, 20000), "cls": b"1"},              # too_large (PIL's default limit)
        {"jpg": jpeg_bytes(3), "cls": b"1"},                            # fine
    ]
    for i, members in enumerate(bad):
        w.write(f"bad_{i:03d}", members)
    entry = w.close()
    # A shard cut in the middle of its third sample's image: two samples survive.
    tw = TarShardWriter(folder, "cut", 100)
    for i in range(5):
        tw.write(f"cut_{i:03d}", {"jpg": jpeg_bytes(100 + i, size=48), "cls": b"0"})
    cut_entry = tw.close()
    raw = (folder / "cut-000000.tar").read_bytes()
    offset = raw.index(b"cut_002.jpg") + 512 + 200
    (folder / "cut-000000.tar").write_bytes(raw[:offset])
    (folder / "junk-000000.tar").write_bytes(b"\x00\x01 definitely not a tar archive" * 50)
    shards = {"splits": {"train": {"samples": 0, "shards": []}}}
    for e in (entry, cut_entry):
        shards["splits"]["train"]["shards"] += e["shards"]
    shards["splits"]["train"]["shards"] += [{"name": "junk-000000.tar", "samples": 3},
                                          *[{"name": f"train-{i:06d}.tar", "samples": 8} for i in range(3)]]
    write_index(folder, shards)
    expected = {"bad_image": 1, "no_image": 2, "empty_member": 1, "not_image": 1, "bad_label": 1,
                "too_large": 1, "truncated_tar": 1, "unreadable_shard": 1}
    return expected, good + 1 + 2


def test_every_corruption_is_skipped_and_counted(tmp_path):
    expected, good = _corrupt_set(tmp_path / "s")
    ld = ShardLoader(tmp_path / "s", to_tensor, 4, num_workers=2, shuffle_buffer=4)
    batches = epoch_keys(ld, 0)
    assert len(batches) == len(ld) and all(len(b) == 4 for b in batches)
    assert ld.corrupt_counts() == expected
    seen = {k for b in batches for k in b}
    assert "bad_007" in seen and {"cut_000", "cut_001"} <= seen and not any(k.startswith("cut_002") for k in seen)
    # 40 listed samples make 10 batches; 27 decode, so 13 repeats keep the batch count.
    assert len(seen) == good == 27 and ld.padded == len(ld) * 4 - good == 13

    report = check_shards(tmp_path / "s")
    assert report == {"shards": 6, "samples": good, "skipped": sum(expected.values()), "errors": expected}


def test_short_rank_is_padded_to_equal_batch_count(tmp_path):
    expected, good = _corrupt_set(tmp_path / "s")
    # 40 listed / 2 ranks = 20 each -> 5 batches of 4 per rank; whichever rank gets the corrupt
    # shards decodes fewer than 20 and must still yield 5 batches.
    lens = []
    for rank in range(2):
        ld = ShardLoader(tmp_path / "s", to_tensor, 4, rank=rank, world_size=2, num_workers=1, seed=2)
        batches = epoch_keys(ld, 0)
        lens.append(len(batches))
        assert all(len(b) == 4 for b in batches)
    assert lens == [len(ld)] * 2


def test_check_shards_cli_and_exit_status(tmp_path):
    expected, good = _corrupt_set(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-m", "data.check_shards", str(tmp_path / "s"), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout) == {"shards": 6, "samples": good, "skipped": sum(expected.values()),
                                       "errors": expected}


class _CreatesFile:
    """Unpickling this opens (and so creates) a file: the canary for code execution on load."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pickle_members_are_never_unpickled(tmp_path, num_workers):
    canary = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(canary)))
    folder = tmp_path / "s"
    folder.mkdir()
    w = TarShardWriter(folder, "train", 4)
    for i in range(8):
        w.write(f"s_{i:03d}", {"jpg": jpeg_bytes(i), "cls": b"1", "pyd": payload, "pickle": payload})
    write_index(folder, {"splits": {"train": w.close()}})

    ld = ShardLoader(folder, to_tensor, 2, num_workers=num_workers)
    assert sum(len(b) for b in epoch_keys(ld, 0)) == 8
    assert check_shards(folder)["samples"] == 8
    assert not canary.exists(), "a .pyd/.pickle member was unpickled"
    assert ld.corrupt_counts() == {}
    # The canary is live: loading the member's bytes really would have created the file.
    pickle.loads(payload)
    assert canary.exists()


def test_resume_around_corrupt_samples_and_padding(tmp_path):
    expected, good = _corrupt_set(tmp_path / "s")
    kw = dict(num_workers=2, shuffle_buffer=4, seed=1)
    full = ShardLoader(tmp_path / "s", to_tensor, 4, **kw)
    reference = epoch_keys(full, 0)
    unpadded = good // 4  # batches made only of fresh samples; later ones hold repeats
    for k in (1, 4, unpadded - 1, unpadded, unpadded + 1, len(reference) - 1):
        first = ShardLoader(tmp_path / "s", to_tensor, 4, **kw)
        head = []
        for b in first:
            head.append(b["__key__"])
            if len(head) == k:
                break
        for num_workers in (2, 1):  # same workers: the exact order; another count: the same samples
            resumed = ShardLoader(tmp_path / "s", to_tensor, 4, **{**kw, "num_workers": num_workers})
            resumed.load_state_dict(first.state_dict())
            got = head + epoch_keys(resumed)
            assert len(got) == len(reference), (k, num_workers)
            if num_workers == 2:
                assert got[:unpadded] == reference[:unpadded], k
            assert {x for b in got for x in b} == {x for b in reference for x in b}, (k, num_workers)
            # Read errors too (truncated, unreadable shards) are counted once across the resume.
            assert resumed.corrupt_counts() == expected and resumed.padded == full.padded, (k, num_workers)
