"""Peak memory per rank under ZeRO 0-3 (and hybrid sharding), next to the ZeRO formula.

    python tools/bench_memory.py [--dp 4] [--hidden 768] [--layers 8] [--precision fp32]
                                 [--zero 0 1 2 3] [--record] [--json FILE]

For each ZeRO stage (and ZeRO 3 with parallel.zero_shard = dp / 2: hybrid sharding),
dp gloo processes start the way the trainer does (the model on the meta device, each
rank's buffers filled with its own shards: sharded start-up), then train a llama
(hidden x layers, vocabulary 8192) for 3 steps on random tokens through the project's
ZeroOptimizer. Per rank (rank 0; the ranks agree to the byte): the bytes of
parameters, gradients and optimizer state the optimizer holds (measured from its
tensors); the ZeRO paper's formula (Psi parameters of this rank, N = the ranks a shard
spans; fp32: 4 + 4 + 8 bytes per parameter, bf16/fp16: 2 + grad_dtype + 12, each term
divided by N where the stage shards it) plus the bucket padding; the estimator's total
for a step (planning/estimate.py: state + activations + buffers); and, as the kernel
sees it (VmHWM from /proc/self/status, reset through /proc/self/clear_refs; tracemalloc
does not see tensor storage; the workers run with MALLOC_MMAP_THRESHOLD_=65536 so that
freed tensors leave the process at once), the start-up peak (above the resident size before the
model is built, after a warm-up forward/backward of a one-layer model pages in torch's
code) and the step peak (steps 2-3, above the same base; step 1 pages in the
collectives' and optimizer's code); before the steps, the peaks of a checkpoint save
and of a load of it, as the trainer does them (format 3: checkpoint/sharding.py; the
largest over the ranks: dp x sp rank 0 also writes the model weights), with what each
adds above the resident size before it. Target:
start-up, save and load peaks <= the step peak on every rank, under every stage. With --record the table goes into BENCHMARKS.md; --json writes the reports.
On a GPU (--device cuda) the CUDA peaks are reported too.
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megalite.checkpoint.sharding import load_trainer_state, save_trainer_state  # noqa: E402
from megalite.config import load_config, resolve  # noqa: E402
from megalite.optim.zero import ZeroOptimizer  # noqa: E402
from megalite.model.build import build_meta_model, build_model, parameter_init  # noqa: E402
from megalite.planning.estimate import estimate, prepare  # noqa: E402
from megalite.parallel.topology import build_topology, destroy_topology  # noqa: E402

VOCAB, SEQ, MICRO = 8192, 128, 2
MIB = 2 ** 20


def _status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _rank(rank, world, port, args, zero, shard, out):
    try:
        _measure_rank(rank, world, port, args, zero, shard, out)
    except BaseException:
        out.put((rank, traceback.format_exc()))
        raise


def _measure_rank(rank, world, port, args, zero, shard, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    overrides = {"model.hidden_size": args.hidden, "model.num_layers": args.layers,
                 "model.num_heads": args.hidden // 64, "model.vocab_size": VOCAB,
                 "model.kernels": "torch", "train.seq_len": SEQ, "train.micro_batch_size": MICRO,
                 "train.global_batch_size": MICRO * world, "train.precision": args.precision,
                 "parallel.dp": world, "parallel.zero": zero, "parallel.zero_shard": shard,
                 "parallel.bucket_mb": 25}
    cfg = load_config(None, [(k, str(v)) for k, v in overrides.items()])
    resolve(cfg, VOCAB, args.device)
    topo = build_topology(dp=world, timeout_s=600, zero_shard=shard)
    # Warm up on a one-layer copy first: the first forward/backward pages in torch's
    # kernels (~200 MiB of code on this machine), which is not the model's memory.
    small = load_config(None, [*((k, str(v)) for k, v in overrides.items()),
                               ("model.num_layers", "1"), ("model.hidden_size", "64"),
                               ("model.num_heads", "2")])
    resolve(small, VOCAB, args.device)
    warm = build_model(small, topo, args.device)
    warm(*(lambda t: (t[:, :-1], t[:, 1:]))(torch.randint(0, VOCAB, (MICRO, SEQ + 1)))).backward()
    del warm
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        torch.cuda.reset_peak_memory_stats()
    base = _status_bytes("VmRSS")
    _reset_peak()
    # the trainer's start-up: a meta model, each rank filling only what it holds
    model = build_meta_model(cfg, topo)
    opt = ZeroOptimizer(model, cfg, topo, init=parameter_init(model, cfg))
    built = _status_bytes("VmHWM") - base
    cuda_built = torch.cuda.max_memory_allocated() if cuda else None
    report = {"peak_build": built}
    # A checkpoint save and a load of it, as the trainer does them (format 3), before
    # any step: so their peaks stand on the state alone, like the start-up's.
    trainer = SimpleNamespace(topo=topo, optimizer=opt, cfg=cfg, step=0,
                              ckpt_dir=args.ckpt_dir, device=args.device)

    def peak_of(what, action):
        before = _status_bytes("VmRSS")
        _reset_peak()
        began = time.perf_counter()
        result = action()
        report[f"{what}_s"] = time.perf_counter() - began
        report[f"peak_{what}"] = _status_bytes("VmHWM") - base
        report[f"{what}_transient"] = _status_bytes("VmHWM") - before
        return result

    path = peak_of("save", lambda: save_trainer_state(trainer, {}))
    peak_of("load", lambda: load_trainer_state(trainer, path))
    g = torch.Generator().manual_seed(rank)
    for step in range(3):
        if step == 1:  # the first step pages in the collectives' and optimizer's code
            resident = _status_bytes("VmRSS")
            _reset_peak()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g).to(args.device)
        opt.zero_grad()
        with opt.micro_batch(is_last=True):
            opt.scale_loss(model(tokens[:, :-1], tokens[:, 1:])).backward()
        opt.prepare_step()
        opt.step(1e-4)
    report.update(opt.memory_report())
    peak = _status_bytes("VmHWM")
    report["peak_step"] = peak - base
    report["step_transient"] = peak - resident
    report["largest_bucket_bytes"] = (max(b.size for b in opt.layout.buckets)
                                      * opt.model_dtype.itemsize)
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(path).iterdir())
    report["estimate_total"] = estimate(prepare(cfg))["memory_bytes"]["total"]
    report["cuda_peak_build"] = cuda_built
    report["cuda_peak_step"] = torch.cuda.max_memory_allocated() if cuda else None
    destroy_topology(topo)
    dist.destroy_process_group()
    out.put((rank, report))


def measure(args, zero, shard=0):
    args.ckpt_dir = tempfile.mkdtemp(prefix="megalite_bench_memory_")
    try:
        return _measure(args, zero, shard)
    finally:
        shutil.rmtree(args.ckpt_dir, ignore_errors=True)


def _measure(args, zero, shard):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, args.dp, port, args, zero, shard, out))
             for r in range(args.dp)]
    for p in procs:
        p.start()
    reports = dict(out.get(timeout=1800) for _ in procs)
    failed = [r for r in reports.values() if isinstance(r, str)]
    if failed:
        raise SystemExit(f"a rank failed:\n{failed[0]}")
    for p in procs:
        p.join()
    return reports


def _worst(reports: dict, what: str) -> str:
    """The largest peak of `what` over the ranks, with its transient above the resident
    size before it."""
    r = max(reports.values(), key=lambda x: x[f"peak_{what}"])
    return f"{r[f'peak_{what}'] / MIB:.1f} ({r[f'{what}_transient'] / MIB:.1f})"


def table(args, results) -> str:
    first = next(iter(results.values()))[0]
    lines = [f"Llama hidden {args.hidden}, {args.layers} layers, vocab {VOCAB} "
             f"(Psi = {first['psi']:,} parameters), dp = {args.dp}, {args.precision}, "
             f"micro-batch {MICRO} x {SEQ} tokens. MiB per rank (rank 0; all ranks equal "
             f"to the byte).", "",
             "| zero | shard (x replicas) | params | grads | optimizer | total | formula "
             "(+ padding) | estimator | start-up peak | step peak | step transient | save "
             "peak (transient) | load peak (transient) | <= step | CUDA start-up / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (zero, shard), reports in results.items():
        r = reports[0]
        formula = sum(r[f"{t}_formula_bytes"] for t in ("params", "grads", "optimizer"))
        padding = sum(r[f"{t}_padding_bytes"] for t in ("params", "grads", "optimizer"))
        cuda = (f"{r['cuda_peak_build'] / MIB:.1f} / {r['cuda_peak_step'] / MIB:.1f}"
                if r["cuda_peak_step"] else "n/a")
        worst = max(max(x["peak_build"], x["peak_save"], x["peak_load"]) - x["peak_step"]
                    for x in reports.values())
        ok = "yes" if worst <= 0 else f"NO (+{worst / MIB:.1f})"
        lines.append(f"| {zero} | {r['shards']} (x{r['replicas']}) | "
                     f"{r['params_bytes'] / MIB:.1f} | {r['grads_bytes'] / MIB:.1f} | "
                     f"{r['optimizer_bytes'] / MIB:.1f} | {r['total_bytes'] / MIB:.1f} | "
                     f"{formula / MIB:.1f} (+{padding / MIB:.3f}) | "
                     f"{r['estimate_total'] / MIB:.1f} | {r['peak_build'] / MIB:.1f} | "
                     f"{r['peak_step'] / MIB:.1f} | {r['step_transient'] / MIB:.1f} | "
                     f"{_worst(reports, 'save')} | {_worst(reports, 'load')} | {ok} | "
                     f"{cuda} |")
    return "\n".join(lines)


NOTES = """Parameters, gradients and optimizer state are the ZeRO paper's terms for this
layout to the byte (no padding at this size). Start-up is sharded: the model is built
on the meta device and each rank allocates and fills only what it holds (the values
drawn INIT_PIECE elements at a time), so its peak is its state plus a few MiB, under
every stage; before, every rank built the whole local model in fp32 and a full fp32
flat copy (set-up peak 649 MiB under ZeRO 3 at dp 4 for 234 MiB of state, 2026-11-21).
The save and the load run before the steps, on the state alone. A format 3 save adds
what one bucket costs: under ZeRO 3, dp x sp rank 0 gathers one unit at a time for the
model weights (the embedding/head unit, 48 MiB here) and serialises it (as much
again); the optimizer state is written from the owners' buffers without a gather. A
load adds one bucket's file and box. Neither depends on the model size; before format
3 every save all-gathered every Adam moment (8 bytes per local parameter here) on
every rank. The step peak (steps 2-3) is the state plus activations, ZeRO 3's gathered
units and the in-flight buckets; the estimator's total is within 10% of it under ZeRO
3. Hybrid sharding (shard 2, two replicas) holds what full sharding at dp 2 holds."""


def record(text: str, command: str) -> None:
    from tools.benchmarks import record_section
    record_section(f"## ZeRO memory per rank (tools/bench_memory.py)\n\nMeasured "
                   f"{datetime.date.today()} on {socket.gethostname()} ({os.cpu_count()} CPU "
                   f"cores, gloo) with `{command}`.\n\n{text}\n\n{NOTES}\n")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--json", help="write every rank's report to this file")
    args = parser.parse_args()
    # glibc's dynamic mmap threshold keeps freed buffers of a few MiB in the heap, so the
    # high-water mark would measure the allocator's history rather than the live tensors:
    # the workers (spawned, so they inherit it) return every buffer over 64 KiB at once.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    runs = [(zero, 0) for zero in args.zero]
    if 3 in args.zero and args.dp >= 4 and args.dp % 2 == 0:
        runs.append((3, args.dp // 2))  # hybrid: shards over half the ranks, two replicas
    results = {run: measure(args, *run) for run in runs}
    for run, reports in results.items():
        totals = {r["total_bytes"] for r in reports.values()}
        assert len(totals) == 1, f"zero {run}: ranks differ {totals}"
    text = table(args, results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"zero": z, "zero_shard": s, "ranks": reports} for (z, s), reports in results.items()]))
    if args.record:
        record(text, "python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
