"""Exact resume: stop after k batches, restore into a new loader, and get exactly the unseen rest."""
import pytest

from data import ShardLoader
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
