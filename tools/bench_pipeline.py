"""Measured pipeline bubble of each schedule next to theory.

    python tools/bench_pipeline.py [--forward-ms 20] [--backward-ms 40] [--record]

For pp in {2, 4} and m in {4, 8, 16} micro-batches, pp real gloo processes play the
project's own schedules (megalite.parallel.pipeline: gpipe, 1f1b, interleaved with
v=2) with a fixed synthetic cost per micro-batch and stage (a sleep, so the numbers
do not depend on how busy the CPU is), sending a real activation tensor forward and
its gradient backward between neighbouring stages, as the engine does (isend, blocking
recv). The bubble is the share of wall time a rank (rank 0) is not computing:
1 - (time spent in the synthetic costs) / wall. Theory: (p-1)/(m+p-1) for GPipe and 1F1B,
(p-1)/(v*m+p-1) for interleaved. Peak activations: the most micro-batches one stage
holds (forwarded, not yet backwarded), from the schedule itself; for interleaved the
unit is one chunk's activations (1/v of a stage's layers).
"""

import argparse
import datetime
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megalite.parallel import pipeline  # noqa: E402

SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved": 2}  # schedule -> virtual stages


def schedule_actions(name, m, pp, rank, v):
    fn = {"gpipe": pipeline.gpipe, "1f1b": pipeline.one_f_one_b,
          "interleaved": pipeline.interleaved}[name]
    return fn(m, pp, rank, v)


def peak_live(actions) -> int:
    live = peak = 0
    for kind, _, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def _compute(seconds: float) -> float:
    """The synthetic stage cost; returns the time it really took (sleep overshoots)."""
    start = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - start


def _rank(rank, pp, port, cases, forward_s, backward_s, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=pp)
    act = torch.zeros(64, 256)  # one micro-batch's activation at a stage boundary
    results = []
    for name, m, v in cases:
        stages = pp * v

        def tag(backward, vstage, mb):
            return (int(backward) * stages + vstage) * m + mb

        actions = schedule_actions(name, m, pp, rank, v)
        pending, busy = [], 0.0
        dist.barrier()
        start = time.perf_counter()
        for kind, chunk, mb in actions:
            vstage = chunk * pp + rank
            if kind == "F":
                if vstage > 0:
                    dist.recv(act, src=(rank - 1) % pp, tag=tag(False, vstage, mb))
                busy += _compute(forward_s / v)
                if vstage < stages - 1:
                    pending.append(dist.isend(act, dst=(rank + 1) % pp, tag=tag(False, vstage + 1, mb)))
            else:
                if vstage < stages - 1:
                    dist.recv(act, src=(rank + 1) % pp, tag=tag(True, vstage, mb))
                busy += _compute(backward_s / v)
                if vstage > 0:
                    pending.append(dist.isend(act, dst=(rank - 1) % pp, tag=tag(True, vstage - 1, mb)))
        for request in pending:
            request.wait()
        dist.barrier()
        wall = time.perf_counter() - start
        results.append((name, m, v, wall, 1 - busy / wall, peak_live(actions)))
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def measure(pp, cases, forward_s, backward_s):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, pp, port, cases, forward_s, backward_s, out))
             for r in range(pp)]
    for p in procs:
        p.start()
    results = out.get(timeout=600)
    for p in procs:
        p.join()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--backward-ms", type=float, default=40.0)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    f, b = args.forward_ms / 1e3, args.backward_ms / 1e3
    rows = ["| pp | m | schedule | v | wall (s) | bubble measured | bubble theory | "
            "peak activations on stage 0 (chunks) |", "|---|---|---|---|---|---|---|---|"]
    for pp in (2, 4):
        cases = [(name, m, v) for m in (4, 8, 16) for name, v in SCHEDULES.items()]
        for name, m, v, wall, measured, peak in measure(pp, cases, f, b):
            theory = (pp - 1) / (v * m + pp - 1)
            rows.append(f"| {pp} | {m} | {name} | {v} | {wall:.3f} | {measured:.3f} | "
                        f"{theory:.3f} | {peak} |")
    table = "\n".join(rows)
    print(table)
    if args.record:
        command = "python tools/bench_pipeline.py " + " ".join(sys.argv[1:])
        with open(ROOT / "BENCHMARKS.md", "a") as fh:
            fh.write(f"\n## Pipeline bubble, {datetime.date.today()}\n\nDevice: CPU "
                     f"({os.cpu_count()} cores), gloo, synthetic cost {args.forward_ms:g} ms "
                     f"forward / {args.backward_ms:g} ms backward per micro-batch and stage. "
                     f"Command: `{command.strip()}`\n\n{table}\n")


if __name__ == "__main__":
    main()
