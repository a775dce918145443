"""SiT v3: GMML corruption, the loss on one process, and demo_sit on 2 real CPU ranks under ZeRO-3.

Three launches (module fixtures): demo_sit with 8 images per rank for 24 steps, and 2 steps of it on a
timm ViT under ZeRO-3 and ZeRO-2. SiT's losses are noisy from step to step (fresh crops, colour distortion and corruption
masks every batch) and fall slowly, so the first run is longer than the other methods' and compares
the means of its first and last quarters.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data.views import CorruptedViewsTransform, block_corruption_mask
from models.sit import build_sit, corrupt, masked_l1
from tests.distributed import run_torchrun

STEPS = 24
TINY_SWIN = {"img_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4,
             "drop_path_rate": 0.0}


def _launch(out, *extra: str, stage: int = 3) -> str:
    return run_torchrun("run_pretrain.py", "--config", "configs/pretrain/demo_sit.yaml", "--ds_config",
                        f"ds_configs/zero{stage}.json", "data.num_workers=0", "log.every_steps=1", "checkpoint.every_steps=0",
                        "seed=3", f"output_dir={out}", "resume=none", *extra, timeout=600).stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sit") / "z3"
    return out, _launch(out, "train.micro_batch_size=8", "optim.lr=0.05", "schedule.warmup_epochs=0",
                        f"train.max_steps={STEPS}")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sit_vit")
    args = ["model.name=deit_tiny_patch16_224", "model.embed_dim=null", "model.img_size=32", "sit.drop_align=1",
            "train.micro_batch_size=2", "train.max_steps=2"]
    stdout = {stage: _launch(root / f"z{stage}", *args, stage=stage) for stage in (3, 2)}
    return root, stdout


def _batch(transform: CorruptedViewsTransform, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The module's inputs for `n` transformed images of random colour blocks."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        torch.manual_seed(seed + i)
        cells = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        samples.append(transform(Image.fromarray(np.kron(cells, np.ones((24, 24, 1), dtype=np.uint8)))))
    stack = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (transform.mean, transform.std))
    views = [(stack[k] / 255 - mean) / std for k in ("view0", "view1")]
    return (*views, stack["corrupt0"], stack["corrupt1"], stack["replace"])


@pytest.mark.parametrize("size, share, max_block, align", [(64, 0.5, 0.5, 16), (64, 0.3, 0.3, 8),
                                                           (256, 0.5, 0.3, 32), (96, 0.5, 0.3, 1)])
def test_block_corruption_covers_the_share_on_the_align_grid(size, share, max_block, align):
    cells = size // align
    longest = max(1, round(max_block * cells))
    for seed in range(100):
        mask = block_corruption_mask(size, share, max_block, align, np.random.default_rng(seed))
        assert mask.shape == (size, size) and mask.dtype == bool
        # at least the share, and no more than the last block could add
        assert share <= mask.mean() < share + (longest / cells) ** 2
        blocks = mask.reshape(cells, align, cells, align)
        assert (blocks == blocks[:, :1, :, :1]).all()  # every align x align cell all in or all out


def test_transform_gives_masks_of_the_configured_shares_and_replaces_half_the_images():
    transform = CorruptedViewsTransform(64, drop_perc=0.5, drop_max_block=0.5, drop_align=16, replace_prob=0.5,
                                        replace_perc=0.3)
    img = Image.new("RGB", (96, 96), (200, 40, 90))
    replaced = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = transform(img)
        assert out["view0"].shape == out["view1"].shape == (3, 64, 64) and out["view0"].dtype == torch.uint8
        share = transform.replace_perc if out["replace"] else transform.drop_perc
        for key in ("corrupt0", "corrupt1"):
            assert out[key].shape == (64, 64) and out[key].dtype == torch.uint8
            assert out[key].float().mean() >= share
        replaced += out["replace"]
    assert 0.4 <= replaced / 200 <= 0.6
    torch.manual_seed(7)
    first = transform(img)
    torch.manual_seed(7)
    again = transform(img)  # the sample's seed decides the masks: a resumed run corrupts the same pixels
    assert all(torch.equal(first[k], again[k]) for k in ("corrupt0", "corrupt1"))
    assert first["replace"] == again["replace"]


def test_corruption_zero_fills_or_pastes_the_previous_image():
    images = torch.randn(3, 3, 8, 8)
    mask = torch.zeros(3, 8, 8, dtype=torch.uint8)
    mask[:, :4] = 1
    out = corrupt(images, mask, torch.tensor([0, 1, 0]))
    assert torch.equal(out[:, :, 4:], images[:, :, 4:])  # untouched where the mask is 0
    assert (out[0, :, :4] == 0).all() and (out[2, :, :4] == 0).all()
    assert torch.equal(out[1, :, :4], images[0, :, :4])


def test_reconstruction_counts_only_corrupted_pixels_and_contrast_follows_the_spec():
    torch.manual_seed(0)
    model = build_sit("swinv2_tiny", proj_dim=8, hidden_dim=16, recon_weight=2.0, decoder_depth=1, **TINY_SWIN)
    view0, view1, corrupt0, corrupt1, replace = _batch(CorruptedViewsTransform(64, drop_align=16), 4)
    seen = {}
    model.decoder.register_forward_hook(lambda m, args, out: seen.update(recon=out) or out.retain_grad())
    for name, embed in (("student", model.encoder.patch_embed), ("teacher", model.teacher["encoder"].patch_embed)):
        embed.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0]}))
    out = model(view0, view1, corrupt0, corrupt1, replace)
    out["loss"].backward()

    clean, masks = torch.cat([view0, view1]), torch.cat([corrupt0, corrupt1])
    corrupted = torch.cat([corrupt(view0, corrupt0, replace), corrupt(view1, corrupt1, replace)])
    assert torch.equal(seen["teacher"], clean) and torch.equal(seen["student"], corrupted)
    torch.testing.assert_close(out["sit/recon_loss"], masked_l1(seen["recon"], clean, masks))
    # d loss / d pixel: recon_weight * sign / (corrupted pixels * 3) where corrupted, exactly 0 elsewhere
    grad, inside = seen["recon"].grad, masks.unsqueeze(1).expand(-1, 3, -1, -1).bool()
    assert (grad[~inside] == 0).all()
    torch.testing.assert_close(grad[inside].abs(), torch.full_like(grad[inside], 2.0 / inside.sum().item()))

    with torch.no_grad():  # MoCo v3's loss from the spec: other view's keys, positives on the diagonal, x 2 tau
        q = F.normalize(model.projector(model.encoder(corrupted)), dim=-1).chunk(2)
        k = F.normalize(model.teacher["projector"](model.teacher["encoder"](clean)), dim=-1).chunk(2)
    tau, labels = model.temperature, torch.arange(4)
    expected = 2 * tau * (F.cross_entropy(q[0] @ k[1].T / tau, labels) + F.cross_entropy(q[1] @ k[0].T / tau, labels))
    torch.testing.assert_close(out["sit/contrastive_loss"], expected)
    torch.testing.assert_close(out["loss"].detach(), expected + 2.0 * out["sit/recon_loss"])
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.student.keys() == model.teacher.keys()


def test_vit_backbone_trains_in_process():
    torch.manual_seed(0)
    model = build_sit("vit_small_patch16_224", proj_dim=16, hidden_dim=32, img_size=64, drop_path_rate=0.1)
    model.teacher.load_state_dict(model.student.state_dict())  # what MomentumTeacher does at the start
    model.set_grad_checkpointing(True)
    assert model.decoder.stride == 16 and "pos_embed" in model.no_weight_decay()
    inputs = _batch(CorruptedViewsTransform(64, drop_align=1), 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):  # one batch over and over: the loss must fall
        loss = model(*inputs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    corrupted, recon = model.reconstruct(inputs[0], inputs[2], inputs[4])
    assert corrupted.shape == recon.shape == (8, 3, 64, 64)


@pytest.mark.distributed
def test_demo_trains_on_two_ranks_under_zero3_and_loss_falls(run):
    out, stdout = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/train"] for r in records]
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    quarter = STEPS // 4
    assert np.mean(losses[-quarter:]) < np.mean(losses[:quarter]), losses
    logged = {"sit/recon_loss", "sit/contrastive_loss", "sit/positive_similarity", "sit/teacher_momentum"}
    assert logged <= set(records[-1])
    assert "ZeRO stage 3" in stdout and "global batch 16" in stdout and "method sit" in stdout


@pytest.mark.distributed
def test_tensorboard_shows_clean_corrupted_and_reconstructed_views(run):
    out, _ = run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    image = acc.Images("sit/clean_corrupted_reconstruction")[-1]
    assert image.step == STEPS and image.width == 3 * 64 and image.height == 4 * 64  # 4 rows of 3 images


@pytest.mark.distributed
def test_vit_trains_and_draws_on_two_ranks_under_zero3(vit_run):
    """A ViT reads its class token and position embedding outside any module's forward: ZeRO-3 must gather them."""
    root, stdout = vit_run
    assert "model deit_tiny_patch16_224" in stdout[3] and "step 2/2" in stdout[3] and "ZeRO stage 3" in stdout[3]
    acc = EventAccumulator(str(root / "z3" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    image = acc.Images("sit/clean_corrupted_reconstruction")[-1]
    assert image.step == 2 and image.width == 3 * 32 and image.height == 2 * 32  # the 2 images of a micro-batch


@pytest.mark.distributed
def test_zero_stages_2_and_3_give_the_same_losses(vit_run):
    root, stdout = vit_run
    assert "ZeRO stage 2" in stdout[2]
    z3, z2 = ([json.loads(line)["loss/train"] for line in (root / f"z{stage}" / "metrics.jsonl").read_text().splitlines()]
              for stage in (3, 2))
    assert len(z3) == 2
    torch.testing.assert_close(torch.tensor(z2), torch.tensor(z3), rtol=1e-4, atol=1e-5)
