"""python -m scale.estimate: the JSON it prints, the SwinV2 paper's A100-40G account, one-line refusals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scale.estimate import main, parse_bytes
from scale.memory import estimate_memory

REPO = Path(__file__).resolve().parents[1]
KEYS = {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "buffers_bytes", "total_bytes",
        "fits", "max_micro_batch", "flops_per_image"}
# the paper's SwinV2-G setting: 1536x1536, window 32, batch 1, bf16, ZeRO-1 over 8 A100-40G
PAPER = ["--model", "swinv2_giant", "--img-size", "1536", "--window", "32", "--micro-batch", "1", "--zero", "1",
         "--gpus", "8", "--attn", "sequential", "--precision", "bf16", "--gpu-mem", "40536MiB"]


def run(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_prints_one_json_object_with_the_issue_keys():
    proc = subprocess.run([sys.executable, "-m", "scale.estimate", "--model", "swinv2_tiny", "--img-size", "256",
                           "--window", "16", "--micro-batch", "8", "--zero", "3", "--gpus", "64"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert KEYS <= out.keys()
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "buffers_bytes", "runtime_bytes")
    assert out["total_bytes"] == sum(out[k] for k in parts)
    assert out["fits"] and out["max_micro_batch"] >= 8 and out["flops_per_image"] > 0


def test_agrees_with_the_swinv2_paper_on_an_a100_40g(capsys):
    with_checkpointing = run(PAPER + ["--checkpointing"], capsys)
    without = run(PAPER, capsys)
    assert with_checkpointing["fits"] and with_checkpointing["max_micro_batch"] >= 1
    assert not without["fits"] and without["max_micro_batch"] == 0
    assert without["activations_bytes"] > 4 * with_checkpointing["activations_bytes"]


def test_matches_the_library_and_follows_its_options(capsys):
    argv = ["--model", "swinv2_base", "--img-size", "192", "--window", "12", "--micro-batch", "4", "--zero", "3",
            "--gpus", "2", "--offload", "cpu", "--task", "simmim"]
    out = run(argv, capsys)
    plan = estimate_memory({"name": "swinv2_base"}, img_size=192, window_size=12, micro_batch=4, zero_stage=3,
                           world_size=2, offload="cpu", task="simmim", precision="bf16", device_type="cuda")
    assert {k: out[k] for k in plan.to_dict()} == plan.to_dict()
    assert out["optimizer_bytes"] == 0  # offloaded
    assert run(argv[:-4], capsys)["optimizer_bytes"] > 0


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "swinv2_gaint"], "--model swinv2_gaint is not one of"),
    (["--zero", "4"], "--zero 4 is not one of 0, 1, 2, 3"),
    (["--img-size", "100"], "--img-size 100 must be a multiple of 32"),
    (["--micro-batch", "0"], "--micro-batch 0 must be at least 1"),
    (["--offload", "disk"], "--offload disk is not one of none, cpu, nvme"),
    (["--offload", "cpu", "--zero", "0"], "--offload needs ZeRO"),
    (["--gpu-mem", "eighty"], "--gpu-mem 'eighty' is not a memory size"),
    (["--attn", "flash"], "--attn flash is not one of"),
])
def test_bad_arguments_fail_in_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and fragment in captured.err
    assert captured.err.count("\n") == 1


def test_memory_sizes_parse_as_gpus_quote_them():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("40536MiB") == 40536 * 2 ** 20
    assert parse_bytes("1.5 TB") == int(1.5 * 2 ** 40)
    assert parse_bytes("1000") == 1000
