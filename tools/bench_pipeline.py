"""Measured pipeline bubble of each schedule next to theory.

    python tools/bench_pipeline.py [--forward-ms 80] [--backward-ms 160] [--repeats 3]
        [--send-after-compute] [--record]

For pp in {2, 4} and m in {4, 8, 16} micro-batches, pp real gloo processes play the
project's own schedules (megalite.parallel.pipeline.schedules: gpipe, 1f1b, interleaved with
v=2) with a fixed synthetic cost per micro-batch and stage: a sleep, so the numbers do
not depend on how busy the CPU is. With v chunks per rank each chunk costs 1/v of the
stage's forward or backward, so every schedule does the same work per rank and the
fwd:bwd ratio is the same for all.

The theory assumes backward = k x forward for every micro-batch and stage and free
communication. Two things keep a measurement from it on a shared 2-core machine:
- latency: the steady phase of 1F1B has no slack, so each message on the critical
  path adds its latency to the step, and gloo takes 0.2 to several ms per message
  here, while the smallest bubble (pp=2, m=16, interleaved: 3% of the step) leaves a
  10% tolerance 3 ms per second of step;
- waking late: with other jobs on the cores, a rank whose cost is over can wait tens
  of milliseconds for a core, idle time for its neighbours.
So the bench keeps the dependencies real and takes those two out:
- a synthetic cost has a known end, so the sender posts its message (a forward's
  output or a backward's input gradient: one float64, the instant the data is ready)
  when the cost begins, with isend; the receiver blocks on that message and begins
  no earlier than the instant it names. The message travels while the sender
  computes, as free communication would have it; `--send-after-compute` sends when
  the cost is over instead, as the engine does, and shows what latency adds;
- every receive of the step is posted before the step starts, so a message lands
  without a handshake while its receiver is still busy;
- the ranks run under SCHED_FIFO where allowed (see `_realtime`), and a cost sleeps to
  a deadline and spins its last half millisecond: a late wake-up is an overshoot, and
  an overshoot is idle time for the neighbours;
- all ranks start at one agreed instant of the machine-wide monotonic clock instead
  of leaving a barrier at slightly different times.
What is left is the rank's own work between two actions (waiting on the receive,
Python), about 0.1 ms per action, hence costs of tens of milliseconds.

Bubble of a rank: 1 - (time in its synthetic costs) / wall, wall running from the
common start to the moment the last rank finished. Theory, as a share of that wall
time: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) for interleaved, the same on
every rank. The table gives the mean over ranks, the worst rank, and the largest
relative deviation of any rank from theory; each case runs `--repeats` times
(interleaved with the other cases) and the median is kept, so a burst of load from
elsewhere on the machine does not decide a row.

Peak activations: the most micro-batches a stage holds at once (forwarded, not yet
backwarded), counted from the schedule, per pipeline rank from first to last, in units
of one micro-batch through a whole stage (an interleaved chunk is 1/v of that).
"""

import argparse
import datetime
import os
import queue
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megalite.parallel.pipeline import schedules as pipeline  # noqa: E402


SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved": 2}  # schedule -> virtual stages
SECTION = "Pipeline bubble (tools/bench_pipeline.py)"
TOLERANCE = 0.10  # relative deviation from theory the issue accepts
SPIN_S = 5e-4  # the end of each synthetic cost is spun, not slept (sleep overshoots)
START_DELAY_S = 0.1  # time for the start instant to reach every rank


class Costs(NamedTuple):
    forward_s: float  # one micro-batch through one stage (a chunk: 1/v of it)
    backward_s: float
    repeats: int
    send_after_compute: bool


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


def theory(pp: int, m: int, v: int) -> float:
    return (pp - 1) / (v * m + pp - 1)


def _wait_until(deadline: float):
    remaining = deadline - time.perf_counter()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while time.perf_counter() < deadline:
        pass


