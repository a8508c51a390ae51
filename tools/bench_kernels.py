"""Time the Triton kernels against torch eager and torch.compile on Llama-7B-like shapes.

    python tools/bench_kernels.py                      # 8192 tokens, vocab 32000 and 128256
    python tools/bench_kernels.py --tokens 16384 --only attention cross_entropy
    python tools/bench_kernels.py --record             # also append the table to BENCHMARKS.md
    python tools/bench_kernels.py --only vocab_parallel_ce --vocab 50257   # padded tp 2 shards

Every row is forward + backward (AdamW: one step). The bandwidth column counts the
unavoidable traffic (each input read once, each output written once, forward and
backward) divided by the time, against the ceiling of a large device-to-device copy;
attention reports TFLOP/s (causal: half the S^2 matmul work, backward 2.5x forward)
against a large bf16 matmul. Cross-entropy also reports the peak memory one
forward + backward adds on top of the logits.

vocab_parallel_ce is the loss of a head under tp 2, in one process: the vocabulary
padded to a multiple of 2 * --pad-multiple and split in two [tokens, padded/2] shards,
each rank's forward + backward in turn, with a no-op combine (one process, so no
collective is timed). Its time is both ranks' work (compare the cross_entropy row of
the whole vocabulary); its peak memory is one rank's, since a rank's gradient is freed
before the next rank runs. "eager" there is megalite's torch path
(megalite.parallel.tensor.vocab_parallel_cross_entropy on a one-member group), not
compiled: megalite does not compile its loss.

Needs a CUDA GPU; without one it says so and exits 0 without writing anything.
"""

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import torch  # noqa: E402

DEVICE = "cuda"
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 4096, 11008, 32, 8, 128
ADAMW_ELEMENTS = 256 * 2**20
KERNELS = ("rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "cross_entropy",
           "vocab_parallel_ce", "attention", "adamw")
