"""Unattended runs through ./launch.sh on gloo ranks: a killed worker restarts and resumes
(run.max_restarts), a user error does not restart, a fresh launch never resumes an
earlier run, a run resumes on fewer ranks (parallel.dp=auto), and a rank that stops
answering ends the run on the others within parallel.timeout_s.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from launching import STEPS, Launch, launch_args, workers
from megalite.parallel.comm_failure import REPORT_GRACE_S
from parity import FP64_ATOL, FP64_RTOL
from test_train import losses, tiny_args


def test_a_killed_worker_restarts_and_the_run_ends_as_if_uninterrupted(
        launch_cache, launch_reference, tmp_path):
    run = Launch(launch_args(launch_cache, tmp_path,
                             ["--run.max_restarts=1", "--checkpoint.every=10"]))
    run.wait_for("step 15/")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    torchrun = run.torchrun_pid()
    os.kill(workers(torchrun)[1], signal.SIGKILL)
    assert run.finish() == 0, run.output
    resumed = f"restart 1 after a failure: resuming from {tmp_path}/checkpoints/step_0000010"
    assert resumed in run.output, run.output
    assert losses(tmp_path) == launch_reference  # bit for bit, every step

    # a new launch into this run directory starts nothing over its checkpoints
    before = (tmp_path / "metrics.jsonl").read_bytes()
    again = Launch(launch_args(launch_cache, tmp_path))
    assert again.finish() == 2, again.output
    assert "holds checkpoints of an earlier run (latest: step_0000060)" in again.output
    assert "--resume_from_checkpoint latest" in again.output
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"


def _attempts(tmp_path, exit_code: int, max_restarts: int) -> int:
    """How many times torchrun (megalite's) starts a worker that exits with `exit_code`."""
    counter = tmp_path / f"attempts_{exit_code}"
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nopen({str(counter)!r}, 'a').write('x')\n"
                      f"sys.exit({exit_code})\n")
    subprocess.run([sys.executable, "-m", "megalite.parallel.torchrun", "--standalone",
                    "--nproc_per_node=1", f"--max_restarts={max_restarts}",
                    "--monitor_interval=0.05", str(script)],
                   capture_output=True, timeout=240, env={**os.environ,
                                                          "PYTHONPATH": os.getcwd()})
    return len(counter.read_text())


def test_a_user_error_does_not_burn_restarts(tmp_path):
    assert _attempts(tmp_path, 1, max_restarts=2) == 3  # a crash: restarted twice
    assert _attempts(tmp_path, 2, max_restarts=2) == 1  # a config or data mistake: once


def test_ranks_torchrun_stopped_after_a_user_error_do_not_make_it_a_crash(capsys):
    from types import SimpleNamespace
    from megalite.parallel.torchrun import report_failure

    def status(*codes):
        failures = {rank: SimpleNamespace(exitcode=c) for rank, c in enumerate(codes)}
        return report_failure(SimpleNamespace(failures=failures))
    assert status(-signal.SIGTERM, 2) == 2  # rank 1's user error; rank 0 stopped for it
    assert "rank 0 was stopped by torchrun after that failure" in capsys.readouterr().err
    assert status(-signal.SIGTERM, 1) == 1 and status(2, -signal.SIGKILL) == 1
    assert status(-signal.SIGTERM) == 1  # a signal from outside, nothing else: a crash


def test_a_checkpoint_of_4_ranks_resumes_on_2_with_dp_auto(launch_cache, tmp_path):
    """A lost node: the same global batch with half the replicas, twice the accumulation;
    the losses of the 4-rank run in float64 rounding (tests/parity.py's tolerance)."""
    args = ["--parallel.dp=auto", "--train.micro_batch_size=2", "--train.precision=fp64",
            "--model.dropout=0", "--checkpoint.every=6"]
    four, two = tmp_path / "four", tmp_path / "two"
    run = Launch(["./launch.sh", "configs/tiny.yaml",
                  *tiny_args(launch_cache, four, steps=12, extra=args)],
                 env={"NPROC_PER_NODE": "4"})
    assert run.finish() == 0, run.output
    resume = Launch(["./launch.sh", "configs/tiny.yaml",
                     *tiny_args(launch_cache, two, steps=12, extra=args),
                     f"--resume_from_checkpoint={four}/checkpoints/step_0000006"],
                    env={"NPROC_PER_NODE": "2"})
    assert resume.finish() == 0, resume.output
    assert "dp: 4" in (four / "config.yaml").read_text()
    assert "dp: 2" in (two / "config.yaml").read_text()
    expected, got = losses(four), losses(two)
    assert sorted(got) == list(range(7, 13))
    scale = max(abs(expected[s][0]) for s in got)
    for step in got:
        tolerance = FP64_RTOL * abs(expected[step][0]) + FP64_ATOL * scale
        assert abs(got[step][0] - expected[step][0]) <= tolerance, (step, got[step], expected[step])