def _messages(actions, pp, rank, v):
    """Per action: the (peer, tag) it receives from and the (peer, tag) it sends to."""
    stages = pp * v
    m = sum(1 for kind, _, _ in actions if kind == "F") // v

    def tag(backward, vstage, mb):
        return (int(backward) * stages + vstage) * m + mb

    plan = []
    for kind, chunk, mb in actions:
        vstage = chunk * pp + rank
        recv = send = None
        if kind == "F":
            if vstage > 0:
                recv = ((rank - 1) % pp, tag(False, vstage, mb))
            if vstage < stages - 1:
                send = ((rank + 1) % pp, tag(False, vstage + 1, mb))
        else:
            if vstage < stages - 1:
                recv = ((rank + 1) % pp, tag(True, vstage, mb))
            if vstage > 0:
                send = ((rank - 1) % pp, tag(True, vstage - 1, mb))
        plan.append((kind, recv, send))
    return plan


def _run_step(plan, v, costs):
    """One step of this rank's schedule; returns (start, end, busy seconds).

    A message carries the instant its data is ready (perf_counter is one clock for all
    processes of a machine); an action begins once its input is ready and the previous
    action is over, and the rank is busy from then until the action's cost is spent.
    """
    receives = []
    for _, recv, _ in plan:
        if recv is None:
            receives.append(None)
        else:
            buffer = torch.empty(1, dtype=torch.float64)
            receives.append((dist.irecv(buffer, src=recv[0], tag=recv[1]), buffer))
    start = torch.tensor([time.perf_counter() + START_DELAY_S], dtype=torch.float64)
    dist.broadcast(start, src=0)
    start = start.item()
    _wait_until(start)
    sends, busy = [], 0.0
    for (kind, _, send), receive in zip(plan, receives):
        ready = start
        if receive is not None:
            request, buffer = receive
            request.wait()
            ready = buffer.item()
        # Idle until `ready`, then compute: one wait to the end instead of a wake-up at
        # `ready` that would only add its own lateness.
        begin = max(time.perf_counter(), ready)
        done = begin + (costs.forward_s if kind == "F" else costs.backward_s) / v
        if send is not None and not costs.send_after_compute:
            sends.append(dist.isend(torch.tensor([done], dtype=torch.float64),
                                    dst=send[0], tag=send[1]))
        _wait_until(done)
        now = time.perf_counter()
        busy += now - begin
        if send is not None and costs.send_after_compute:
            sends.append(dist.isend(torch.tensor([now], dtype=torch.float64),
                                    dst=send[0], tag=send[1]))
    end = time.perf_counter()
    for request in sends:
        request.wait()
    return start, end, busy


def _realtime() -> bool:
    """Run this process (and the gloo threads it starts later) under SCHED_FIFO.

    On a shared machine a rank that is due to wake up can wait tens of milliseconds
    for a core; the lowest real-time priority has it woken on time. The ranks sleep
    nearly all the time, so this takes next to nothing from anyone else. Needs root
    or CAP_SYS_NICE; without them the bench runs under normal scheduling.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):
        return False
    return True


def _rank(rank, pp, port, cases, costs, out):
    realtime = _realtime()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=pp)
    plans = [_messages(schedule_actions(name, m, pp, rank, v), pp, rank, v)
             for name, m, v in cases]
    timings = []  # [repeat][case] -> (start, end, busy)
    for _ in range(costs.repeats):
        timings.append([_run_step(plan, v, costs) for plan, (_, _, v) in zip(plans, cases)])
        dist.barrier()
    gathered = [None] * pp
    dist.all_gather_object(gathered, (realtime, timings))
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()


def measure(pp, cases, costs):
    """([per case: (median wall over repeats, median bubble per rank)], all ranks real-time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, pp, port, cases, costs, out))
             for r in range(pp)]
    for p in procs:
        p.start()
    while True:
        try:
            per_rank = out.get(timeout=1)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"bench_pipeline: a pp={pp} rank failed (its error is above)")
    for p in procs:
        p.join()
    realtime = all(flag for flag, _ in per_rank)
    per_rank = [timings for _, timings in per_rank]
    results = []
    for c in range(len(cases)):
        walls, bubbles = [], [[] for _ in range(pp)]
        for rep in range(costs.repeats):
            start = per_rank[0][rep][c][0]
            wall = max(per_rank[r][rep][c][1] for r in range(pp)) - start
            walls.append(wall)
            for r in range(pp):
                bubbles[r].append(1 - per_rank[r][rep][c][2] / wall)
        results.append((statistics.median(walls), [statistics.median(b) for b in bubbles]))
    return results, realtime


