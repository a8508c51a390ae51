"""Tensor-parallel traffic and throughput of a training step, against Megatron's volume
and against the code before column layers sharing an input mapped it once.

    python tools/bench_tp.py [--steps 3] [--warmup 1] [--micro-batches 4]
                             [--before 0fc7268 | --before none] [--record] [--json FILE]

For tp = 2 and tp = 2 with tp_sp (dp 1, no recomputation, fp32), two gloo processes
train a llama (hidden 256, 4 layers, 4 heads over 2 kv heads, vocabulary 4096, seq
256, micro-batch 4, --micro-batches per step) through the project's Trainer on the
default corpus (data cache: data_cache/ of this checkout, prepared if missing). After
--warmup steps, each of --steps steps is timed by the trainer (tokens/s = global batch
x seq / step time; the median is kept) and the tensor-parallel group's counters are
read: calls per kind (`group.ops`; code without it is counted by wrapping
comm._count, which every collective enters) and bytes per kind (`group.bytes`, comm.py's
convention: each call counts one full logical tensor).

The formula, per step of M micro-batches, L blocks, one activation A = B x S x H x
element size: Megatron's per block and micro-batch (Korthikanti et al. 2022, 4.2.2) is
4 A without tp_sp (2 all-reduces forward, 2 backward) and 8 A with it (each all-reduce
becomes an all-gather and a reduce-scatter, each counted as one A). The embedding and
head add, per micro-batch, 2 A without tp_sp (the embedding's forward all-reduce, the
head input's backward one) and 4 A with it (each of those an all-gather and a
reduce-scatter), the vocab-parallel cross-entropy's all-gather of 2 x B x S x tp
values, and under tp_sp, once per step, the all-reduce of the norm weights' gradients.
Under tp_sp our blocks also re-gather in backward the input they saved as a sequence
shard (2 A per block, as Megatron-LM does for the weight gradient): the "exact" column
adds them and must equal the measurement to the byte.

"Before" (unless --before none): a git worktree of that commit at --worktree, this
script copied into it and run there (so it imports that checkout's megalite), then the
worktree removed. The ratios are after / before, of TP bytes per step and tokens/s.
With --record the section SECTION of BENCHMARKS.md is replaced by both tables.
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megalite.cli import parse_args  # noqa: E402
from megalite.data.build import prepare_default_data  # noqa: E402
from megalite.parallel import comm  # noqa: E402
from megalite.parallel.topology import build_topology, destroy_topology  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

SECTION = "## Tensor parallelism volume (tools/bench_tp.py)"
TP, HIDDEN, LAYERS, SEQ, MICRO = 2, 256, 4, 256, 4
KINDS = ("all_reduce", "all_gather", "reduce_scatter")
MIB = 2 ** 20


def bench_args(cache: Path, run_dir: Path, tp_sp: bool, micro_batches: int) -> list[str]:
    return [f"--model.hidden_size={HIDDEN}", f"--model.num_layers={LAYERS}",
            f"--model.num_heads={HIDDEN // 64}", "--model.num_kv_heads=2",
            "--model.preset=llama", "--model.kernels=torch", f"--train.seq_len={SEQ}",
            f"--train.micro_batch_size={MICRO}",
            f"--train.global_batch_size={MICRO * micro_batches}", "--train.steps=1000",
            "--train.eval_every=0", "--train.recompute=none", "--train.precision=fp32",
            "--log.every=1000", "--checkpoint.every=0", f"--parallel.tp={TP}",
            f"--parallel.tp_sp={tp_sp}", f"--data.cache_dir={cache}", f"--run.dir={run_dir}"]


def _count_calls(tp_group) -> Counter:
    """Calls per kind on `tp_group`: its own `ops` where comm.py has them, else counted
    by wrapping comm._count (the code before `ops` existed)."""
    if hasattr(tp_group, "ops"):
        return tp_group.ops
    calls, count = Counter(), comm._count

    def counting(group, op):
        if group is tp_group and op != "p2p":
            calls[op] += 1
        return count(group, op)

    comm._count = counting
    return calls


def _rank(rank, port, args, opts, out):
    try:
        out.put((rank, _measure_rank(rank, port, args, opts)))
    except BaseException:
        out.put((rank, traceback.format_exc()))
        raise


def _measure_rank(rank, port, args, opts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    cfg, _ = parse_args(args)
    topo = build_topology(tp=TP, timeout_s=600)
    trainer = Trainer(cfg, topo=topo)
    calls = _count_calls(topo.tp_group)
    for _ in range(opts["warmup"]):
        trainer.train_step()
    steps = []
    for _ in range(opts["steps"]):
        topo.reset_bytes()
        calls.clear()
        tokens_per_s = trainer.train_step()["tokens_per_s"]
        steps.append({"tokens_per_s": tokens_per_s, "calls": dict(calls),
                      "bytes": {k: v for k, v in topo.tp_group.bytes.items() if v}})
    norm_params = sum(p.numel() for p in trainer.optimizer.layout.params
                      if getattr(p, "sequence_parallel_grad", False))
    report = {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
              "steps": steps, "elem": trainer.optimizer.model_dtype.itemsize,
              "norm_params": norm_params, "counted_by": "group.ops"
              if hasattr(topo.tp_group, "ops") else "wrapped comm._count"}
    destroy_topology(topo)
    dist.destroy_process_group()
    return report


def measure(cache: Path, tp_sp: bool, opts: dict) -> dict:
    """Rank 0's report of one layout; every step and every rank must agree on the calls
    and bytes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = Path(tempfile.mkdtemp(prefix="megalite_bench_tp_"))
    try:
        args = bench_args(cache, run_dir, tp_sp, opts["micro_batches"])
        procs = [ctx.Process(target=_rank, args=(r, port, args, opts, out)) for r in range(TP)]
        for p in procs:
            p.start()
        reports = dict(out.get(timeout=1800) for _ in procs)
        failed = [r for r in reports.values() if isinstance(r, str)]
        if failed:
            raise SystemExit(f"a rank failed:\n{failed[0]}")
        for p in procs:
            p.join()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    traffic = {(json.dumps(s["calls"], sort_keys=True), json.dumps(s["bytes"], sort_keys=True))
               for r in reports.values() for s in r["steps"]}
    assert len(traffic) == 1, f"tp_sp={tp_sp}: steps or ranks differ: {traffic}"
    report = reports[0]
    report["calls"], report["bytes"] = report["steps"][0]["calls"], report["steps"][0]["bytes"]
    return report


