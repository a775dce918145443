"""Checkpoint bookkeeping on a real directory tree: complete markers, resume lookup, rotation."""
import pytest

from scale.checkpoint import COMPLETE, CheckpointManager, complete_tags, find_checkpoint, tag_for
from scale.config import CheckpointConfig, ConfigError


def _make(root, step, complete=True):
    d = root / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "shard.pt").write_bytes(b"x")
    if complete:
        (d / COMPLETE).write_text(f"{step}\n")
    return d


def test_tags_sort_by_step_and_skip_incomplete(tmp_path):
    for s in (5, 20, 100):
        _make(tmp_path, s)
    _make(tmp_path, 200, complete=False)  # a crash mid-save
    assert complete_tags(tmp_path / "checkpoints") == ["step_00000005", "step_00000020", "step_00000100"]
    mgr = CheckpointManager(CheckpointConfig(every_steps=10, keep_last=2), tmp_path, rank=0)
    assert mgr.resolve_resume("auto") == (tmp_path / "checkpoints", "step_00000100")
    assert mgr.resolve_resume("none") is None
    assert find_checkpoint(tmp_path) == (tmp_path / "checkpoints", "step_00000100")
    assert find_checkpoint(tmp_path / "checkpoints" / "step_00000020") == (tmp_path / "checkpoints", "step_00000020")


def test_auto_without_checkpoints_starts_fresh_but_a_bad_path_fails(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, rank=0)
    assert mgr.resolve_resume("auto") is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        mgr.resolve_resume(str(tmp_path / "elsewhere"))
    _make(tmp_path, 7, complete=False)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "checkpoints" / tag_for(7))


def test_rotation_keeps_newest_and_drops_stale_partials(tmp_path):
    for s in (10, 20, 30):
        _make(tmp_path, s)
    _make(tmp_path, 25, complete=False)
    _make(tmp_path, 40, complete=False)  # newer than the one being kept: maybe another save in flight
    mgr = CheckpointManager(CheckpointConfig(every_steps=10, keep_last=2), tmp_path, rank=0)
    mgr._rotate(keep=tag_for(30))
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000020", "step_00000030", "step_00000040"]


def test_due():
    mgr = CheckpointManager(CheckpointConfig(every_steps=3), "/nonexistent", rank=0)
    assert [s for s in range(1, 10) if mgr.due(s, final=False)] == [3, 6, 9]
    assert mgr.due(10, final=True)
    never = CheckpointManager(CheckpointConfig(every_steps=0), "/nonexistent", rank=0)
    assert not any(never.due(s, final=False) for s in range(1, 10))
