"""Launcher environment mapping: SLURM variables -> what deepspeed.init_distributed reads."""
from scale.dist import _first_slurm_host, map_launcher_env


def test_slurm_is_mapped():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[03-04]"}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu03")
    assert env["MASTER_PORT"] == str(20000 + 4242 % 20000)  # the same on every task, no communication


def test_launcher_variables_win_over_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "7"}
    assert map_launcher_env(env) == {}
    assert env["RANK"] == "0"


def test_plain_python_gets_one_rank():
    env = {}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0


def test_first_host_of_nodelists():
    assert _first_slurm_host("node1") == "node1"
    assert _first_slurm_host("gpu[03-05,9],cpu1") == "gpu03"
    assert _first_slurm_host("a[7,9]") == "a7"
