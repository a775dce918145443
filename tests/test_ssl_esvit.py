"""EsViT: region matching, centres, loss, multi-size student and task schedules on one CPU process, plus one
launch on 2 real CPU ranks (torchrun, ZeRO-3, fp32) shared by the distributed tests, and the
same launch under ZeRO-2.

The launch is demo_esvit at micro batch 8 for 8 steps with a checkpoint after every step, a flat LR, a
constant teacher temperature and centre momentum 0: the centre then follows the last batch at once, so
from step 2 on the teacher's entropy is steady and the cross-entropy shows the student learning (with
DINO's momentum 0.9 and temperature warmup it first rises with the teacher's entropy for tens of steps).
"""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.esvit import Centers, build_esvit, match_regions
from scale.config import load_config
from scale.ema import cosine_momentum
from scale.export import consolidate
from scale.tasks.esvit import EsViTTask
from tests.distributed import run_torchrun

TINY = dict(img_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4)
STEPS, FROZEN_STEPS, MOMENTUM = 8, 3, 0.99
ARGS = ["--config", "configs/pretrain/demo_esvit.yaml", "--ds_config", "ds_configs/zero3.json",
        "train.micro_batch_size=8", "data.num_workers=0", "optim.lr=0.05", "schedule.warmup_epochs=0",
        "schedule.min_lr=0.05", "log.every_steps=1", f"train.max_steps={STEPS}", "checkpoint.every_steps=1",
        "checkpoint.keep_last=10", "seed=1", "esvit.warmup_teacher_temp_epochs=0", "esvit.center_momentum=0.0",
        f"esvit.momentum={MOMENTUM}", f"esvit.freeze_last_layer_epochs={FROZEN_STEPS * 2 / STEPS}",  # 2 epochs
        "resume=none"]


def tiny_esvit(**kwargs) -> torch.nn.Module:
    model = build_esvit("swinv2_tiny", out_dim=32, dense_out_dim=16, hidden_dim=32, bottleneck_dim=8,
                        drop_path_rate=0.0, **TINY, **kwargs)
    model.centers = Centers({"head": 32, "dense_head": 16}, 0.9, torch.device("cpu"))
    return model


def crops(batch: int = 3, local: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 64, 64) for _ in range(2)] + [torch.randn(batch, 3, 32, 32) for _ in range(local)]


def test_region_matching_is_the_most_similar_teacher_token():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 8), torch.randn(3, 7, 8) * torch.rand(3, 7, 1) * 5  # norms differ
    matched = match_regions(student, teacher)
    assert matched.shape == (3, 5)
    for b in range(3):
        for j in range(5):
            cosines = [F.cosine_similarity(student[b, j], teacher[b, i], dim=0) for i in range(7)]
            assert matched[b, j] == max(range(7), key=lambda i: cosines[i])


def test_centres_are_the_ema_of_the_teachers_batch_mean():
    centers = Centers({"head": 4, "dense_head": 3}, momentum=0.9, device=torch.device("cpu"))
    view, dense = torch.randn(6, 4), torch.randn(10, 3)
    centers.update({"head": view, "dense_head": dense})
    torch.testing.assert_close(centers.values["head"], 0.1 * view.mean(0, keepdim=True))
    before = centers.state_dict()
    view2, dense2 = torch.randn(6, 4), torch.randn(10, 3)
    centers.update({"head": view2.bfloat16(), "dense_head": dense2})
    torch.testing.assert_close(centers.values["dense_head"], 0.9 * before["dense_head"] + 0.1 * dense2.mean(0))
    assert all(c.dtype == torch.float32 for c in centers.values.values())


