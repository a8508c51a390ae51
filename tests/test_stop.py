"""One clean stop from any signal pattern, SIGUSR1 saves and goes on, a failed commit
stops every rank: through ./launch.sh on 2 gloo ranks, as users and schedulers send them.

Every run waits on conditions (a logged step, a line of output, an exit), not on sleeps;
the one wait on the clock is the test of what happens once the stop window has passed.
Each clean stop resumes with the losses of the uninterrupted run, bit for bit.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from launching import STEPS, Launch, launch_args, workers
from test_train import losses


@pytest.fixture
def cache(launch_cache):
    return launch_cache


@pytest.fixture
def reference(launch_reference):
    return launch_reference

def resume_matches(cache, run_dir, reference):
    run = Launch(launch_args(cache, run_dir, ["--resume_from_checkpoint=latest"]))
    assert run.finish() == 0, run.output
    assert losses(run_dir) == reference  # exact float equality, every step


def assert_clean_stop(run, code, run_dir):
    assert code == 0, run.output
    assert "Traceback" not in run.output and "stopped cleanly" in run.output, run.output
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(latest[5:]) < STEPS, run.output  # it stopped before the end


def test_ctrl_c_under_timeout_is_one_stop(cache, reference, tmp_path):
    """The terminal sends SIGINT to the foreground group, and `timeout` relays it again."""
    run = Launch(launch_args(cache, tmp_path), under_timeout=True)
    run.wait_for("step 3/")
    os.killpg(run.proc.pid, signal.SIGINT)
    assert_clean_stop(run, run.finish(), tmp_path)
    assert "killing" not in run.output
    resume_matches(cache, tmp_path, reference)


def test_sigterm_to_every_process_at_once_twice_is_one_stop(cache, reference, tmp_path):
    """Slurm's scancel / a node's shutdown: launch.sh, torchrun and every worker at once,
    and here again right after (inside the window)."""
    run = Launch(launch_args(cache, tmp_path))
    run.wait_for("step 3/")
    torchrun = run.torchrun_pid()
    everyone = [run.launcher_pid(), torchrun, *workers(torchrun)]
    assert len(everyone) == 4
    for _ in range(2):
        for pid in everyone:
            os.kill(pid, signal.SIGTERM)
    assert_clean_stop(run, run.finish(), tmp_path)
    resume_matches(cache, tmp_path, reference)


def test_a_signal_after_the_window_kills_at_once(cache, tmp_path):
    """Workers that cannot answer (stopped here, as a hung collective would be): the
    first SIGTERM asks them to stop; one after the window kills them, and launch.sh
    exits at once, non-zero."""
    run = Launch(launch_args(cache, tmp_path, ["--run.stop_window_s=1"]))
    run.wait_for("step 2/")
    torchrun = run.torchrun_pid()
    for pid in workers(torchrun):
        os.kill(pid, signal.SIGSTOP)
    os.kill(run.launcher_pid(), signal.SIGTERM)
    run.wait_for("stop requested")
    first = time.monotonic()
    os.kill(run.launcher_pid(), signal.SIGTERM)  # inside the window: the same request
    deadline = first + 1.5
    while time.monotonic() < deadline:  # the window is a duration: wait for it to pass
        time.sleep(deadline - time.monotonic())
    assert run.proc.poll() is None, run.output  # still waiting for the frozen workers
    os.kill(run.launcher_pid(), signal.SIGTERM)
    code = run.finish(timeout=60)
    assert code != 0 and "killing the workers" in run.output, run.output


def test_sigusr1_saves_and_the_run_goes_on(cache, reference, tmp_path):
    run = Launch(launch_args(cache, tmp_path))
    run.wait_for("step 3/")
    torchrun = run.torchrun_pid()
    for pid in [run.launcher_pid(), torchrun, *workers(torchrun)]:  # the job's processes
        os.kill(pid, signal.SIGUSR1)
    assert run.finish() == 0, run.output
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert len(steps) == 2 and steps[-1] == f"step_{STEPS:07d}", (steps, run.output)
    assert 3 <= int(steps[0][5:]) < STEPS
    assert losses(tmp_path) == reference  # saving changed nothing


def test_a_failed_commit_on_rank_0_stops_every_rank_and_keeps_latest(cache, reference,
                                                                      tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    in_the_way = ckpt_dir / "step_0000008"
    in_the_way.write_text("not a checkpoint")  # rank 0's commit cannot replace it
    started = time.monotonic()
    run = Launch(launch_args(cache, tmp_path, ["--checkpoint.every=4"]))
    code = run.finish()
    assert code == 2, run.output
    assert "Traceback" not in run.output and "ChildFailedError" not in run.output, run.output
    assert f"checkpoint '{in_the_way}' was not saved: rank 0 could not commit it" in run.output
    # every rank stopped at once, not at the collective timeout (parallel.timeout_s 600 s)
    assert time.monotonic() - started < 200
    assert (ckpt_dir / "latest").read_text().strip() == "step_0000004"
    in_the_way.unlink()
    resume_matches(cache, tmp_path, reference)


def test_a_stop_copy_inside_the_window_is_ignored_and_one_after_it_kills(tmp_path):
    """The worker's handler (training/signals.py) on its own, in a child process."""
    script = f"""
import os, signal, sys, time
from megalite.training import signals as s
clock = [100.0]
s.time.monotonic = lambda: clock[0]
with s.RunSignals(window_s=10) as run:
    os.kill(os.getpid(), signal.SIGTERM)
    assert run.stop_requested == "SIGTERM"
    clock[0] += 9
    os.kill(os.getpid(), signal.SIGINT)   # a copy: ignored
    os.kill(os.getpid(), signal.SIGUSR1)
    assert run.save_requested and run.stop_requested == "SIGTERM"
    run.saved()
    os.kill(os.getpid(), signal.SIGUSR1)  # within the window of the last save request
    assert not run.save_requested
    print("alive", flush=True)
    clock[0] += 2
    os.kill(os.getpid(), signal.SIGINT)   # 11 s after the first: die of it
    print("survived", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.count("alive") == 1 and "survived" not in out.stdout, out
    assert out.returncode == -signal.SIGINT, out


def test_the_stop_budget_warning_counts_the_save_and_the_step():
    from megalite.training.signals import STOP_BUDGET_S, stop_budget_warning
    assert stop_budget_warning(2.0, 10 << 20, None) is None
    assert stop_budget_warning(STOP_BUDGET_S - 1, 10 << 20, 0.5) is None
    warning = stop_budget_warning(STOP_BUDGET_S - 1, 3 << 30, 2.0)
    assert warning and "3072 MiB" in warning and "plus a step of 2.0 s" in warning


def test_the_write_speed_probe_writes_and_removes_its_file(tmp_path):
    from megalite.checkpoint.format import measure_write_speed
    assert measure_write_speed(tmp_path / "ckpt", 3 << 20) > 0
    assert list((tmp_path / "ckpt").iterdir()) == []