def _rank(pid: int) -> int:
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK="))[5:])


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # gone but not yet reaped
    except FileNotFoundError:
        return True


def test_a_rank_that_stops_answering_ends_the_run_on_every_other(launch_cache, tmp_path):
    timeout_s = 5
    run = Launch(["./launch.sh", "configs/tiny.yaml", *tiny_args(
        launch_cache, tmp_path, steps=STEPS, extra=[
            "--parallel.pp=2", "--parallel.dp=2", "--train.micro_batch_size=2",
            f"--parallel.timeout_s={timeout_s}"])])
    run.wait_for("step 3/")
    ranks = sorted(workers(run.torchrun_pid()), key=_rank)
    assert len(ranks) == 4
    hung, survivors = ranks[3], ranks[:3]
    os.kill(hung, signal.SIGSTOP)  # alive, its sockets open, answering nothing
    frozen = time.monotonic()
    # a collective waits timeout_s, then up to min(timeout_s, REPORT_GRACE_S) for the
    # others' call numbers; plus one step's compute (milliseconds) and leaving the process
    limit = timeout_s + min(timeout_s, REPORT_GRACE_S) + 10
    while not all(_exited(pid) for pid in survivors):
        assert time.monotonic() - frozen < limit, run.output
        time.sleep(0.05)  # polling the condition, not waiting for time to pass
    # torchrun would SIGKILL the frozen rank 30 s after its SIGTERM; the test does not wait
    os.kill(hung, signal.SIGKILL)
    code = run.finish()
    assert code == 1, run.output
    logs = [(tmp_path / "logs" / f"rank_{rank:05d}.log").read_text() for rank in range(3)]
    for log in logs:  # each names its group, the collective and how far its peers got
        assert "CollectiveError" in log and "parallel.timeout_s" in log, log[-3000:]
    # rank 3's own groups (pipeline and data parallel) say it never reported
    assert sum("rank 3 did not report" in log for log in logs) >= 2, logs


@pytest.mark.slow  # 45 s of rendezvous: ./test.sh -m slow
def test_an_elastic_run_goes_on_after_losing_a_node(launch_cache, tmp_path):
    """NNODES=1:2 on loopback, two "nodes" of 2 ranks; the one that does not host the
    rendezvous loses power (every process SIGKILLed): the other restarts its workers on
    its own, dp halves, and they resume from the latest checkpoint to the end."""
    port = _free_port()
    env = {"NNODES": "1:2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           # notice the lost node after 3 missed 1 s heartbeats, form the smaller group
           # 2 s after that (torchrun's defaults: 5 s heartbeats, a 30 s last call)
           "RDZV_CONF": "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2"}
    args = ["./launch.sh", "configs/tiny.yaml", *tiny_args(launch_cache, tmp_path, steps=150, extra=[
        "--parallel.dp=auto", "--train.micro_batch_size=2", "--checkpoint.every=5",
        "--run.max_restarts=1", "--train.eval_every=0"])]
    nodes = [Launch(args, env=env) for _ in range(2)]  # together: one first round of 4
    latest = tmp_path / "checkpoints" / "latest"
    _wait_until(lambda: latest.is_file() and int(latest.read_text().strip()[5:]) >= 10
                or any(node.proc.poll() is not None for node in nodes))
    owner = _listener(port)  # the torchrun that holds the rendezvous store
    host, lost = sorted(nodes, key=lambda node: node.torchrun_pid() != owner)
    assert host.torchrun_pid() == owner, [node.output for node in nodes]
    torchrun = lost.torchrun_pid()
    for pid in [lost.launcher_pid(), torchrun, *workers(torchrun)]:
        os.kill(pid, signal.SIGKILL)
    assert host.finish() == 0, host.output
    first, restarted = host.output.split("restart 1 after a failure: resuming from")
    assert "over 4 ranks" in (tmp_path / "logs" / "rank_00000.log").read_text()
    assert "over 2 ranks" in restarted and "step 150/150" in restarted, host.output
    assert max(losses(tmp_path)) == 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listener(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (from /proc: no tool needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


def _wait_until(condition, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)
