"""Every entry point answers bad input with one line naming the problem and the fix, a non-zero exit,
no traceback and no output folder.

Each case is one process without a launcher (all of them fail before or at distributed init, in a second):
the first case of each entry point a plain `python <entry point> ...`, the others forks of tests/fork_runner.py,
which imports torch and the trainer once for all of them (each case is still its own process, with its own
argv, environment, output and exit code). Two cases also run under the deepspeed launcher on 2 ranks, where the
line must appear once (rank 0 only).
"""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO_ROOT, free_port

TINY = ["model.img_size=32", "train.micro_batch_size=4", "data.num_workers=0", "train.max_steps=1"]


class Payload:
    """Unpickling this runs code: creates the file named in it (what a hostile trainer_rank file would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fake_checkpoint(root: Path, trainer_file: bytes | None = None, payload: Path | None = None,
                     model: dict | None = None) -> Path:
    """A step folder marked COMPLETE whose trainer file is garbage or a code-running pickle, or (`model`) a
    sound trainer file in a checkpoint of that model config."""
    tag = root / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"step": 3, "model_args": {}, "config": {"model": model or {}},
                                               "world_size": 1}))
    if model is not None:
        torch.save({"rng": {}, "loader": None, "task": {}}, tag / "trainer_rank00000.pt")
    elif payload is not None:
        torch.save({"rng": Payload(str(payload)), "loader": None, "task": {}}, tag / "trainer_rank00000.pt")
    else:
        (tag / "trainer_rank00000.pt").write_bytes(trainer_file or b"not a torch file")
    (tag / "COMPLETE").write_text("3\n")
    return root


PRE = ["run_pretrain.py", *TINY, "output_dir={out}"]
FIN = ["run_finetune.py", "output_dir={out}", "data.num_workers=0"]
# name -> (argv after `python`, with {tmp} for the fixture's folder; a word the error line must contain)
CASES = {
    "data_missing": ([*PRE, "data.path={tmp}/nope"], "data.path"),
    "data_empty_folder": ([*PRE, "data.path={tmp}/empty"], "data.path"),
    "data_nothing_readable": ([*PRE, "data.path={tmp}/junk_shards"], "shard"),
    "data_is_a_file": ([*PRE, "data.path={tmp}/a_file"], "data.path"),
    "yaml_malformed": ([*PRE, "--config", "{tmp}/bad.yaml"], "bad.yaml"),
    "config_is_folder": ([*PRE, "--config", "{tmp}"], "--config"),
    "config_missing": ([*PRE, "--config", "{tmp}/nope.yaml"], "nope.yaml"),
    "unknown_key": ([*PRE, "train.micro_batchsize=4"], "micro_batchsize"),
    "unknown_section": ([*PRE, "trian.max_steps=4"], "trian"),
    "override_without_equals": ([*PRE, "train.max_steps"], "train.max_steps"),
    "wrong_type": ([*PRE, "train.max_steps=many"], "train.max_steps"),
    "lr_negative": ([*PRE, "optim.lr=-1"], "optim.lr"),
    "mask_ratio_out_of_range": ([*PRE, "simmim.mask_ratio=1.5"], "mask_ratio"),
    "esvit_local_crops_negative": ([*PRE, "--config", "configs/pretrain/demo_esvit.yaml", "esvit.local_crops=-1"],
                                   "esvit.local_crops"),
    "esvit_local_size_off_stride": ([*PRE, "--config", "configs/pretrain/demo_esvit.yaml",
                                     "esvit.local_crops_size=40"], "local_crops_size"),
    "sit_drop_perc_out_of_range": ([*PRE, "method.name=sit", "sit.drop_perc=2"], "drop_perc"),
    "sit_drop_align_off_the_patch_grid": ([*PRE, "method.name=sit", "sit.drop_align=6"], "drop_align"),
    "batch_zero": ([*PRE, "train.micro_batch_size=0"], "micro_batch_size"),
    "img_size_not_divisible": ([*PRE, "model.img_size=30"], "img_size"),
    "patch_not_dividing": ([*PRE, "model.patch_size=5"], "patch_size"),
    "stages_mismatch": ([*PRE, "model.num_heads=[1,2]"], "num_heads"),
    "ds_config_missing": ([*PRE, "--ds_config", "{tmp}/nope.json"], "nope.json"),
    "ds_config_malformed": ([*PRE, "--ds_config", "{tmp}/bad.json"], "bad.json"),
    "ds_config_contradicts_yaml": ([*PRE, "--ds_config", "{tmp}/contradicts.json"], "train_batch_size"),
    "resume_missing": ([*PRE, "resume={tmp}/nope"], "resume"),
    "resume_no_checkpoint_there": ([*PRE, "resume={tmp}/empty"], "checkpoint"),
    "resume_corrupt": ([*PRE, "resume={tmp}/garbage_run"], "damaged"),
    "resume_hostile_pickle": ([*PRE, "resume={tmp}/hostile_run"], "refused"),
    "resume_other_model_size": ([*PRE, "resume={tmp}/base_run"], "model.embed_dim"),
    "output_dir_unwritable": ([*PRE, "output_dir={tmp}/a_file/out"], "output_dir"),
    "port_in_use": (PRE, "MASTER_PORT"),
    "pretrained_missing": ([*FIN, "--pretrained", "{tmp}/nope.pt"], "--pretrained"),
    "pretrained_corrupt": ([*FIN, "--pretrained", "{tmp}/garbage.pt"], "--pretrained"),
    "export_missing": (["-m", "scale.export", "{tmp}/nope", "{out}"], "nope"),
    "export_bad_format": (["-m", "scale.export", "{tmp}/garbage_run", "{out}", "--format", "onnx"], "--format"),
    "export_corrupt": (["-m", "scale.export", "{tmp}/garbage_run", "{out}"], "damaged"),
    "write_shards_src_missing": (["-m", "data.write_shards", "{tmp}/nope", "{out}"], "nope"),
    "write_shards_bad_size": (["-m", "data.write_shards", "{tmp}/empty", "{out}", "--shard-size", "0"],
                              "--shard-size"),
    "check_shards_missing": (["-m", "data.check_shards", "{tmp}/nope"], "nope"),
    "check_shards_empty_folder": (["-m", "data.check_shards", "{tmp}/empty"], "shards"),
    "check_shards_bad_classes": (["-m", "data.check_shards", "{tmp}/junk_shards", "--num-classes", "0"],
                                 "--num-classes"),
}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """The files the cases point at."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "junk_shards").mkdir()
    (tmp / "junk_shards" / "train-000000.tar").write_bytes(b"this is not a tar archive\n" * 40)
    (tmp / "bad.yaml").write_text("model: {name: [unclosed\n")
    (tmp / "bad.json").write_text('{"zero_optimization": ')
    (tmp / "a_file").write_text("x")
    (tmp / "contradicts.json").write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "train_batch_size": 999}')
    (tmp / "garbage.pt").write_bytes(b"\x80\x02garbage")
    _fake_checkpoint(tmp / "garbage_run")
    _fake_checkpoint(tmp / "hostile_run", payload=tmp / "PWNED")
    # the demo is a cut-down swinv2_tiny (embed_dim 32): a checkpoint of another width cannot load into it
    _fake_checkpoint(tmp / "base_run", model={"name": "swinv2_tiny", "patch_size": 4, "embed_dim": 128,
                                              "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]})
    return tmp


def _env(extra: dict | None = None) -> dict:
    """One process, as a user would start it: no launcher variables from the test runner."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **(extra or {})}


def _check(proc: subprocess.CompletedProcess, word: str, out: Path) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    hits = [line for line in text.splitlines() if word in line and "error" in line.lower()]
    assert len(hits) == 1, f"want one error line naming {word!r}:\n{text[-3000:]}"
    assert not out.exists(), f"{out} was created by a run that never started"
    return hits[0]


# the first case of each entry point: started as a user starts it, with every import of its own
PLAIN = ["data_missing", "pretrained_missing", "export_missing", "write_shards_src_missing", "check_shards_missing"]


def _command(tmp: Path, name: str, taken_port: int) -> tuple[list[str], dict]:
    """(argv after `python`, environment) of a case."""
    argv, _ = CASES[name]
    extra = None
    if name == "port_in_use":  # a one-process run told to use a port something listens on
        extra = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(taken_port)}
    return [a.format(tmp=tmp, out=tmp / f"out_{name}") for a in argv], _env(extra)


def _run_forked(commands: list[tuple[list[str], dict]]) -> list[subprocess.CompletedProcess]:
    cases = [{"argv": argv, "env": env, "cwd": str(REPO_ROOT)} for argv, env in commands]
    runner = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "fork_runner.py")], input=json.dumps(cases),
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert runner.returncode == 0, runner.stderr[-3000:]
    return [subprocess.CompletedProcess(c["argv"], a["returncode"], a["stdout"], a["stderr"])
            for c, a in zip(cases, json.loads(runner.stdout))]


@pytest.fixture(scope="module")
def answers(tmp, request):
    """name -> finished process of every selected case. The plain ones two at a time: each spends its
    seconds in single-threaded imports, so the pair takes the time of one on 2 cores."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_bad_input_gives_one_line_and_no_output"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        commands = {name: _command(tmp, name, taken.getsockname()[1]) for name in selected}
        plain = [name for name in selected if name in PLAIN]
        forked = [name for name in selected if name not in PLAIN]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            done = pool.map(lambda name: subprocess.run([sys.executable, *commands[name][0]], cwd=REPO_ROOT,
                                                        env=commands[name][1], capture_output=True, text=True,
                                                        timeout=120), plain)
            answers = dict(zip(plain, done))
        answers.update(zip(forked, _run_forked([commands[name] for name in forked])) if forked else [])
        return answers


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_no_output(tmp, answers, name):
    _check(answers[name], CASES[name][1], tmp / f"out_{name}")
    assert not (tmp / "PWNED").exists(), "unpickling a trainer file ran its payload"


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["lr_negative", "resume_hostile_pickle"])
def test_two_ranks_print_the_line_once(tmp, name):
    argv, word = CASES[name]
    out = tmp / f"out_2ranks_{name}"
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                           *(a.format(tmp=tmp, out=out) for a in argv)], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    # the launcher adds its own line about the failed rank; ours must still be there exactly once
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in text, text[-3000:]
    assert sum(word in line and "error" in line for line in text.splitlines()) == 1, text[-3000:]
    assert not out.exists()
