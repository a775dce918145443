"""MoBY on 2 real CPU ranks (torchrun, gloo, fp32), plus its queue and head units.

Three launches shared by the tests (module fixture): demo_moby shrunk to 32x32 and 6 steps under
ZeRO-3 (a checkpoint after every step) and ZeRO-2 with the same seed, then a copy of the ZeRO-3
output cut back to its step-3 checkpoint, continued with `resume=auto`.
"""
import json
import shutil

import pytest
import torch

from models.moby import KeyQueues, build_moby
from scale.ema import cosine_momentum
from scale.export import consolidate
from tests.distributed import run_torchrun

STEPS, QUEUE, GLOBAL_BATCH, MOMENTUM = 6, 64, 16, 0.9
COMMON = ["--config", "configs/pretrain/demo_moby.yaml", "model.img_size=32", "train.micro_batch_size=8",
          "data.num_workers=0", "optim.lr=0.01", "schedule.warmup_epochs=0", "log.every_steps=1",
          f"train.max_steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.keep_last=10", "seed=3",
          "moby.proj_dim=32", "moby.hidden_dim=64", f"moby.queue_size={QUEUE}", f"moby.momentum={MOMENTUM}"]


def _launch(stage: int, out, *extra: str) -> str:
    return run_torchrun("run_pretrain.py", "--ds_config", f"ds_configs/zero{stage}.json", *COMMON,
                        f"output_dir={out}", *extra, timeout=600).stdout


def _losses(out) -> list[float]:
    return [json.loads(line)["loss/train"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rank_states(out, step: int) -> list[dict]:
    tag = out / "checkpoints" / f"step_{step:08d}"
    return [torch.load(tag / f"trainer_rank{r:05d}.pt", weights_only=True) for r in range(2)]


def _weights(out, step: int) -> dict[str, torch.Tensor]:
    return consolidate(out / "checkpoints" / f"step_{step:08d}")["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moby")
    stdout = {stage: _launch(stage, root / f"z{stage}", "resume=none") for stage in (3, 2)}
    resumed = root / "z3_resumed"
    shutil.copytree(root / "z3", resumed,
                    ignore=shutil.ignore_patterns(*(f"step_{s:08d}" for s in range(4, STEPS + 1)), "metrics.jsonl",
                                                  "tensorboard"))
    stdout["resumed"] = _launch(3, resumed, "resume=auto")
    return root, stdout


@pytest.mark.distributed
def test_loss_falls_and_stages_agree(runs):
    root, stdout = runs
    losses = _losses(root / "z3")
    assert len(losses) == STEPS and sum(losses[-2:]) < sum(losses[:2]), losses
    assert "ZeRO stage 3" in stdout[3] and "global batch 16" in stdout[3]
    torch.testing.assert_close(torch.tensor(_losses(root / "z2")), torch.tensor(losses), rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_teacher_is_the_fp32_ema_of_the_student_under_zero3(runs):
    root, _ = runs
    for step in (2, STEPS):
        before, after = _weights(root / "z3", step - 1), _weights(root / "z3", step)
        momentum = _rank_states(root / "z3", step)[0]["task"]["momentum"]
        assert momentum == pytest.approx(cosine_momentum(MOMENTUM, step, STEPS))
        teacher_keys = [k for k in after if k.startswith("teacher.") and after[k].is_floating_point()
                        and "running_" not in k]  # batch-norm statistics are the teacher's own
        assert len(teacher_keys) > 100
        for key in teacher_keys:
            student = after[key.removeprefix("teacher.")]
            expected = momentum * before[key] + (1 - momentum) * student
            torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-6, msg=key)
        # the teacher moved (it is not silently frozen) and did not jump to the student
        moved = [k for k in teacher_keys if not torch.equal(after[k], before[k])]
        assert len(moved) > len(teacher_keys) // 2 or momentum == 1.0


@pytest.mark.distributed
def test_queues_are_identical_on_every_rank_and_follow_the_pointer(runs):
    root, _ = runs
    for step in range(1, STEPS + 1):
        rank0, rank1 = (s["task"]["queues"] for s in _rank_states(root / "z3", step))
        assert torch.equal(rank0["keys"], rank1["keys"]) and rank0["ptr"] == rank1["ptr"]
        assert rank0["ptr"] == step * GLOBAL_BATCH % QUEUE
        assert rank0["keys"].dtype == torch.float32
        torch.testing.assert_close(rank0["keys"].norm(dim=-1), torch.ones(2, QUEUE))


@pytest.mark.distributed
def test_resume_is_bitwise_equal_including_teacher_and_queues(runs):
    root, stdout = runs
    assert "at step 3" in stdout["resumed"]
    assert _losses(root / "z3_resumed") == _losses(root / "z3")[3:]
    a, b = _weights(root / "z3", STEPS), _weights(root / "z3_resumed", STEPS)
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for full, resumed in zip(_rank_states(root / "z3", STEPS), _rank_states(root / "z3_resumed", STEPS)):
        assert torch.equal(full["task"]["queues"]["keys"], resumed["task"]["queues"]["keys"])
        assert all(torch.equal(x, y) for x, y in zip(full["task"]["teacher"]["shadow"],
                                                     resumed["task"]["teacher"]["shadow"]))


def test_enqueue_rule_writes_each_views_keys_at_the_pointer_and_wraps():
    queues = KeyQueues(2, 4, 6, seed=0, device=torch.device("cpu"))
    start = queues.keys.clone()
    k0, k1 = torch.randn(3, 4), torch.randn(3, 4)
    queues.push([k0, k1])
    assert torch.equal(queues.keys[0, :3], k0) and torch.equal(queues.keys[1, :3], k1)
    assert torch.equal(queues.keys[:, 3:], start[:, 3:]) and queues.ptr == 3
    queues.push([k1, k0])
    queues.push([k0 * 2, k1 * 2])  # the oldest keys go first
    assert queues.ptr == 3 and torch.equal(queues.keys[0, :3], k0 * 2) and torch.equal(queues.keys[0, 3:], k1)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        queues.push([torch.randn(4, 4), torch.randn(4, 4)])


def test_loss_uses_the_queue_before_this_batch_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    model = build_moby("swinv2_tiny", proj_dim=8, hidden_dim=16, img_size=32, embed_dim=8, depths=[1, 1, 1, 1],
                       num_heads=[1, 1, 1, 1], window_size=4, drop_path_rate=0.0)
    model.queues = KeyQueues(2, 8, 8, seed=0, device=torch.device("cpu"))
    negatives = model.queues.keys.clone()
    views = torch.randn(2, 4, 3, 32, 32)
    out = model(*views)
    out["loss"].backward()
    normalize = torch.nn.functional.normalize
    with torch.no_grad():  # the spec's loss, from the queues as they were before the call
        q = [normalize(model.predictor(model.projector(model.encoder(v))), dim=-1) for v in views]
        k = [normalize(model.teacher["projector"](model.teacher["encoder"](v)), dim=-1) for v in views]

    def info_nce(query, key, queue):
        logits = torch.cat([(query * key).sum(-1, keepdim=True), query @ queue.T], 1) / model.temperature
        return torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))

    expected = info_nce(q[0], k[1], negatives[1]) + info_nce(q[1], k[0], negatives[0])
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert torch.equal(model.queues.keys[:, :4], torch.stack(k)) and model.queues.ptr == 4  # pushed after the loss
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.distributed
def test_global_batch_norm_equals_one_batch_norm_over_all_ranks():
    proc = run_torchrun("tests/global_bn_check.py", timeout=120)
    assert proc.stdout.count("global batch norm matches") == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
