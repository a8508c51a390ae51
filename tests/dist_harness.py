"""Runs a function on every rank of a real gloo process group, from inside pytest.

Spawning torch processes is slow (~1 s each here), so one pool of `MAX_WORLD` workers
lives for the whole test session; each test builds the topologies it needs inside it
(`build_topology` over the first tp*sp*dp*pp ranks; the rest return None). Call
`run_on_ranks(fn, *args)`: `fn(*args)` runs on every worker and the list of per-rank
results comes back; an exception on any rank fails the test with that rank's
traceback; a hang fails after `TIMEOUT_S`. `fn` must be a module-level function.

`torchrun(entry, args)` runs a real launch instead (2 ranks under torchrun, as a user
would), and `assert_finished(out, run_dir)` fails a run meant to finish with its exit
code, its output and the tail of every rank's log: the dead worker's last words.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MAX_WORLD = 8
TIMEOUT_S = 300
GLOO_TIMEOUT_S = 120
_pool = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads() -> int:
    """Intra-op threads of every test process (MEGALITE_TEST_THREADS, default 1 in the
    workers): the float64 parity suite must pass with 1 and with 2."""
    return int(os.environ.get("MEGALITE_TEST_THREADS", "1"))


def _worker(rank, world, port, tasks, results):
    torch.set_num_threads(threads())
    os.environ.pop("TRITON_INTERPRET", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # report everything: the test decides
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args):
        for q in self.tasks:
            q.put((fn, args))
        out, errors = [None] * len(self.procs), []
        for _ in self.procs:
            rank, ok, value = self._next_result(fn.__name__)
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            # a rank that failed mid-way may have created fewer process groups than its
            # peers: the next test gets a fresh pool instead of a desynchronised one
            self.close()
            raise AssertionError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return out

    def _next_result(self, name: str):
        """The next rank's answer; fails as soon as a worker process has died (a crash
        inside torch, a kill) instead of waiting out TIMEOUT_S for an answer never sent."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self.close(force=True)
                    raise RuntimeError(f"{name}: worker process(es) died (rank, exit code): "
                                       f"{dead}") from None
        self.close(force=True)
        raise RuntimeError(f"{name}: a rank did not answer in {TIMEOUT_S} s")

    def close(self, force=False):
        global _pool
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive() and not force:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
        _pool = None


def run_on_ranks(fn, *args):
    global _pool
    if _pool is None:
        _pool = _Pool(MAX_WORLD)
        atexit.register(lambda: _pool and _pool.close())
    return _pool.run(fn, *args)


def restart_pool() -> None:
    """Start the next run_on_ranks on new workers (fresh default group, no groups yet)."""
    if _pool is not None:
        _pool.close()


def torchrun(entry: str, args, nproc: int = 2, timeout: float = 300):
    """Run `entry` (a script path, or -m MODULE) on `nproc` ranks under torchrun."""
    target = ["-m", entry[3:]] if entry.startswith("-m ") else [entry]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           *target, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def log_tails(run_dir, lines: int = 30) -> str:
    logs = sorted(Path(run_dir).glob("logs/rank_*.log"))
    if not logs:
        return f"(no rank logs under {run_dir}/logs)"
    return "\n".join(f"--- {log.name} (last {lines} lines) ---\n" +
                     "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                     for log in logs)


def assert_finished(out: subprocess.CompletedProcess, run_dir) -> None:
    """A run meant to finish exited 0; otherwise fail with what each rank said last."""
    if out.returncode != 0:
        raise AssertionError(
            f"exit code {out.returncode}\n--- stdout (tail) ---\n{out.stdout[-2000:]}\n"
            f"--- stderr (tail) ---\n{out.stderr[-3000:]}\n{log_tails(run_dir)}")
