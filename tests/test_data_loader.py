"""ShardLoader: per-rank splitting with real DataLoader workers, shuffling, sources, batch layout."""
import subprocess

import pytest
import torch
import webdataset as wds

from data import ShardLoader, SimMIMTransform
from data.loader import _stack, plan_epoch
from tests.test_data_common import epoch_keys, jpeg_bytes, make_shards, to_tensor


@pytest.mark.parametrize("n_shards,per_shard,batch", [(8, 12, 4), (7, 13, 5)])
def test_two_ranks_two_workers_see_each_sample_once(tmp_path, n_shards, per_shard, batch):
    keys = make_shards(tmp_path, n_shards, per_shard)
    loaders = [ShardLoader(tmp_path, to_tensor, batch, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (n_shards * per_shard // 2) // batch
    seen = []
    for ld in loaders:
        batches = epoch_keys(ld, 0)
        assert len(batches) == len(ld)
        assert all(len(b) == batch for b in batches)
        seen.append([k for b in batches for k in b])
    both = seen[0] + seen[1]
    assert len(both) == len(set(both)), "a sample was yielded twice in one epoch"
    assert set(both) <= set(keys)
    per_rank = n_shards * per_shard // 2
    # Only the drop_last remainder of each rank (< batch) and the world remainder (< 2) go unseen.
    assert len(keys) - len(both) == 2 * (per_rank % batch) + (n_shards * per_shard) % 2
    assert not loaders[0].corrupt_counts() and not loaders[1].corrupt_counts()


def test_plan_covers_every_sample_once_and_equally():
    counts = [10, 3, 7, 0, 12, 5]
    for world in (1, 2, 3, 4):
        covered = []
        for r in range(world):
            pieces = plan_epoch(counts, epoch=2, seed=1, rank=r, world_size=world)
            assert sum(b - a for _, a, b in pieces) == sum(counts) // world
            covered += [(s, i) for s, a, b in pieces for i in range(a, b)]
        assert len(covered) == len(set(covered)) == sum(counts) // world * world


def test_shuffle_changes_per_epoch_and_repeats_with_seed(tmp_path):
    make_shards(tmp_path, 4, 16)
    a = ShardLoader(tmp_path, to_tensor, 8, num_workers=2, seed=3)
    e0, e1 = epoch_keys(a, 0), epoch_keys(a, 1)
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) and e0 != e1
    assert epoch_keys(ShardLoader(tmp_path, to_tensor, 8, num_workers=2, seed=3), 0) == e0
    assert epoch_keys(ShardLoader(tmp_path, to_tensor, 8, num_workers=2, seed=4), 0) != e0
    # Epochs advance by themselves after a full pass; set_epoch on the current epoch is a no-op.
    assert a.epoch == 2


def test_batch_layout_and_labels(tmp_path):
    make_shards(tmp_path, 2, 6, num_classes=3)
    b = next(iter(ShardLoader(tmp_path, to_tensor, 4, num_workers=0)))
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.long
    assert [int(k[-6:]) % 3 for k in b["__key__"]] == b["label"].tolist()
    assert set(b) == {"image", "label", "__key__"}


def test_channels_last_images_stack_without_transposing(tmp_path):
    hwc = [torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8) for _ in range(3)]
    chw_views = [x.permute(2, 0, 1) for x in hwc]  # what RandomResizedCropFlipUint8 returns
    batch = _stack(chw_views)
    assert torch.equal(batch, torch.stack(chw_views)) and batch.is_contiguous(memory_format=torch.channels_last)
    dense = [x.contiguous() for x in chw_views]
    assert torch.equal(_stack(dense), batch) and _stack(dense).is_contiguous()
    # Through a worker process, as the trainer gets it: (B, 3, H, W) uint8, channels-last strides.
    make_shards(tmp_path, 2, 6)
    b = next(iter(ShardLoader(tmp_path, SimMIMTransform(32, mask_patch_size=16), 4, num_workers=1)))
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
    assert b["image"].is_contiguous(memory_format=torch.channels_last)
    assert b["mask"].shape == (4, 8, 8) and b["mask"].is_contiguous()


def test_resampled_and_drop_last_false(tmp_path):
    make_shards(tmp_path, 3, 10)
    ld = ShardLoader(tmp_path, to_tensor, 4, rank=1, world_size=2, num_workers=2, resampled=True)
    assert len(ld) == 3 and len(epoch_keys(ld, 0)) == 3 and len(epoch_keys(ld, 1)) == 3
    ld = ShardLoader(tmp_path, to_tensor, 4, rank=1, world_size=2, num_workers=1, drop_last=False)
    assert [len(b) for b in epoch_keys(ld, 0)] == [4, 4, 4, 3]


def test_sources_folder_brace_list_pipe_gnu_tar_and_wds_writer(tmp_path):
    keys = make_shards(tmp_path / "ours", 2, 5, write_index_file=False)
    sources = [str(tmp_path / "ours"), str(tmp_path / "ours" / "train-{000000..000001}.tar"),
               [f"pipe:cat {tmp_path}/ours/train-00000{i}.tar" for i in range(2)]]
    (tmp_path / "list.txt").write_text("# shards\nours/train-000000.tar\nours/train-000001.tar\n")
    sources.append(str(tmp_path / "list.txt"))
    for src in sources:
        got = sum(epoch_keys(ShardLoader(src, to_tensor, 1, num_workers=0)), [])
        assert sorted(got) == keys, src

    # Object-store style: counts come from an index.json elsewhere, so nothing is scanned up front.
    indexed = make_shards(tmp_path / "indexed", 2, 5)
    pipes = [f"pipe:cat {tmp_path}/indexed/train-00000{i}.tar" for i in range(2)]
    ld = ShardLoader(pipes, to_tensor, 2, num_workers=0, index=tmp_path / "indexed")
    assert ld.counts == [5, 5] and sorted(sum(epoch_keys(ld), [])) == indexed

    # GNU tar of loose key.jpg / key.cls files, the other common producer. --sort=name keeps a key's
    # members adjacent, which every WebDataset reader needs (directory order does not).
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        (loose / f"img{i}.jpg").write_bytes(jpeg_bytes(i))
        (loose / f"img{i}.cls").write_text(str(i))
    (tmp_path / "gnu").mkdir()
    subprocess.run(["tar", "--sort=name", "-cf", str(tmp_path / "gnu" / "a.tar"), "-C", str(loose), "."], check=True)
    batches = list(ShardLoader(tmp_path / "gnu", to_tensor, 1, num_workers=0))
    assert sorted((b["__key__"][0], int(b["label"])) for b in batches) == \
        [(f"./img{i}", i) for i in range(4)]

    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "s-%03d.tar"), maxcount=3) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "jpg": jpeg_bytes(i), "cls": i})
    got = sorted(k for b in ShardLoader(tmp_path / "wds", to_tensor, 1, num_workers=0) for k in b["__key__"])
    assert got == [f"k{i}" for i in range(5)]


def test_clear_errors(tmp_path):
    make_shards(tmp_path, 1, 4)
    with pytest.raises(ValueError, match="lower batch_size"):
        ShardLoader(tmp_path, to_tensor, 8, num_workers=0)
    with pytest.raises(ValueError, match="no split 'val'"):
        ShardLoader(tmp_path, to_tensor, 1, split="val")
    with pytest.raises(ValueError, match="outside world_size"):
        ShardLoader(tmp_path, to_tensor, 1, rank=2, world_size=2)
