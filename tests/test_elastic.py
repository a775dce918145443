"""Elastic resume: a run saved on N ranks goes on on M ranks, with no sample of the epoch seen twice.

The loader tests read the keys directly. The trainer tests launch run_pretrain.py three times
(module fixture, ZeRO-3, same global batch of 16): 6 steps on 2 ranks (the reference), its step-3
checkpoint resumed on 1 rank to step 6, and that 1-rank checkpoint resumed on 2 ranks to step 8.
"""
import json
import shutil

import pytest
import torch

from data import ShardLoader
from scale.checkpoint import complete_tags, read_meta
from scale.export import main as export_main
from tests.distributed import run_torchrun
from tests.test_data_common import make_shards, to_tensor

KW = dict(num_workers=0, seed=3, shuffle_buffer=4, interleave=2, drop_last=False)


def _loaders(folder, world_size: int, batch_size: int = 4) -> list[ShardLoader]:
    return [ShardLoader(folder, to_tensor, batch_size, rank=r, world_size=world_size, **KW) for r in range(world_size)]


def _take(loaders, k: int | None) -> list[str]:
    """Keys of the next k batches of every loader (None: to the end of the epoch)."""
    keys = []
    for loader in loaders:
        for i, b in enumerate(loader):
            keys += b["__key__"]
            if k is not None and i + 1 == k:
                break
    return keys


def _elastic(folder, states: list[dict], world_size: int) -> tuple[list[ShardLoader], int]:
    new = _loaders(folder, world_size)
    dropped = [loader.load_elastic_states(states) for loader in new]
    assert len(set(dropped)) == 1 and dropped[0] < world_size
    return new, dropped[0]


@pytest.mark.parametrize("old,new", [(2, 3), (3, 1), (1, 2)])
def test_elastic_resume_reads_exactly_the_undelivered_rest(tmp_path, old, new):
    make_shards(tmp_path, 5, 11)  # 55 samples
    epoch = set(_take(_loaders(tmp_path, old), None))
    first = _loaders(tmp_path, old)
    head = _take(first, 2)
    resumed, dropped = _elastic(tmp_path, [loader.state_dict() for loader in first], new)
    tail_batches = [[len(b["__key__"]) for b in loader] for loader in resumed]
    assert len({len(t) for t in tail_batches}) == 1  # equal batch counts on every new rank (ZeRO-3 needs it)
    resumed2, _ = _elastic(tmp_path, [loader.state_dict() for loader in first], new)
    tail = _take(resumed2, None)
    assert len(head + tail) == len(set(head + tail)), "a sample was delivered twice"
    assert set(head + tail) <= epoch
    assert len(epoch - set(head + tail)) == dropped
    # Then normal epochs on the new world size.
    assert all(loader.epoch == 1 for loader in resumed2)
    fresh = _loaders(tmp_path, new)
    for loader in fresh:
        loader.set_epoch(1)
    assert _take(resumed2, None) == _take(fresh, None)


def test_second_change_and_same_size_resume_within_the_epoch(tmp_path):
    make_shards(tmp_path, 5, 11)
    epoch = set(_take(_loaders(tmp_path, 2), None))
    first = _loaders(tmp_path, 2)
    seen = _take(first, 2)
    mid, dropped_a = _elastic(tmp_path, [loader.state_dict() for loader in first], 3)
    seen += _take(mid, 1)
    saved = [loader.state_dict() for loader in mid]
    # The re-cut plan resumes exactly on the same number of ranks...
    again = _loaders(tmp_path, 3)
    for loader, state in zip(again, saved):
        loader.load_state_dict(state)
    assert [[b["__key__"] for b in loader] for loader in again] == [[b["__key__"] for b in loader] for loader in mid]
    # ...and changes world size again, from 3 ranks to 2.
    last, dropped_b = _elastic(tmp_path, saved, 2)
    seen += _take(last, None)
    assert len(seen) == len(set(seen)), "a sample was delivered twice"
    assert len(epoch - set(seen)) == dropped_a + dropped_b


def test_refuses_partial_states(tmp_path):
    make_shards(tmp_path, 2, 8)
    first = _loaders(tmp_path, 2)
    with pytest.raises(ValueError, match="every rank"):
        _loaders(tmp_path, 1)[0].load_elastic_states([first[0].state_dict()])


COMMON = ["model.img_size=32", "data.num_workers=0", "optim.lr=0.02", "schedule.warmup_epochs=0", "log.every_steps=1",
          "log.image_every_steps=100", "checkpoint.every_steps=3", "checkpoint.keep_last=5", "seed=3",
          "--ds_config", "ds_configs/zero3.json"]


def _launch(out, ranks: int, steps: int, resume: str) -> str:
    batch = 16 // ranks  # the same global batch, hence the same LR schedule, on either world size
    return run_torchrun("run_pretrain.py", *COMMON, f"train.micro_batch_size={batch}", f"train.max_steps={steps}",
                        f"output_dir={out}", f"resume={resume}", num_procs=ranks, timeout=600).stdout


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss/train"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    stdout = {"ref": _launch(root / "ref", 2, 6, "none")}
    # Interrupted after the step-3 checkpoint, resumed on 1 rank; then that run resumed on 2.
    shutil.copytree(root / "ref" / "checkpoints", root / "one" / "checkpoints",
                    ignore=shutil.ignore_patterns("step_00000006"))
    stdout["one"] = _launch(root / "one", 1, 6, "auto")
    shutil.copytree(root / "one" / "checkpoints", root / "two" / "checkpoints")
    stdout["two"] = _launch(root / "two", 2, 8, "auto")
    # Load the 2-rank step-3 checkpoint on 1 rank and save it again without training.
    stdout["reload"] = _launch(root / "reload", 1, 3, str(root / "ref" / "checkpoints" / "step_00000003"))
    return root, stdout


@pytest.mark.distributed
def test_universal_load_restores_the_exact_weights(runs, tmp_path):
    root, stdout = runs
    assert "elastic resume: checkpoint written by 2 ranks, resuming on 1" in stdout["reload"]
    for name in ("ref", "reload"):
        assert export_main([str(root / name / "checkpoints" / "step_00000003"), str(tmp_path / f"{name}.pt")]) == 0
    ref, reload = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["model"] for n in ("ref", "reload"))
    assert ref.keys() == reload.keys()
    assert all(torch.equal(ref[k], reload[k]) for k in ref)


@pytest.mark.distributed
@pytest.mark.parametrize("name,old,new,first", [("one", 2, 1, 4), ("two", 1, 2, 7)])
def test_trainer_resumes_on_another_world_size(runs, name, old, new, first):
    root, stdout = runs
    assert (f"elastic resume: checkpoint written by {old} ranks, resuming on {new}: converted to a universal "
            f"checkpoint") in stdout[name]
    if name == "one":  # same global batch and length: the schedule carries over unchanged ("two" runs longer)
        assert "LR schedule differs" not in stdout[name]
    losses, ref = _losses(root / name), _losses(root / "ref")
    assert min(losses) == first  # steps go on from the checkpoint's
    before = ref[first - 1] if name == "one" else _losses(root / "one")[first - 1]
    # The loss goes on where it was (the weights are checked exactly above): same batch size, other samples.
    assert 0.8 < losses[first] / before < 1.25
    if first in ref:
        assert 0.8 < losses[first] / ref[first] < 1.25
    ckpt = root / name / "checkpoints"
    assert read_meta(ckpt, complete_tags(ckpt)[-1])["world_size"] == new
    assert all(not t.endswith("_universal") for t in complete_tags(ckpt))
