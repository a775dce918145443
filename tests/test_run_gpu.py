"""benchmarks/run_gpu.py starts cleanly: its --dry-run runs every GPU case's code on the CPU (tiny shapes).

One dry run of every part (module fixture, ~2-3 min on 2 busy cores: one process, DeepSpeed on the CPU
accelerator, torch.compile through dynamo's "eager" backend), then checks on what it printed and wrote.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import run_gpu  # noqa: E402

KEYS = {"case", "part", "kind", "impl", "status", "wall_s", "device", "step_s", "images_per_s", "mfu_pct",
        "peak_alloc_gib", "peak_reserved_gib", "estimate_gib", "estimate_over_alloc", "speedup_vs", "targets",
        "note", "error"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_gpu")
    results = out / "RESULTS_dry.md"
    results.write_text("# existing results\n")  # the table is appended, not written over
    proc = subprocess.run([sys.executable, "benchmarks/run_gpu.py", "--dry-run", "--part", "all", "--results",
                           str(results)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, printed, results


def test_dry_run_reports_every_case(dry_run):
    proc, printed, results = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["case"] for r in printed] == [c.name for c in run_gpu.CASES]
    for r in printed:
        assert KEYS <= set(r), (r["case"], KEYS - set(r))
        assert r["status"] in ("ok", "skipped", "error", "oom", "timeout"), r
        if r["status"] == "ok":
            assert r["step_s"] > 0 and r["images_per_s"] > 0, r
            assert r["mfu_pct"] is None  # no peak FLOP/s on a CPU
    text = results.read_text()
    assert text.startswith("# existing results\n")
    assert "DRY RUN" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    assert [row.split(" | ")[0][2:] for row in rows] == [c.name for c in run_gpu.CASES]
    saved = results.with_suffix(".jsonl").read_text().splitlines()
    assert len(saved) == len(run_gpu.CASES)


def test_dry_run_has_no_failing_case(dry_run):
    """A case that fails here would fail on the GPU too: fix it before spending device minutes."""
    _, printed, _ = dry_run
    failed = {r["case"]: r["error"] for r in printed if r["status"] not in ("ok", "skipped")}
    assert not failed, failed
    skipped = {r["case"] for r in printed if r["status"] == "skipped"}
    assert skipped == {c.name for c in run_gpu.CASES if c.backend == "flex"}  # no flex backward on the CPU


def test_comparisons_and_targets_are_filled(dry_run):
    _, printed, _ = dry_run
    by_name = {r["case"]: r for r in printed}
    ours = by_name["model_base_192w12_ours"]
    assert set(ours["speedup_vs"]) == {"model_base_192w12_timm"}
    trainer = by_name["trainer_giant_ours_eager"]
    assert [t["target"] for t in trainer["targets"]] == ["MFU >= 40%", "estimate within 15% of peak allocated"]
    assert all(t["met"] is None for t in trainer["targets"])  # nothing to judge on a CPU
    assert trainer["estimate_gib"] > 0


def test_from_jsonl_rebuilds_the_table(dry_run, tmp_path):
    _, _, results = dry_run
    combined = tmp_path / "combined.md"
    proc = subprocess.run([sys.executable, "benchmarks/run_gpu.py", "--from-jsonl", str(results.with_suffix(".jsonl")),
                           "--results", str(combined)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in combined.read_text().splitlines() if line.startswith("| ") and "| case |" not in line]
    assert len(rows) == len(run_gpu.CASES)


def test_parts_fit_a_device_call():
    """Every part is planned within 480 s of one H100 (the call allows 600 s; the runner stops at 540)."""
    names = [c.name for c in run_gpu.CASES]
    assert len(names) == len(set(names))
    for part in run_gpu.PARTS:
        assert sum(c.est_s for c in run_gpu.CASES if c.part == part) <= 480, part
    for c in run_gpu.CASES:
        assert set(c.baselines) <= set(names), c.name
        assert set(c.targets) <= set(run_gpu.TARGETS), c.name
    kinds = {(c.kind, c.model) for c in run_gpu.CASES}
    for model in ("swinv2_base", "swinv2_large", "swinv2_giant"):
        assert {(c.impl, c.compile) for c in run_gpu.CASES if c.kind == "trainer" and c.model == model} == \
            {("ours", False), ("ours", True), ("timm", False), ("timm", True)}
    assert ("finetune", "swinv2_giant") in kinds and ("finetune", "swinv2_tiny") in kinds


def test_help_says_how_to_run_on_the_device(capsys):
    with pytest.raises(SystemExit):
        run_gpu.main(["--help"])
    text = capsys.readouterr().out
    assert "wheels.sh" in text and "--target /tmp/site" in text and "$OUT/RESULTS_part1.md" in text
