"""The launch from the environment (megalite/parallel/cluster.py, the preflight): Slurm's
node lists and variables, explicit variables winning, parallel.dp=auto, and two Slurm
"nodes" on loopback, configured only through SLURM_* variables, matching one node.
"""

import io
import os
import random
import stat
from contextlib import redirect_stdout

import pytest

from launching import STEPS, Launch, launch_args
from megalite.config import finish_config, load_config, read_config
from megalite.errors import ConfigError
from megalite.parallel.cluster import (JOB_PORT_BASE, JOB_PORT_SPAN, expand_hostlist,
                                       first_host, launch_from_env, torchrun_args)
from megalite.preflight import preflight_main, ranks_per_node
from test_train import losses, tiny_args


@pytest.mark.parametrize("hostlist, hosts", [
    ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
    ("login1", ["login1"]),
    ("a[1-2],b,c[7]", ["a1", "a2", "b", "c7"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1,3]-ib", ["r1n1-ib", "r1n3-ib", "r2n1-ib", "r2n3-ib"]),
    ("x[1-2],y[01-02]", ["x1", "x2", "y01", "y02"]),
])
def test_slurm_host_lists_expand(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-2", "gpu1-2]", "gpu[a-b]", "gpu[5-3]", "g[[1]]"])
def test_a_malformed_host_list_is_an_error(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)


def test_first_host_asks_scontrol_where_it_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the parser
    assert first_host("gpu[007-009]") == "gpu007"
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        first_host("gpu[007-")
    scontrol = tmp_path / "scontrol"  # Slurm's own answer wins
    scontrol.write_text("#!/bin/sh\necho from-scontrol-$3\necho other\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    assert first_host("gpu[007-009]") == "from-scontrol-gpu[007-009]"


SLURM = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[010-013]",
         "SLURM_STEP_NODELIST": "gpu[011-014]", "SLURM_GPUS_ON_NODE": "8",
         "SLURM_JOB_ID": "4242"}


def test_slurm_variables_give_the_launch():
    launch = launch_from_env(SLURM)
    assert (launch.min_nodes, launch.max_nodes, launch.node_rank, launch.nproc_per_node,
            launch.master_addr) == (4, 4, 2, 8, "gpu011")  # the step's list first
    assert launch.master_port == JOB_PORT_BASE + 4242 % JOB_PORT_SPAN < 32768
    assert torchrun_args(launch, 8, 3) == [
        "--nnodes=4", "--node_rank=2", "--rdzv_backend=c10d", "--rdzv_id=megalite-4242",
        f"--rdzv_endpoint=gpu011:{launch.master_port}", "--nproc_per_node=8",
        "--max_restarts=3"]
    # two jobs on one node meet in two rendezvous
    other = launch_from_env({**SLURM, "SLURM_JOB_ID": "4243"})
    assert (other.master_port, other.rdzv_id) != (launch.master_port, launch.rdzv_id)
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert launch_from_env(no_step).master_addr == "gpu010"


def test_explicit_variables_win_over_slurm():
    launch = launch_from_env({**SLURM, "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4",
                              "MASTER_ADDR": "head", "MASTER_PORT": "29999", "RDZV_ID": "mine"})
    assert (launch.max_nodes, launch.node_rank, launch.nproc_per_node, launch.master_addr,
            launch.master_port, launch.rdzv_id) == (2, 1, 4, "head", 29999, "mine")


def test_launch_defaults_and_errors():
    alone = launch_from_env({"SLURM_GPUS_ON_NODE": "0"})  # a CPU node says 0 GPUs
    assert (alone.max_nodes, alone.nproc_per_node) == (1, None)
    assert torchrun_args(alone, 2, 0) == ["--standalone", "--nproc_per_node=2",
                                          "--max_restarts=0"]
    elastic = launch_from_env({"NNODES": "1:2", "MASTER_ADDR": "h",
                               "RDZV_CONF": "last_call_timeout=5"})
    assert elastic.elastic and elastic.worlds(4) == [4, 8]
    assert {"--nnodes=1:2", "--rdzv_conf=last_call_timeout=5"} <= {
        *torchrun_args(elastic, 4, 1)}
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        torchrun_args(launch_from_env({"NNODES": "2"}), 1, 0)
    for bad in ("two", "2:1", "0"):
        with pytest.raises(ConfigError, match="NNODES"):
            launch_from_env({"NNODES": bad})
    with pytest.raises(ConfigError, match="node ranks go from 0 to 1"):
        launch_from_env({"NNODES": "2", "NODE_RANK": "2"})


def test_dp_auto_takes_the_world_and_accumulation_adapts():
    raw = read_config(None, [("parallel.dp", "auto"), ("parallel.tp", "2"),
                             ("train.micro_batch_size", "1"), ("train.global_batch_size", "8")])
    on_8, on_4 = finish_config(raw, 8), finish_config(raw, 4)
    assert (on_8.parallel.dp, on_8.grad_accum_steps) == (4, 2)
    assert (on_4.parallel.dp, on_4.grad_accum_steps) == (2, 4)
    assert raw.parallel.dp == "auto"  # each world gets its own copy
    with pytest.raises(ConfigError, match="the launch has 5 ranks, but parallel.dp=auto needs "
                                          "a multiple of tp x pp x sp"):
        finish_config(raw, 5)
    with pytest.raises(ConfigError, match="global_batch_size=8 is not a multiple of "
                                          "micro_batch_size [*] dp = 1 [*] 3"):
        finish_config(raw, 6)  # the global batch stays: 3 replicas cannot share 8
    with pytest.raises(ConfigError, match="only a launch knows"):
        finish_config(raw)
    with pytest.raises(ConfigError, match="whole number or auto"):
        load_config(None, [("parallel.dp", "many")])


def test_ranks_per_node_follow_the_layout_or_the_launch():
    fixed = read_config(None, [("parallel.dp", "4")])
    assert ranks_per_node(fixed, launch_from_env({})) == 4
    assert ranks_per_node(fixed, launch_from_env({"NNODES": "2"})) == 2
    with pytest.raises(ConfigError, match="NPROC_PER_NODE=3 x NNODES=1 = 3 ranks"):
        ranks_per_node(fixed, launch_from_env({"NPROC_PER_NODE": "3"}))
    with pytest.raises(ConfigError, match="give --parallel.dp=auto"):
        ranks_per_node(fixed, launch_from_env({"NNODES": "1:2"}))
    auto = read_config(None, [("parallel.dp", "auto"), ("train.device", "cpu")])
    assert ranks_per_node(auto, launch_from_env({"NPROC_PER_NODE": "3"})) == 3
    with pytest.raises(ConfigError, match="set NPROC_PER_NODE"):
        ranks_per_node(auto, launch_from_env({}))


def _preflight(argv, env, monkeypatch):
    for name in [*os.environ]:
        if name.startswith("SLURM_") or name in ("NNODES", "NPROC_PER_NODE", "MASTER_ADDR"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    with redirect_stdout(out):
        assert preflight_main(argv) == 0
    return out.getvalue().splitlines()


def test_the_preflight_prints_the_launch(launch_cache, tmp_path, monkeypatch):
    argv = ["configs/tiny.yaml", *tiny_args(launch_cache, tmp_path, extra=[
        "--parallel.dp=auto", "--train.micro_batch_size=2", "--run.max_restarts=2"])]
    world, window, run_dir, args = _preflight(
        argv, {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[3-4]",
               "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": "7"}, monkeypatch)
    assert (world, window, run_dir) == ("4", "10", str(tmp_path))
    assert args.split() == ["--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d",
                            "--rdzv_id=megalite-7", f"--rdzv_endpoint=n3:{JOB_PORT_BASE + 7}",
                            "--nproc_per_node=2", "--max_restarts=2"]
    # elastic: every world from 1 to 2 nodes is checked; the largest is printed
    world, *_ = _preflight(argv, {"NNODES": "1:2", "NPROC_PER_NODE": "2",
                                  "MASTER_ADDR": "h"}, monkeypatch)
    assert world == "4"
    with pytest.raises(ConfigError, match="with 2 nodes [(]8 ranks[)]: train.global_batch_size"):
        _preflight(argv, {"NNODES": "1:2", "NPROC_PER_NODE": "4", "MASTER_ADDR": "h"},
                   monkeypatch)


FAKE_SRUN = """#!/bin/bash
# srun's one task per node, all on this machine: SLURM_NODEID 0 .. SLURM_NNODES-1
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_two_slurm_nodes_on_loopback_match_one_node(launch_cache, launch_reference, tmp_path):
    """examples/slurm.sbatch as Slurm runs it, with an srun that starts its two "nodes" on
    this machine: every value comes from SLURM_*, the rendezvous host from a compressed
    node list (its first host: 127.0.0.1)."""
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    job = str(random.randrange(10 ** 6))  # its own port: a parallel run elsewhere differs
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
             "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": job,
             "PATH": f"{bin_dir}:{os.environ['PATH']}",
             # torchrun gives each worker one thread only when a node has several; the
             # one-node reference had one, and matmuls add up in another order on two
             "OMP_NUM_THREADS": "1"}
    args = launch_args(launch_cache, run_dir)[1:]  # the config and overrides
    job_run = Launch(["bash", "examples/slurm.sbatch", *args], env=slurm)
    assert job_run.finish() == 0, job_run.output
    port = JOB_PORT_BASE + int(job) % JOB_PORT_SPAN
    assert job_run.output.count(f"--rdzv_endpoint=127.0.0.1:{port}") == 2, job_run.output
    assert losses(run_dir) == launch_reference  # bit for bit
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [
        "rank_00000.log", "rank_00001.log"]
    assert max(losses(run_dir)) == STEPS
