"""LR schedule: warmup, cosine/step shapes, batch scaling, per-group application."""
import math

import pytest

from scale.config import ScheduleConfig
from scale.lr_schedule import build_lr_schedule, scale_lr


def _sched(**kw):
    cfg = ScheduleConfig(**{"warmup_epochs": 1.0, "warmup_lr": 0.0, "min_lr": 0.1, **kw})
    return build_lr_schedule(cfg, lr=1.0, global_batch=512, batch_base=512, total_steps=100, epochs=10)


def test_linear_scaling_rule():
    assert scale_lr(1e-4, 2048) == pytest.approx(4e-4)
    s = build_lr_schedule(ScheduleConfig(warmup_epochs=0), lr=1e-4, global_batch=64, batch_base=512,
                          total_steps=10, epochs=1)
    assert s.lr_at(0) == pytest.approx(1e-4 * 64 / 512)


def test_warmup_then_cosine():
    s = _sched()
    assert s.warmup_steps == 10  # 1 of 10 epochs over 100 steps
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(0.5) and s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(100) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_schedule_milestones_in_epochs():
    s = _sched(name="step", milestones=[7.0], gamma=0.1)
    assert s.milestones == [70]
    assert s.lr_at(69) == pytest.approx(1.0) and s.lr_at(70) == pytest.approx(0.1)


def test_max_steps_compresses_the_shape():
    cfg = ScheduleConfig(warmup_epochs=10, name="step", milestones=[700])
    s = build_lr_schedule(cfg, lr=1.0, global_batch=512, batch_base=512, total_steps=80, epochs=800)
    assert (s.warmup_steps, s.milestones) == (1, [70])


def test_apply_keeps_each_groups_scale():
    groups = [{"lr": 0.0, "lr_scale": 1.0}, {"lr": 0.0, "lr_scale": 0.25}, {"lr": 0.0}]
    lr = _sched().apply(groups, 10)
    assert lr == pytest.approx(1.0)
    assert [g["lr"] for g in groups] == pytest.approx([1.0, 0.25, 1.0])
