"""Run many short command lines of the entry points as forks of one process that imported the trainer once.

A test that checks 40 one-second answers (bad input) would otherwise spend ~4 CPU-s per case importing
torch, DeepSpeed, timm and this project. Here they are imported once, before any fork; each child is
still a process of its own: its argv, environment, working folder, stdout/stderr files and exit code,
the entry point run as `__main__` (as `python script.py` or `python -m module` would), Python's exit
handlers run at its end, an escaping exception printed as the interpreter prints it.

stdin: a JSON list of {"argv": [...after `python`], "env": {...}, "cwd": "..."};
stdout: a JSON list of {"returncode", "stdout", "stderr"}, in the same order. Two children run at a time.
"""
import atexit
import json
import os
import runpy
import sys
import tempfile
import threading
import traceback

import deepspeed  # noqa: F401  (imported for the children; nothing of it runs here)
import timm  # noqa: F401

import run_finetune  # noqa: F401
import run_pretrain  # noqa: F401

PARALLEL = 2


def _child(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """Become `python *argv` past its imports; never returns."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        if argv[0] == "-m":
            sys.argv = ["-m", *argv[2:]]  # run_module puts the module's file in argv[0], as `python -m` does
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:  # what the interpreter makes of sys.exit(x)
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  (printed as an uncaught exception is, and exit 1)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1, \
        "an import started a thread (torch does with OMP_NUM_THREADS > 1): start this runner with OMP_NUM_THREADS=1"
    cases = json.load(sys.stdin)
    folder = tempfile.mkdtemp(prefix="fork_runner_")
    files = [(os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")) for i in range(len(cases))]
    codes: dict[int, int] = {}
    running: dict[int, int] = {}  # pid -> case index
    for i, case in enumerate(cases):
        if len(running) == PARALLEL:
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(case["argv"], case["env"], case["cwd"], *files[i])
        running[pid] = i
    while running:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    answers = []
    for i, (out, err) in enumerate(files):
        with open(out, errors="replace") as o, open(err, errors="replace") as e:
            answers.append({"returncode": codes[i], "stdout": o.read(), "stderr": e.read()})
        os.remove(out)
        os.remove(err)
    os.rmdir(folder)
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