def test_loss_is_the_spec_and_only_the_student_learns():
    torch.manual_seed(0)
    model = tiny_esvit()
    model.teacher_temp = 0.05
    model.centers.update({"head": torch.randn(4, 32), "dense_head": torch.randn(4, 16)})
    centers = model.centers.state_dict()
    views = crops()
    out = model(*views)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert model.encoder.img_size == (64, 64)  # back at the global size after the local crops

    def tokens(encoder, x):  # (B, T, C), one crop at a time
        encoder.set_input_size(x.shape[-1], 4)
        return encoder.forward_tokens(x).flatten(1, 2)

    with torch.no_grad():  # the spec, crop by crop, pair by pair, token by token
        s_tok = [tokens(model.encoder, v) for v in views]
        t_tok = [tokens(model.teacher["encoder"], v) for v in views[:2]]
        view, region = [], []
        for t in range(2):
            p_t = F.softmax((model.teacher["head"](t_tok[t].mean(1)) - centers["head"]) / 0.05, -1)
            p_dense = F.softmax((model.teacher["dense_head"](t_tok[t]) - centers["dense_head"]) / 0.05, -1)
            for s in range(len(views)):
                if s == t:
                    continue
                log_s = F.log_softmax(model.head(s_tok[s].mean(1)) / 0.1, -1)
                view.append(-(p_t * log_s).sum(-1).mean())
                log_dense = F.log_softmax(model.dense_head(s_tok[s]) / 0.1, -1)
                for b in range(3):
                    for j in range(s_tok[s].shape[1]):
                        i = max(range(t_tok[t].shape[1]),
                                key=lambda i: F.cosine_similarity(s_tok[s][b, j], t_tok[t][b, i], dim=0))
                        region.append((-(p_dense[b, i] * log_dense[b, j]).sum(), s_tok[s].shape[1]))
    assert len(view) == 2 * 3  # (2 globals + 2 locals) - 1 pairs per teacher crop
    view_loss = torch.stack(view).mean()
    # each pair's tokens averaged, then the pairs: tokens of a pair weigh 1 / (batch * its tokens)
    region_loss = sum(ce / (3 * n) for ce, n in region) / len(view)
    torch.testing.assert_close(out["esvit/view_loss"], view_loss)
    torch.testing.assert_close(out["esvit/region_loss"], region_loss)
    torch.testing.assert_close(out["loss"].detach(), (view_loss + region_loss) / 2)


def test_view_loss_alone_builds_no_region_heads():
    model = build_esvit("swinv2_tiny", out_dim=32, hidden_dim=32, bottleneck_dim=8, region_loss=False, **TINY)
    model.centers = Centers({"head": 32}, 0.9, torch.device("cpu"))
    out = model(*crops(local=1))
    assert set(model.student) == {"encoder", "head"} and "esvit/region_loss" not in out
    torch.testing.assert_close(out["loss"], out["esvit/view_loss"])


