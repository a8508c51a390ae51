"""Ring attention's block work on one GPU: the flash block kernel against the eager fp32
blocks, time and peak memory of forward + backward.

    python tools/bench_ring.py                       # S/sp = 4096 and 16384 tokens per rank
    python tools/bench_ring.py --local 4096 --record # also put the table in BENCHMARKS.md

A row is one rank's work in one ring step with S/sp local tokens: `ring_attention` over
a one-rank group runs exactly the blocks of step 0 (two diagonal blocks and one full
block of c = S/(2 sp) tokens each), which by the causal load balancing is the work of
every later step too (two full blocks: 2 c^2 visible (query, key) pairs either way),
without the hops. The block kernel is forced with `sequence.BLOCK_KERNEL` ("flash" is
what CUDA runs by default, "eager" the CPU reference). bf16, B = 1, 32 query heads over
8 kv heads, D = 128; when the eager blocks do not fit ([B, Hq, c, c] fp32 scores and
probabilities, several of them alive in backward) both kernels rerun with half the
heads, same GQA ratio, and the row says so. TFLOP/s counts 4 D Hq per visible pair
forward and 2.5x that backward; peak GiB is what forward + backward allocate on top of
q, k, v and the upstream gradient. Needs a CUDA GPU; without one it says so and exits 0
without writing anything.
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

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
KERNELS = ("flash", "eager")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, nargs="+", default=[4096, 16384],
                        help="tokens per rank, S/sp (even: two load-balanced chunks)")
    parser.add_argument("--record", action="store_true", help="write the BENCHMARKS.md section")
    return parser.parse_args(argv)


def step_closure(local, heads, kv_heads):
    """Forward + backward of one rank's ring step, into fresh gradients."""
    from megalite.parallel.sequence import ring_attention
    from megalite.parallel.topology import Group

    solo = Group("sp", (0,), 0, device=torch.device("cuda"))

    def rand(h):
        return torch.randn(1, h, local, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    q, k, v = (rand(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
    grad_out = rand(heads)

    def run():
        out = ring_attention(q, k, v, solo)
        torch.autograd.grad(out, (q, k, v), grad_out)
    return run


def measure(kernel, local, heads, kv_heads):
    """(ms, peak extra GiB) of one ring step with the given block kernel."""
    from triton.testing import do_bench

    from megalite.parallel import sequence

    sequence.BLOCK_KERNEL = kernel
    try:
        run = step_closure(local, heads, kv_heads)
        run()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return do_bench(run, warmup=25, rep=100, return_mode="median"), peak
    finally:
        sequence.BLOCK_KERNEL = "auto"
        torch.cuda.empty_cache()


def measure_row(local):
    """Both kernels at the most heads (from 32 / 8, halving) at which both fit."""
    heads, kv_heads = HEADS, KV_HEADS
    while True:
        try:
            results = {kernel: measure(kernel, local, heads, kv_heads) for kernel in KERNELS}
        except torch.cuda.OutOfMemoryError:
            if kv_heads == 1:
                raise
        else:
            return heads, kv_heads, results
        torch.cuda.empty_cache()  # past the handler: the traceback's tensors are freed
        heads, kv_heads = heads // 2, kv_heads // 2
        print(f"S/sp={local}: out of memory, retrying with {heads} / {kv_heads} heads",
              file=sys.stderr)


def table(rows):
    lines = ["| S/sp | chunk c | heads (q / kv) | blocks | fwd+bwd ms | TFLOP/s | peak GiB "
             "| speed-up vs eager | memory vs eager |", "|" + "---|" * 9]
    for local, heads, kv_heads, results in rows:
        c = local // 2
        flops = 3.5 * 4 * HEAD_DIM * heads * 2 * c * c  # 2 c^2 visible pairs
        eager_ms, eager_gib = results["eager"]
        for kernel in KERNELS:
            ms, gib = results[kernel]
            lines.append(f"| {local} | {c} | {heads} / {kv_heads} | {kernel} | {ms:.2f} | "
                         f"{flops / ms / 1e9:.0f} | {gib:.2f} | {eager_ms / ms:.2f}x | "
                         f"{gib / eager_gib:.3f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("bench_ring: no CUDA GPU here; this benchmark times the ring's GPU block "
              "kernels, so there is nothing to measure and nothing was written.")
        return 0
    odd = [n for n in args.local if n % 2]
    if odd:
        print(f"bench_ring: --local {odd} must be even (two chunks per rank)", file=sys.stderr)
        return 2
    rows = [(local, *measure_row(local)) for local in args.local]
    body = table(rows)
    print(body)
    if args.record:
        from tools.benchmarks import record_section

        given = sys.argv[1:] if argv is None else argv
        command = " ".join(["python tools/bench_ring.py", *given])
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        record_section(
            f"## Ring attention blocks (tools/bench_ring.py)\n\n{stamp}, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}. Command: "
            f"`{command}`\n\nOne rank's ring step (two diagonal blocks and one full block of "
            f"c = S/(2 sp) tokens, bf16, D = {HEAD_DIM}), forward + backward, flash block "
            f"kernel against the eager fp32 blocks; peak GiB on top of the inputs.\n\n"
            f"{body}\n")
        print(f"recorded in {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
