"""scale.evaluate: the k-NN vote and the linear probe against references, and the CLI on an export file."""
import json
import subprocess
import sys

import pytest
import torch

from models.backbones import build_backbone
from scale.evaluate import knn_scores, linear_probe_scores, topk_accuracy
from tests.distributed import REPO_ROOT, job_env

TINY = dict(img_size=32, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4)


def test_knn_vote_equals_a_brute_force_reference():
    torch.manual_seed(0)
    train, labels, test = torch.randn(50, 6), torch.randint(0, 4, (50,)), torch.randn(7, 6)
    scores = knn_scores(train, labels, test, num_classes=4, k=5, temperature=0.1, chunk=3)
    for i, query in enumerate(test):
        similarity = [float(torch.cosine_similarity(query, t, dim=0)) for t in train]
        nearest = sorted(range(50), key=lambda j: -similarity[j])[:5]
        expected = torch.zeros(4)
        for j in nearest:
            expected[labels[j]] += torch.tensor(similarity[j] / 0.1).exp()
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-4)


def test_topk_accuracy_counts_hits():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    result = topk_accuracy(scores, torch.tensor([0, 1, 2]))
    assert result["top1"] == pytest.approx(100 / 3) and result["top5"] == 100.0


def test_linear_probe_separates_what_is_linearly_separable():
    torch.manual_seed(0)
    centres = torch.randn(3, 10) * 4
    labels = torch.randint(0, 3, (300,))
    features = centres[labels] + torch.randn(300, 10)
    scores = linear_probe_scores(features[:200], labels[:200], features[200:], num_classes=3, epochs=20)
    assert topk_accuracy(scores, labels[200:])["top1"] > 95.0


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scale.evaluate", *args, "--workers", "1"], cwd=REPO_ROOT,
                          env=job_env(), capture_output=True, text=True, timeout=600)


def test_cli_on_an_export_file_with_its_random_init_baseline(tmp_path):
    torch.manual_seed(1)
    encoder = build_backbone("swinv2_tiny", **TINY)
    file = tmp_path / "export.pt"
    # the shape `python -m scale.export RUN OUT.pt` writes for a MoBY run
    torch.save({"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "model_args": {"name": "swinv2_tiny", **TINY, "patch_size": 4, "drop_path_rate": 0.1, "kind": "moby",
                               "feature_prefix": "encoder."}, "config": {}, "step": 7}, file)
    trained, untrained = (_evaluate("knn", str(file), *extra) for extra in ((), ("--random-init",)))
    assert trained.returncode == 0 and untrained.returncode == 0, trained.stderr[-2000:] + untrained.stderr[-2000:]
    a, b = json.loads(trained.stdout), json.loads(untrained.stdout)  # stdout is the one JSON object
    assert a["method"] == "moby" and a["step"] == 7 and a["weights"] == "encoder." and b["random_init"] is True
    assert (a["train_samples"], a["val_samples"], a["feature_dim"]) == (3072, 768, 64)
    assert 0 <= a["top1"] <= a["top5"] <= 100
    # the same weights are evaluated through the file, other weights without it
    assert a["top1"] != b["top1"] or a["top5"] != b["top5"]


@pytest.mark.parametrize("args, message", [
    (("knn", "/nonexistent/run"), "does not exist"),
    (("kmeans", "{file}"), "protocol 'kmeans' is not one of knn, linear"),
    (("knn", "{file}", "--k", "0"), "--k must be >= 1"),
    (("knn", "{notexport}"), "has no model/model_args"),
    (("knn", "{garbage}"), "cannot read"),
    (("knn", "{file}", "--data", "/nonexistent/shards"), "--data /nonexistent/shards does not exist"),
    (("knn", "{emptydir}"), "no complete checkpoint"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    paths = {"file": tmp_path / "e.pt", "notexport": tmp_path / "n.pt", "garbage": tmp_path / "g.pt",
             "emptydir": tmp_path / "empty"}
    torch.save({"model": {}, "model_args": {"name": "swinv2_tiny"}}, paths["file"])
    torch.save({"weights": 1}, paths["notexport"])
    paths["garbage"].write_bytes(b"not a checkpoint")
    paths["emptydir"].mkdir()
    proc = _evaluate(*(a.format(**paths) for a in args))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