def formula(r: dict, tp_sp: bool, micro_batches: int) -> tuple[int, int]:
    """(Megatron's bytes per step, with our backward re-gathers: what the code moves)."""
    act = MICRO * SEQ * HIDDEN * r["elem"]
    per_block, regather, outside = (8, 2, 4) if tp_sp else (4, 0, 2)
    outside = outside * act + 2 * MICRO * SEQ * TP * r["elem"]  # embedding, head, cross-entropy
    norms = r["norm_params"] * r["elem"] if tp_sp else 0
    megatron = micro_batches * (LAYERS * per_block * act + outside) + norms
    return megatron, megatron + micro_batches * LAYERS * regather * act


def _speed(r: dict) -> str:
    """The median tokens/s, with the slowest and fastest timed step: on a shared machine
    the spread says how much a ratio of two medians can be trusted."""
    each = [s["tokens_per_s"] for s in r["steps"]]
    return f"{r['tokens_per_s']:.0f} ({min(each):.0f}-{max(each):.0f})"


def _calls(r: dict) -> str:
    return " / ".join(str(r["calls"].get(k, 0)) for k in KINDS)


def tables(results: dict, before: dict | None, micro_batches: int) -> str:
    tokens, elem = MICRO * SEQ * micro_batches, results["tp2"]["elem"]
    lines = [f"Llama hidden {HIDDEN}, {LAYERS} layers, seq {SEQ}, micro-batch {MICRO}, "
             f"{micro_batches} micro-batches per step ({tokens} tokens), tp {TP}, dp 1, fp32, "
             f"no recomputation; one activation A = {MICRO * SEQ * HIDDEN * elem / MIB:g} MiB. "
             f"Per step, rank 0 (the ranks agree to the byte).", "",
             "| layout | tokens/s (step range) | calls AR / AG / RS | TP MiB/step | Megatron "
             "formula MiB/step | + re-gathers (exact) | measured = exact |",
             "|---|---|---|---|---|---|---|"]
    for layout, r in results.items():
        megatron, exact = formula(r, layout == "tp2+sp", micro_batches)
        measured = sum(r["bytes"].values())
        lines.append(f"| {layout} | {_speed(r)} | {_calls(r)} | "
                     f"{measured / MIB:.2f} | {megatron / MIB:.2f} | {exact / MIB:.2f} | "
                     f"{'yes' if measured == exact else 'NO'} |")
    if before is None:
        return "\n".join(lines)
    lines += ["", f"Before (commit {before['commit']}, calls counted by "
              f"{next(iter(before['results'].values()))['counted_by']}) and after / before:", "",
              "| layout | before tokens/s (range) | before calls AR / AG / RS | before TP "
              "MiB/step | bytes after / before | tokens/s after / before |",
              "|---|---|---|---|---|---|"]
    for layout, r in results.items():
        b = before["results"][layout]
        measured, was = sum(r["bytes"].values()), sum(b["bytes"].values())
        lines.append(f"| {layout} | {_speed(b)} | {_calls(b)} | {was / MIB:.2f} | "
                     f"{measured / was:.3f}x | {r['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def measure_all(opts: dict) -> dict:
    cache = Path(opts["cache"])
    cfg, _ = parse_args(bench_args(cache, cache / "unused", False, opts["micro_batches"]))
    prepare_default_data(cfg)
    return {layout: measure(cache, tp_sp, opts)
            for layout, tp_sp in (("tp2", False), ("tp2+sp", True))}


def measure_before(commit: str, worktree: Path, opts: dict) -> dict:
    """This script, run on a worktree of `commit`, imports that checkout's megalite."""
    if worktree.exists():
        raise SystemExit(f"{worktree} exists; remove it (git worktree remove --force "
                         f"{worktree}) or pass another --worktree.")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree),
                    commit], check=True)
    try:
        shutil.copy(__file__, worktree / "tools" / "bench_tp.py")
        out = worktree / "bench_tp.json"
        env = {**os.environ, "PYTHONPATH": str(worktree)}
        command = [sys.executable, str(worktree / "tools" / "bench_tp.py"), "--before", "none",
                   "--json", str(out), "--cache", opts["cache"], "--steps", str(opts["steps"]),
                   "--warmup", str(opts["warmup"]), "--micro-batches", str(opts["micro_batches"])]
        done = subprocess.run(command, env=env, cwd=worktree, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the run on {commit} failed:\n{done.stdout}{done.stderr}")
        return {"commit": commit, "results": json.loads(out.read_text())["results"]}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(worktree)], check=False)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(x for x in f if x.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "CPU"


def _checkout() -> str:
    """This checkout's commit, and whether megalite/ differs from it (the "after" run
    measures the working tree)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "megalite"],
                           capture_output=True, text=True).stdout.strip()
    return f"commit {head}" + (" with uncommitted changes in megalite/" if dirty else "")


def notes(results: dict) -> str:
    r = results["tp2+sp"]
    text = f"""Calls and bytes are those of the tensor-parallel group only (comm.py's counters;
the gradient norm's grid reduction goes through other groups). Megatron's formula per block and
micro-batch: 4 A without tp_sp, 8 A with it; outside the blocks, per micro-batch: the
embedding's and the head's mappings (2 A, under tp_sp 4 A), the cross-entropy's
all-gather of 2 x B x S x tp values ({2 * MICRO * SEQ * TP * r['elem'] // 1024} KiB);
under tp_sp, per step, the all-reduce of the norm weights' gradients ({r['norm_params']}
values). The exact column adds the 2 A per block that tp_sp's backward re-gathers (the
blocks save their input as a sequence shard). Before, each column layer mapped the
shared input itself: per block 2 + 5 all-reduces without tp_sp; with it 5 AG + 2 RS
forward, 2 AG + 5 RS backward. Tokens/s: two ranks of one thread each on a machine
shared with other jobs, median of the timed steps (one run per layout, after and before
a minute apart): judge the ratio of tokens/s against the ranges of the steps; the
bytes and calls are exact and the same on every step and rank."""
    return textwrap.fill(" ".join(text.split()), 88, break_on_hyphens=False)


def record(text: str, notes_text: str, command: str) -> None:
    from tools.benchmarks import record_section  # not in the 'before' checkout
    record_section(f"{SECTION}\n\nMeasured {datetime.date.today()} on {socket.gethostname()} "
                   f"({os.cpu_count()} cores of {_cpu()}, gloo, torch {torch.__version__}) with "
                   f"`{command}`; after: {_checkout()}.\n\n{text}\n\n{notes_text}\n")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--micro-batches", type=int, default=4, help="per step")
    parser.add_argument("--before", default="0fc7268",
                        help="commit to measure as 'before', or 'none'")
    parser.add_argument("--worktree", default="/tmp/tp_before", help="where to check it out")
    parser.add_argument("--cache", default=str(ROOT / "data_cache"), help="data cache")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--json", help="write the reports to this file")
    args = parser.parse_args()
    opts = {"steps": args.steps, "warmup": args.warmup, "micro_batches": args.micro_batches,
            "cache": args.cache}
    results = measure_all(opts)
    before = (None if args.before == "none"
              else measure_before(args.before, Path(args.worktree), opts))
    text = tables(results, before, args.micro_batches)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "before": before}))
    if args.record:
        record(text, notes(results), "python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
