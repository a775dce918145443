"""`python -m scale.export`: --format ours|timm, one-line errors, and a real 2-rank checkpoint exported both ways."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

import models
from scale.checkpoint import COMPLETE, tag_for
from scale.config import ConfigError, load_config
from scale.export import main, to_timm
from scale.tasks import build_task
from tests.distributed import REPO_ROOT, run_torchrun
from tests.test_models import TINY, perturb_


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_errors_are_one_line_and_name_the_fix(tmp_path, capsys):
    out = str(tmp_path / "out.pt")
    assert "not one of ours, timm" in _error_line(capsys, [str(tmp_path), out, "--format", "onnx"])
    assert "does not exist: pass a run's output dir" in _error_line(capsys, [str(tmp_path / "nowhere"), out])
    (tmp_path / "checkpoints" / tag_for(3)).mkdir(parents=True)  # a save that never finished
    assert "no complete checkpoint" in _error_line(capsys, [str(tmp_path), out])
    (tmp_path / "checkpoints" / tag_for(3) / COMPLETE).write_text("3\n")
    assert "damaged; pass an older step_* folder" in _error_line(capsys, [str(tmp_path), out])  # no meta.json
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "writable folder" in _error_line(capsys, [str(tmp_path), str(blocker / "out.pt")])
    assert "is a directory" in _error_line(capsys, [str(tmp_path), str(tmp_path)])
    assert not (tmp_path / "out.pt").exists()


def test_cli_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(tmp_path / "nowhere"), str(tmp_path / "o.pt"),
                           "--format", "timm"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def _classifier_export(model: torch.nn.Module, name: str = "swinv2_tiny") -> dict:
    """What `consolidate` returns for a fine-tuning run: the task holds the classifier as `encoder`."""
    model_args = {"name": name, "kind": "classifier", "img_size": 64, "window_size": 8, "num_classes": 7,
                  "pretrained_window_sizes": [4, 4, 4, 2], "drop_path_rate": 0.1,
                  **{k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate")}}
    return {"model": {f"encoder.{k}": v for k, v in model.state_dict().items()}, "model_args": model_args,
            "config": {}, "step": 5}


def test_classifier_run_converts_for_timm():
    model = perturb_(models.build_model("swinv2_tiny", img_size=64, window_size=8,
                                        pretrained_window_sizes=(4, 4, 4, 2), **TINY)).eval()
    state, timm_args, notes = to_timm(_classifier_export(model))
    assert notes == [] and timm_args["num_classes"] == 7 and timm_args["pretrained_window_sizes"] == (4, 4, 4, 2)
    twin = TimmSwinV2(**timm_args).eval()
    twin.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), atol=1e-5, rtol=0)

    other = models.build_model("swinv2_tiny", img_size=64, window_size=8, **{**TINY, "embed_dim": 32})
    with pytest.raises(ConfigError, match="do not match its meta.json model_args"):
        to_timm(_classifier_export(other))
    main_norms = models.build_model("swinv2_tiny", img_size=64, window_size=8, main_norm_every=1, **TINY)
    exported = _classifier_export(main_norms)
    exported["model_args"]["main_norm_every"] = 1
    with pytest.raises(ConfigError, match="main-branch LayerNorm.*--format ours"):
        to_timm(exported)
    exported = _classifier_export(model, name="swinv3_tiny")
    with pytest.raises(ConfigError, match="unknown model 'swinv3_tiny'"):
        to_timm(exported)


TINY_SSL = ["model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,2,2]", "model.drop_path_rate=0.0"]


@pytest.mark.parametrize("method, overrides", [
    ("moby", TINY_SSL), ("esvit", TINY_SSL),
    ("sit", ["model.name=deit_tiny_patch16_224", "model.embed_dim=null", "model.img_size=32"])])
def test_self_supervised_run_exports_the_backbone_its_evaluation_reads(method, overrides):
    """MoBY's online encoder, EsViT's teacher encoder (built apart, so its weights differ), a DeiT for timm."""
    import timm

    cfg = load_config(f"configs/pretrain/demo_{method}.yaml", overrides)
    task = build_task(method, cfg, SimpleNamespace(device=torch.device("cpu")), log=lambda _: None)
    module = task.build_method().eval()
    exported = {"model": module.state_dict(), "model_args": task.model_args(), "config": {}, "step": 3}
    state, timm_args, notes = to_timm(exported)
    vit = "model_name" in timm_args
    twin = (timm.create_model(**timm_args) if vit else TimmSwinV2(**timm_args)).eval()
    twin.load_state_dict(state, strict=True)
    backbone = module.teacher["encoder"] if method == "esvit" else module.encoder
    x = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), backbone(x), atol=1e-5, rtol=0)
        if method == "esvit":
            assert not torch.allclose(twin(x), module.encoder(x))


# a 2-rank SimMIM pretraining run of one step on a tiny SwinV2; no data.* / simmim.* keys (their names are moving)
RUN = ["model.img_size=32", "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]",
       "model.window_size=4", "model.drop_path_rate=0.0", "train.micro_batch_size=4", "data.num_workers=0",
       "train.max_steps=1", "log.image_every_steps=100", "resume=none", "seed=5"]


def _export(run, out, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "scale.export", str(run), str(out), *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.distributed
def test_pretrain_checkpoint_exports_to_timm_with_the_same_features(tmp_path):
    run = tmp_path / "run"
    run_torchrun("run_pretrain.py", "--ds_config", "ds_configs/zero3.json", *RUN, f"output_dir={run}", timeout=600)
    _export(run, tmp_path / "ours.pt")
    stdout = _export(run, tmp_path / "timm.pt", "--format", "timm")
    assert "timm.models.swin_transformer_v2.SwinTransformerV2(" in stdout

    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert set(ours) == {"model", "model_args", "config", "step"} and ours["step"] == 1
    args = {k: v for k, v in ours["model_args"].items() if k not in ("name", "norm_target_patch_size")}
    encoder = models.build_model(ours["model_args"]["name"], **{**args, "num_classes": 0}).eval()
    assert models.load_pretrained(encoder, tmp_path / "ours.pt").missing_keys == []

    timm_state = torch.load(tmp_path / "timm.pt", weights_only=True)
    assert not any(k.startswith(("encoder.", "mask_token", "decoder.", "head.")) for k in timm_state)
    twin = TimmSwinV2(**models.timm_model_args(encoder)).eval()
    twin.load_state_dict(timm_state, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), encoder.forward_features(x), atol=1e-5, rtol=0)