def run_table(costs):
    """Returns (markdown table, largest relative deviation from theory, all ranks real-time)."""
    rows = ["| pp | m | schedule | v | wall (s) | bubble theory | measured, mean of ranks | "
            "measured, worst rank | max deviation | peak activations per stage (micro-batches) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    worst, realtime = 0.0, True
    for pp in (2, 4):
        cases = [(name, m, v) for m in (4, 8, 16) for name, v in SCHEDULES.items()]
        results, pp_realtime = measure(pp, cases, costs)
        realtime = realtime and pp_realtime
        for (name, m, v), (wall, bubbles) in zip(cases, results):
            expected = theory(pp, m, v)
            deviation = max(abs(b / expected - 1) for b in bubbles)
            worst = max(worst, deviation)
            far = max(bubbles, key=lambda b: abs(b - expected))
            peaks = " / ".join(f"{peak_live(schedule_actions(name, m, pp, r, v)) / v:g}"
                               for r in range(pp))
            rows.append(f"| {pp} | {m} | {name} | {v} | {wall:.2f} | {expected:.4f} | "
                        f"{statistics.mean(bubbles):.4f} | {far:.4f} | {100 * deviation:.1f}% | "
                        f"{peaks} |")
    return "\n".join(rows), worst, realtime


def record(text: str, path: Path = ROOT / "BENCHMARKS.md"):
    """Put `text` in BENCHMARKS.md as the section SECTION, replacing an older one."""
    from tools.benchmarks import record_section
    record_section(text, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward-ms", type=float, default=80.0,
                        help="forward cost of one micro-batch through one stage")
    parser.add_argument("--backward-ms", type=float, default=160.0,
                        help="backward cost of one micro-batch through one stage")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median counts")
    parser.add_argument("--send-after-compute", action="store_true",
                        help="send when a cost is over, as the engine does, instead of "
                             "announcing its end when it begins: shows what gloo latency adds")
    parser.add_argument("--record", action="store_true",
                        help=f'write the table to BENCHMARKS.md, section "{SECTION}"')
    args = parser.parse_args()
    began = time.perf_counter()
    costs = Costs(args.forward_ms / 1e3, args.backward_ms / 1e3, args.repeats,
                  args.send_after_compute)
    table, worst, realtime = run_table(costs)
    elapsed = time.perf_counter() - began
    verdict = "within" if worst <= TOLERANCE else "NOT within"
    summary = (f"Largest deviation of a rank's bubble from theory: {100 * worst:.1f}% "
               f"({verdict} {100 * TOLERANCE:g}%). Ranks under "
               f"{'SCHED_FIFO' if realtime else 'normal scheduling'}. Run time {elapsed:.0f} s.")
    print(table)
    print(summary)
    if args.record:
        command = " ".join(["python tools/bench_pipeline.py", *sys.argv[1:]])
        messages = ("each sent when its cost is over" if args.send_after_compute else
                    "each posted when its cost begins, naming the instant it ends")
        record(f"## {SECTION}\n\n"
               f"{datetime.date.today()}. Machine: {os.cpu_count()}-core CPU, gloo, torch "
               f"{torch.__version__}, pp processes on one machine. Command: `{command}`\n\n"
               f"Synthetic cost per micro-batch and stage: {args.forward_ms:g} ms forward, "
               f"{args.backward_ms:g} ms backward (each of the v=2 interleaved chunks: half "
               f"of that); messages {messages}; median of {args.repeats} runs per row. "
               f"Theory, as a share of the step's wall time: (p-1)/(m+p-1) for GPipe and "
               f"1F1B, (p-1)/(v*m+p-1) for interleaved. Deviation: the largest "
               f"|measured / theory - 1| over the ranks. Peak activations: per rank, first "
               f"to last, in micro-batches through a whole stage (the tool's docstring "
               f"says how it measures).\n\n{table}\n\n{summary}\n")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