# Rows whose peak memory is also reported, and rows without a torch.compile column.
MEMORY_ROWS = ("cross_entropy", "vocab_parallel_ce")
NOT_COMPILED = ("vocab_parallel_ce",)
TP = 2  # the tensor-parallel size the vocab_parallel_ce rows split the vocabulary over


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192,
                        help="tokens per batch (4096-16384 for the 7B-like shapes)")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length for attention")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--pad-multiple", type=int, default=128,
                        help="vocab_parallel_ce pads the vocabulary to a multiple of "
                             f"{TP} * this (parallel.vocab_pad_multiple)")
    parser.add_argument("--only", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    return parser.parse_args(argv)


def fwd_bwd(fn, inputs, grad_out=None):
    """A closure running fn(*inputs) and its backward into fresh gradients."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    cached = list(grad_out) if grad_out is not None else None

    def run():
        nonlocal cached
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if cached is None:  # one fixed upstream gradient per output (None for a loss)
            cached = [None if o.dim() == 0 else torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, leaves, cached)
    return run


def time_ms(run):
    from triton.testing import do_bench
    run()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return do_bench(run, warmup=25, rep=100, return_mode="median")


def peak_extra_gib(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def vocab_parallel_case(tokens, vocab, pad_multiple):
    """The vocab_parallel_ce row of one vocabulary: (shape, impls, make_run, padded).

    Each impl is fn(shard, targets, vocab_start, vocab_size) -> this rank's loss.
    """
    from kernels import triton_ops
    from megalite.parallel import comm, tensor

    padded = tensor.padded_vocab_size(vocab, TP, pad_multiple)
    width = padded // TP
    # Both ranks' shards of one problem; padding columns hold zeros as the head's do.
    logits = torch.randn(tokens, padded, device=DEVICE, dtype=torch.bfloat16)
    logits[:, vocab:] = 0
    shards = [logits[:, r * width:(r + 1) * width].clone().requires_grad_()
              for r in range(TP)]
    del logits
    targets = torch.randint(0, vocab, (tokens,), device=DEVICE)
    alone = comm.Group("tp", (0,), 0, None, torch.device(DEVICE))  # no-op collectives

    def triton(shard, targets, start, vocab_size):
        return triton_ops.vocab_parallel_cross_entropy(
            shard, targets, start, lambda x, op: x, vocab_size=vocab_size)

    def eager(shard, targets, start, vocab_size):
        return tensor.vocab_parallel_cross_entropy(shard, targets, alone, start, vocab_size)

    def make_run(fn):
        runs = [fwd_bwd(fn, (shard, targets, r * width, vocab))
                for r, shard in enumerate(shards)]
        return lambda: [run() for run in runs]

    shape = f"tp {TP}: {TP} x [{tokens}, {width}], vocab {vocab}"
    return shape, {"triton": triton, "eager": eager}, make_run, padded


def ceilings():
    from triton.testing import do_bench
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = do_bench(lambda: a @ a, return_mode="median")
    return 2 * 2**30 / copy_ms / 1e6, 2 * 8192**3 / mm_ms / 1e9  # GB/s, TFLOP/s


def cases(args):
    """Yields (name, shape, {label: fn}, make_run, work, unit); work in GB or TFLOP.

    make_run(fn) returns the closure that is timed: forward + backward, or one step.
    """
    from kernels import reference, triton_ops
    from kernels.adamw import adamw_step_reference

    dev, bf16, t = DEVICE, torch.bfloat16, args.tokens

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=bf16).requires_grad_()

    def pair(name):
        return {"triton": getattr(triton_ops, name), "eager": getattr(reference, name)}

    def training(*inputs, grad_out=None):
        return lambda fn: fwd_bwd(fn, inputs, grad_out)

    def gb(elements, passes, size=2):
        return elements * passes * size / 1e9

    if "rms_norm" in args.only:
        yield ("rms_norm", f"[{t}, {HIDDEN}]", pair("rms_norm"),
               training(rand(t, HIDDEN), rand(HIDDEN), 1e-5), gb(t * HIDDEN, 5), "GB/s")
    if "layer_norm" in args.only:
        yield ("layer_norm", f"[{t}, {HIDDEN}]", pair("layer_norm"),
               training(rand(t, HIDDEN), rand(HIDDEN), rand(HIDDEN), 1e-5),
               gb(t * HIDDEN, 5), "GB/s")
    batch = max(1, t // args.seq)
    heads = f"[{batch}, {HEADS}, {args.seq}, {HEAD_DIM}], {KV_HEADS} kv heads"
    if "rotary" in args.only:
        q, k = rand(batch, HEADS, args.seq, HEAD_DIM), rand(batch, KV_HEADS, args.seq, HEAD_DIM)
        angles = torch.randn(args.seq, HEAD_DIM, device=dev)
        yield ("rotary", "q " + heads, pair("rotary"),
               training(q, k, angles.cos(), angles.sin(),
                        grad_out=(torch.randn_like(q), torch.randn_like(k))),
               gb(q.numel() + k.numel(), 4), "GB/s")
    if "swiglu" in args.only:
        yield ("swiglu", f"[{t}, {FFN}] x2", pair("swiglu"),
               training(rand(t, FFN), rand(t, FFN)), gb(t * FFN, 8), "GB/s")
    if "gelu" in args.only:
        yield ("gelu", f"[{t}, {4 * HIDDEN}]", pair("gelu"), training(rand(t, 4 * HIDDEN)),
               gb(t * 4 * HIDDEN, 5), "GB/s")
    if "cross_entropy" in args.only:
        for vocab in args.vocab:
            targets = torch.randint(0, vocab, (t,), device=dev)
            # Unavoidable: read the logits once, write their gradient once.
            yield ("cross_entropy", f"[{t}, {vocab}]", pair("cross_entropy"),
                   training(rand(t, vocab), targets), gb(t * vocab, 2), "GB/s")
    if "vocab_parallel_ce" in args.only:
        for vocab in args.vocab:
            shape, impls, make_run, padded = vocab_parallel_case(t, vocab, args.pad_multiple)
            # As cross_entropy: read the logits once, write their gradient once.
            yield "vocab_parallel_ce", shape, impls, make_run, gb(t * padded, 2), "GB/s"
    if "attention" in args.only:
        q = rand(batch, HEADS, args.seq, HEAD_DIM)
        k, v = (rand(batch, KV_HEADS, args.seq, HEAD_DIM) for _ in range(2))
        fwd_flops = 4 * batch * HEADS * args.seq ** 2 * HEAD_DIM / 2
        yield ("attention", "q " + heads, pair("attention"), training(q, k, v),
               3.5 * fwd_flops / 1e12, "TFLOP/s")
    if "adamw" in args.only:
        n = ADAMW_ELEMENTS
        # param, grad, exp_avg, exp_avg_sq (non-negative), then the hyper-parameters.
        step_args = ([torch.randn(n, device=dev) for _ in range(3)]
                     + [torch.rand(n, device=dev), 3e-4, 0.9, 0.95, 1e-8, 0.1, 10])
        yield ("adamw", f"{n // 2**20}M fp32",
               {"triton": triton_ops.adamw_step, "eager": adamw_step_reference},
               lambda fn: (lambda: fn(*step_args)), gb(n, 7, 4), "GB/s")


def measure(args, bandwidth_gbs, matmul_tflops):
    rows, memory_rows = [], []
    for name, shape, impls, make_run, work, unit in cases(args):
        if not args.no_compile and name not in NOT_COMPILED:
            impls["compile"] = torch.compile(impls["eager"])
        times = {}
        for label, fn in impls.items():
            run = make_run(fn)
            try:
                times[label] = time_ms(run)
                if name in MEMORY_ROWS:
                    memory_rows.append((shape, label, peak_extra_gib(run)))
            except Exception as error:  # a compile failure should not hide the other rows
                print(f"{name} {label}: {type(error).__name__}: {error}", file=sys.stderr)
                times[label] = None
        ceiling = matmul_tflops if unit == "TFLOP/s" else bandwidth_gbs
        rate = work / (times["triton"] / 1e3) if times["triton"] else None
        rows.append((name, shape, times, rate, unit, ceiling))
        torch.cuda.empty_cache()
    return rows, memory_rows


def fmt(value, spec, suffix=""):
    return "n/a" if value is None else format(value, spec) + suffix


def table(rows, memory_rows, bandwidth_gbs, matmul_tflops):
    lines = [f"Ceilings: copy {bandwidth_gbs:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s.",
             "", "| kernel | shape | triton ms | eager ms | compile ms | triton rate | "
             "% of ceiling | vs eager | vs compile |", "|" + "---|" * 9]
    for name, shape, times, rate, unit, ceiling in rows:
        tri = times["triton"]
        speed = {k: (times[k] / tri if tri and times.get(k) else None)
                 for k in ("eager", "compile")}
        lines.append(f"| {name} | {shape} | {fmt(tri, '.3f')} | {fmt(times.get('eager'), '.3f')} "
                     f"| {fmt(times.get('compile'), '.3f')} | {fmt(rate, '.0f', ' ' + unit)} "
                     f"| {fmt(rate and 100 * rate / ceiling, '.0f')} "
                     f"| {fmt(speed['eager'], '.2f', 'x')} | {fmt(speed['compile'], '.2f', 'x')} |")
    if memory_rows:
        lines += ["", "Cross-entropy peak memory added by forward + backward (bf16 logits "
                  f"already allocated; the tp {TP} rows: one rank's):", "",
                  "| shape | impl | peak GiB |", "|---|---|---|"]
        lines += [f"| {shape} | {label} | {peak:.2f} |" for shape, label, peak in memory_rows]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; these benchmarks time GPU kernels, so there "
              "is nothing to measure and nothing was written.")
        return 0
    bandwidth_gbs, matmul_tflops = ceilings()
    rows, memory_rows = measure(args, bandwidth_gbs, matmul_tflops)
    body = table(rows, memory_rows, bandwidth_gbs, matmul_tflops)
    print(body)
    if args.record:
        given = sys.argv[1:] if argv is None else argv
        command = "python tools/bench_kernels.py " + " ".join(given)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        header = (f"\n## Kernels: {stamp}, {torch.cuda.get_device_name()}\n\n"
                  f"Command: `{command.strip()}` (torch {torch.__version__})\n\n")
        with open(ROOT / "BENCHMARKS.md", "a") as out:
            out.write(header + body + "\n")
        print(f"appended to {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