def test_checkpointed_blocks_recompute_at_the_size_of_their_forward():
    """Backward recomputes the global pass after the student moved to the local size: gradients must not change."""
    views = crops()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_esvit()
        model.set_grad_checkpointing(checkpointing)
        model(*views)["loss"].backward()
        grads.append({n: p.grad for n, p in model.student.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_switching_sizes_back_and_forth_gives_the_same_encoder():
    torch.manual_seed(0)
    encoder = tiny_esvit().encoder.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = encoder.forward_tokens(x)
        encoder.set_input_size(32, 4)
        encoder.forward_tokens(torch.randn(2, 3, 32, 32))
        encoder.set_input_size(64, 4)
        assert torch.equal(encoder.forward_tokens(x), before)


def demo_task(total_steps: int, *overrides: str) -> EsViTTask:
    cfg = load_config("configs/pretrain/demo_esvit.yaml", list(overrides))
    task = EsViTTask(cfg, SimpleNamespace(device=torch.device("cpu")))
    task.total_steps = total_steps
    return task


def test_teacher_temperature_warms_up_over_its_epochs_in_steps():
    task = demo_task(96, "esvit.warmup_teacher_temp_epochs=0.5")  # 48 steps per epoch: 24 warmup steps
    assert task.teacher_temp(0) == pytest.approx(0.04)
    assert task.teacher_temp(12) == pytest.approx(0.055)
    assert task.teacher_temp(24) == task.teacher_temp(90) == pytest.approx(0.07)


def test_prototypes_of_both_heads_are_frozen_groups_with_the_usual_decay():
    task = demo_task(96, "esvit.freeze_last_layer_epochs=0.25")
    model = tiny_esvit()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = task.param_groups(model)
    frozen = sorted(names[id(p)] for g in groups if "frozen_steps" in g for p in g["params"])
    assert frozen == ["dense_head.prototypes", "dense_head.scale", "head.prototypes", "head.scale"]
    assert all(g["frozen_steps"] == 12 for g in groups if "frozen_steps" in g)
    decays = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert decays["head.prototypes"] == decays["encoder.layers.0.blocks.0.mlp.fc1.weight"] > 0
    assert decays["head.mlp.0.bias"] == decays["encoder.layers.0.blocks.0.attn.logit_scale"] == 0
    assert len(decays) == sum(p.requires_grad for p in model.parameters())  # no teacher, nothing twice


# ---- one 2-rank ZeRO-3 launch


def _rank_states(out, step: int) -> list[dict]:
    tag = out / "checkpoints" / f"step_{step:08d}"
    return [torch.load(tag / f"trainer_rank{r:05d}.pt", weights_only=True)["task"] for r in range(2)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("esvit")
    out = root / "z3"
    stdout = run_torchrun("run_pretrain.py", *ARGS, f"output_dir={out}", timeout=600).stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = {step: consolidate(out / "checkpoints" / f"step_{step:08d}")["model"] for step in range(1, STEPS + 1)}
    return out, stdout, metrics, weights


@pytest.fixture(scope="module")
def zero2_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("esvit_z2") / "z2"
    stdout = run_torchrun("run_pretrain.py", *ARGS, "--ds_config", "ds_configs/zero2.json", "checkpoint.every_steps=0",
                          f"output_dir={out}", timeout=600).stdout
    assert "ZeRO stage 2" in stdout
    return [json.loads(line)["loss/train"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_loss_falls_once_the_centre_is_set(run):
    _, stdout, metrics, _ = run
    losses = [m["loss/train"] for m in metrics]
    assert "ZeRO stage 3" in stdout and "global batch 16" in stdout and len(losses) == STEPS
    # step 1's teacher is not yet centred (the centre starts at 0, as DINO's): from step 2 on
    assert sum(losses[-2:]) < sum(losses[1:3]) - 0.2, losses
    assert all(m["esvit/teacher_temp"] == 0.07 and m["esvit/region_loss"] > 0 for m in metrics)


@pytest.mark.distributed
def test_zero_stages_2_and_3_give_the_same_losses(run, zero2_losses):
    _, _, metrics, _ = run
    torch.testing.assert_close(torch.tensor(zero2_losses), torch.tensor([m["loss/train"] for m in metrics]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_centres_are_fp32_and_identical_on_every_rank(run):
    out, *_ = run
    previous = None
    for step in range(1, STEPS + 1):
        rank0, rank1 = (state["centers"] for state in _rank_states(out, step))
        assert rank0.keys() == {"head", "dense_head"}
        for name in rank0:
            assert rank0[name].dtype == torch.float32 and torch.equal(rank0[name], rank1[name])
        assert previous is None or not torch.equal(previous, rank0["head"])  # they move with the batches
        previous = rank0["head"]


@pytest.mark.distributed
def test_teacher_is_the_ema_of_the_student_and_gets_no_gradient(run):
    out, _, _, weights = run
    for step in range(2, STEPS + 1):
        before, after = weights[step - 1], weights[step]
        momentum = _rank_states(out, step)[0]["momentum"]
        assert momentum == pytest.approx(cosine_momentum(MOMENTUM, step, STEPS))
        teacher_keys = [k for k in after if k.startswith("teacher.")]
        assert len(teacher_keys) > 50
        for key in teacher_keys:  # an optimizer update of the teacher would break this
            expected = momentum * before[key] + (1 - momentum) * after[key.removeprefix("teacher.")]
            torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-6, msg=key)


@pytest.mark.distributed
def test_prototypes_train_only_after_their_frozen_steps(run):
    _, _, _, weights = run
    for name in ("head.prototypes", "head.scale", "dense_head.prototypes", "dense_head.scale"):
        assert all(torch.equal(weights[step][name], weights[1][name]) for step in range(2, FROZEN_STEPS + 1)), name
        assert not torch.equal(weights[FROZEN_STEPS + 1][name], weights[FROZEN_STEPS][name]), name
    assert not torch.equal(weights[2]["head.mlp.0.weight"], weights[1]["head.mlp.0.weight"])
