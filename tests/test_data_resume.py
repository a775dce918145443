"""Exact resume: stop after k batches, restore into a new loader, and get exactly the unseen rest."""
import pytest
import torch

from data import ShardLoader, SimMIMTransform
from tests.test_data_common import epoch_keys, make_shards, to_tensor


def _partial(loader, k: int) -> list[list[str]]:
    out = []
    for b in loader:
        out.append(b["__key__"])
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_same_workers_replays_exact_rest(tmp_path, rank):
    make_shards(tmp_path, 5, 11)
    kw = dict(rank=rank, world_size=2, num_workers=2, seed=5, shuffle_buffer=8, interleave=2)
    full = ShardLoader(tmp_path, to_tensor, 4, **kw)
    full.set_epoch(1)
    reference = epoch_keys(full)

    # Every stop point, including ones inside a worker's chunk and after a worker ran dry.
    for k in range(1, len(reference)):
        first = ShardLoader(tmp_path, to_tensor, 4, **kw)
        first.set_epoch(1)
        head = _partial(first, k)
        state = first.state_dict()

        resumed = ShardLoader(tmp_path, to_tensor, 4, **kw)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # what a training loop does after restoring: must keep the position
        tail = epoch_keys(resumed)
        assert head + tail == reference, k
        assert resumed.epoch == 2


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores is the point
@pytest.mark.parametrize("new_workers", [0, 1, 3])
def test_resume_with_other_worker_count_has_no_repeats_or_gaps(tmp_path, new_workers):
    make_shards(tmp_path, 6, 10)
    full = ShardLoader(tmp_path, to_tensor, 5, num_workers=2, seed=1)
    reference = sum(epoch_keys(full), [])

    first = ShardLoader(tmp_path, to_tensor, 5, num_workers=2, seed=1)
    head = sum(_partial(first, 4), [])
    resumed = ShardLoader(tmp_path, to_tensor, 5, num_workers=new_workers, seed=1)
    resumed.load_state_dict(first.state_dict())
    tail_batches = epoch_keys(resumed)
    tail = sum(tail_batches, [])
    assert len(tail_batches) == len(full) - 4
    assert len(head + tail) == len(set(head + tail)) == len(reference)
    assert set(head + tail) == set(reference)


def _simmim() -> SimMIMTransform:
    # 16 px test images: a 4x4 grid of mask cells and a wide crop range, so both draws vary per sample.
    return SimMIMTransform(16, mask_patch_size=4, model_patch_size=2, mask_ratio=0.5, scale=(0.2, 1.0))


def _batches(loader, k: int | None = None) -> list[dict]:
    """The first k batches (all of the epoch if None) as {"image", "mask", "__key__"}."""
    out = []
    for b in loader:
        out.append({k_: b[k_] for k_ in ("image", "mask", "__key__")})
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("new_workers", [2, 1, 0])
def test_resume_repeats_augmentations_and_masks_bitwise(tmp_path, new_workers):
    make_shards(tmp_path, 4, 10)
    kw = dict(rank=1, world_size=2, seed=3, shuffle_buffer=4, interleave=2)
    reference = _batches(ShardLoader(tmp_path, _simmim(), 2, num_workers=2, **kw))
    by_key = {key: (b["image"][i], b["mask"][i]) for b in reference for i, key in enumerate(b["__key__"])}
    for k in (1, 4):
        first = ShardLoader(tmp_path, _simmim(), 2, num_workers=2, **kw)
        head = _batches(first, k)
        resumed = ShardLoader(tmp_path, _simmim(), 2, num_workers=new_workers, **kw)
        resumed.load_state_dict(first.state_dict())
        tail = _batches(resumed)
        assert len(head) + len(tail) == len(reference), k
        for got, want in zip(head, reference):
            assert torch.equal(got["image"], want["image"]) and torch.equal(got["mask"], want["mask"]), k
        if new_workers == 2:
            for got, want in zip(tail, reference[k:]):
                assert got["__key__"] == want["__key__"], k
                assert torch.equal(got["image"], want["image"]) and torch.equal(got["mask"], want["mask"]), k
        else:
            keys = [key for b in tail for key in b["__key__"]]
            assert sorted(keys) == sorted(key for b in reference[k:] for key in b["__key__"]), k
            for b in tail:
                for i, key in enumerate(b["__key__"]):
                    assert torch.equal(b["image"][i], by_key[key][0]), (k, key)
                    assert torch.equal(b["mask"][i], by_key[key][1]), (k, key)
    # The draws really vary per sample, so the equalities above are not trivially true.
    assert len({m.numpy().tobytes() for _, m in by_key.values()}) > 1
    assert len({(t.shape, t.sum().item()) for t, _ in by_key.values()}) > 1


def test_main_process_loading_leaves_global_rngs_alone(tmp_path):
    make_shards(tmp_path, 2, 6)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _batches(ShardLoader(tmp_path, _simmim(), 4, num_workers=0))
    assert torch.equal(torch.get_rng_state(), before)


def test_breaking_out_and_iterating_again_continues(tmp_path):
    make_shards(tmp_path, 4, 8)
    reference = epoch_keys(ShardLoader(tmp_path, to_tensor, 4, num_workers=2))
    ld = ShardLoader(tmp_path, to_tensor, 4, num_workers=2)
    assert _partial(ld, 2) + epoch_keys(ld) == reference


def test_state_mismatch_is_refused(tmp_path):
    make_shards(tmp_path, 2, 8)
    state = ShardLoader(tmp_path, to_tensor, 4, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="batch_size=4"):
        ShardLoader(tmp_path, to_tensor, 2, num_workers=0).load_state_dict(state)
    make_shards(tmp_path / "other", 3, 8)
    with pytest.raises(ValueError, match="same shards"):
        ShardLoader(tmp_path / "other", to_tensor, 4, num_workers=0).load_state_dict(state)
