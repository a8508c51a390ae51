"""Single-GPU training throughput of a ~1.1B llama: megalite's Trainer against plain PyTorch.

    python tools/bench_gpu_train.py                   # 4 x 2048 tokens, 3 warm-up + 10 timed steps
    python tools/bench_gpu_train.py --micro-batch 8 --steps 20 --sides plain
    python tools/bench_gpu_train.py --record          # also append the table to BENCHMARKS.md
    python tools/bench_gpu_train.py --record OUT/BENCHMARKS.md    # ... or to another file

Model (TinyLlama-1.1B's shape): hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632,
vocabulary 32000, untied head, seq 2048, bf16. One process, one GPU, global batch =
micro-batch (no accumulation), AdamW with clipping at optim.clip_grad on both sides.
The two sides run one after the other; each frees the GPU before the next, and a side
that fails is reported as such while the other still runs (exit code 1).

- megalite: `Trainer(cfg).train_step()` at world size 1 (size-1 groups, no process
  group): model.kernels=triton and model.attention=triton (the fused norm, rotary,
  SwiGLU, flash-attention and cross-entropy kernels), train.precision=bf16 (bf16
  parameters and activations; fp32 gradients, master weights and AdamW moments in the
  ZeRO optimizer, whose step is the Triton AdamW kernel), parallel.zero=1. Data: the
  Trainer reads prepared token files and takes no batches from outside, so it runs on
  the default corpus (Python's stdlib sources, no download; prepared once into
  data_cache/, a few seconds, reused by later runs). Its 4096-token vocabulary lies
  inside the model's 32000 rows (model.vocab_size is set), which changes no shape and
  no FLOP, only which rows of the head get large gradients. Its step includes reading
  the batch from the token files and copying it to the GPU.
- plain: the same model written below as an ordinary nn.Module (`PlainLlama`: RMSNorm,
  rotary embeddings, grouped-query attention through F.scaled_dot_product_attention
  with is_causal=True, SwiGLU MLP, untied head; megalite's parameter names and shapes,
  and with megalite's weights its loss and gradients: tests/test_gpu_check.py) on
  random tokens made on the GPU.
  Mixed precision is torch.autocast(bf16) over fp32 parameters, the standard PyTorch
  recipe: matmuls in bf16, the fp32 parameters are the master weights, gradients fp32,
  torch.optim.AdamW(fused=True), clip_grad_norm_. torch.compile compiles the blocks and
  the final norm + head + loss separately (per-block compilation, as torchtitan does):
  on torch >= 2.5 every block reuses one compiled graph, so compile time does not grow
  with depth, and the fp32 loss over the logits is fused. K/V heads are repeated before
  SDPA, which keeps it on the flash kernel on every torch >= 2.4 (enable_gqa is 2.5+).
  The recipes differ where they are meant to: megalite's residual stream is bf16,
  autocast's fp32.

Both sides count the same FLOPs per token (megalite.training.metrics.flops_per_token)
against the same peak (peak_flops of torch.cuda.get_device_name()), so their MFU
compares. Time is wall time between torch.cuda.synchronize() calls around --steps
steps after --warmup steps (Triton autotuning and torch.compile happen in warm-up).
Every step ends with loss.item() on both sides: the trainer needs it for its step
guard, and a loop that logs its loss does the same. Peak memory is
torch.cuda.max_memory_allocated over warm-up and timed steps (weights, gradients and
optimizer state included). Needs a CUDA GPU; without one it says so and exits 0.
"""

import argparse
import datetime
import gc
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megalite.cli import parse_args  # noqa: E402
from megalite.config import ModelConfig, resolve  # noqa: E402
from megalite.training.metrics import flops_per_token, mfu, peak_flops  # noqa: E402

MODEL = {"hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
         "ffn_hidden_size": 5632, "vocab_size": 32000}
SIDES = ("megalite", "plain")
LABELS = {"megalite": "megalite Trainer (Triton kernels, bf16 params, ZeRO 1)",
          "plain": "plain PyTorch (torch.compile per block, autocast bf16, fused AdamW)"}


def bench_config(micro_batch: int, seq: int, run_dir):
    """The megalite config of the benchmark: configs/tiny.yaml with the 1.1B sizes."""
    overrides = [f"--model.{key}={value}" for key, value in MODEL.items()] + [
        "--model.preset=llama", "--model.tie_embeddings=false", "--model.kernels=triton",
        "--model.attention=triton", f"--train.seq_len={seq}",
        f"--train.micro_batch_size={micro_batch}", f"--train.global_batch_size={micro_batch}",
        "--train.precision=bf16", "--train.device=cuda", "--parallel.zero=1",
        # No validation or checkpoints: only optimizer steps are timed; steps only
        # shapes the LR schedule.
        "--train.steps=1000", "--train.eval_every=0", "--checkpoint.every=0",
        f"--run.dir={run_dir}", f"--data.cache_dir={ROOT / 'data_cache'}"]
    cfg, _ = parse_args([str(ROOT / "configs" / "tiny.yaml"), *overrides])
    return cfg


def model_config(seq: int = 2048) -> ModelConfig:
    """The resolved model config both sides are built from (and FLOPs counted for)."""
    cfg = bench_config(1, seq, ROOT / "runs" / "bench_gpu_train")
    return resolve(cfg, MODEL["vocab_size"], "cuda").model


# ---- the plain PyTorch model ----------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x, cos, sin):
    xf = x.float()  # rotate in fp32, back to the activation dtype for the matmuls
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads = m.num_heads, m.num_kv_heads
        self.head_dim = m.hidden_size // m.num_heads
        kv_width = m.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)
        self.k_proj = nn.Linear(m.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(m.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head i reads KV head i // groups.
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(m.hidden_size, m.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(m.hidden_size, m.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(m.ffn_hidden_size, m.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.attn = Attention(m)
        self.mlp_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.mlp = MLP(m)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainLlama(nn.Module):
    """A llama as one writes it in plain PyTorch; parameter names follow megalite's."""

    def __init__(self, m: ModelConfig, init_std: float = 0.02):
        super().__init__()
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        head_dim = m.hidden_size // m.num_heads
        inv_freq = 1.0 / m.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(m.max_seq_len).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.compiled_block = self.compiled_head = None
        with torch.no_grad():  # small init, so the loss starts near log(vocab)
            for param in self.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, init_std)

    def compile_parts(self) -> None:
        """One torch.compile'd function runs every block, another the head + loss."""
        dynamo = torch._dynamo.config
        # torch >= 2.5 inlines nn.Modules (parameters become graph inputs), so all blocks
        # share one graph; torch 2.4 compiles each block, and past the recompile limit
        # dynamo would silently run the rest eagerly.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), 2 * len(self.layers)))
        self.compiled_block = torch.compile(run_block, fullgraph=True)
        self.compiled_head = torch.compile(self.head_loss, fullgraph=True)

    def head_loss(self, x, targets):
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def forward(self, tokens, targets):
        seq = tokens.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.embed(tokens)
        for block in self.layers:
            x = (self.compiled_block or run_block)(block, x, cos, sin)
        return (self.compiled_head or self.head_loss)(x, targets)


def run_block(block: Block, x, cos, sin):
    return block(x, cos, sin)


# ---- measuring ------------------------------------------------------------------------

def timed_steps(step, warmup: int, steps: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    return {"step_s": (time.perf_counter() - start) / steps, "warmup_s": warmup_s,
            "peak_bytes": torch.cuda.max_memory_allocated(), "loss": loss}


def measure_megalite(args, tmp: Path) -> dict:
    from megalite.data.build import prepare_default_data
    from megalite.training.trainer import Trainer

    start = time.perf_counter()
    cfg = bench_config(args.micro_batch, args.seq, tmp / "megalite")
    prepare_default_data(cfg)
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - start
    result = timed_steps(lambda: trainer.train_step()["loss"], args.warmup, args.steps)
    return {**result, "setup_s": setup_s, "params": trainer.num_params()}


def measure_plain(args, m: ModelConfig) -> dict:
    start = time.perf_counter()
    cfg = bench_config(args.micro_batch, args.seq, "unused")
    o, batch, seq = cfg.optim, args.micro_batch, args.seq
    torch.manual_seed(cfg.train.seed)
    with torch.device("cuda"):
        model = PlainLlama(m, m.init_std)
    model.compile_parts()
    # megalite's decay rule: matrices decay, embeddings and 1-D parameters do not.
    decays = {n: p.dim() >= 2 and "embed" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    rest = [p for n, p in model.named_parameters() if not decays[n]]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    params = list(model.parameters())
    setup_s = time.perf_counter() - start

    def step() -> float:
        tokens = torch.randint(0, m.vocab_size, (batch, seq + 1), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    result = timed_steps(step, args.warmup, args.steps)
    return {**result, "setup_s": setup_s, "params": sum(p.numel() for p in params)}


def summarise(result: dict, tokens_per_step: int, flops: float, peak: float | None) -> dict:
    if "error" in result:
        return result
    tokens_per_s = tokens_per_step / result["step_s"]
    return {**result, "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops, peak)}


HEADER = ("| implementation | params | step (ms) | tokens/s | MFU | peak memory (GiB) | "
          "set-up (s) | warm-up (s) | last loss |\n|---|---|---|---|---|---|---|---|---|")


def row(side: str, r: dict) -> str:
    if "error" in r:
        return f"| {LABELS[side]} | failed: {r['error'][:120]} |  |  |  |  |  |  |  |"
    mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"| {LABELS[side]} | {r['params'] / 1e9:.3f}B | {1e3 * r['step_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {mfu_text} | {r['peak_bytes'] / 2**30:.1f} | "
            f"{r['setup_s']:.0f} | {r['warmup_s']:.0f} | {r['loss']:.3f} |")


def versions() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch {torch.__version__}, triton {triton_version}, CUDA {torch.version.cuda}"


def record_text(args, argv, rows: str, device: str, flops: float, peak: float | None) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = " ".join(["python tools/bench_gpu_train.py", *argv]).strip()
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16 peak" if peak else "no known peak"
    return (f"\n## Training throughput, GPU: {stamp}, {device}\n\n"
            f"Command: `{command}` ({versions()}). One process, llama 1.1B (hidden 2048, 22 "
            f"layers, 32 heads / 4 KV heads, FFN 5632, vocab 32000, untied), seq {args.seq}, "
            f"micro-batch = global batch = {args.micro_batch} ({args.micro_batch * args.seq} "
            f"tokens per step), {args.warmup} warm-up + {args.steps} timed steps. MFU = "
            f"tokens/s x {flops / 1e9:.2f} GFLOP per token (megalite.training.metrics."
            f"flops_per_token) / {peak_text} of the {device}.\n\n{rows}\n\n"
            f"megalite: Trainer.train_step on the default corpus, bf16 parameters and "
            f"activations, fp32 gradients, master weights and moments. plain: the same "
            f"model as a plain nn.Module on random tokens, fp32 parameters under bf16 "
            f"autocast, each block and the head + loss under torch.compile. Set-up: model "
            f"build (and megalite's data and init); warm-up: the first steps, with Triton "
            f"autotuning and torch.compile.\n")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--record", nargs="?", const=str(ROOT / "BENCHMARKS.md"), metavar="PATH",
                        help="append the section to PATH (default BENCHMARKS.md)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_train: no CUDA GPU here; this benchmark times GPU training, so there "
              "is nothing to measure and nothing was written.")
        return 0
    device = torch.cuda.get_device_name()
    m = model_config(args.seq)
    flops, peak = flops_per_token(m, args.seq), peak_flops(device, 0.0)
    print(f"{device}, {versions()}; {flops / 1e9:.2f} GFLOP per token, peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s\n{HEADER}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            try:
                raw = (measure_megalite(args, Path(tmp)) if side == "megalite"
                       else measure_plain(args, m))
            except Exception as error:  # one side failing must not hide the other's numbers
                traceback.print_exc()
                raw = {"error": f"{type(error).__name__}: {error}".replace("|", "/")}
            gc.collect()  # the trainer's hooks hold cycles: free its GPU memory now
            torch.cuda.empty_cache()
            results[side] = summarise(raw, args.micro_batch * args.seq, flops, peak)
            print(row(side, results[side]), flush=True)
    rows = "\n".join([HEADER] + [row(side, r) for side, r in results.items()])
    finished = [r for r in results.values() if "error" not in r]
    if len(finished) == 2 and all(math.isfinite(r["step_s"]) for r in finished):
        ratio = results["megalite"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        rows += f"\n\nmegalite / plain tokens/s: {ratio:.2f}x"
    print("\n" + rows)
    if args.record:
        with open(args.record, "a") as out:
            out.write(record_text(args, argv, rows, device, flops, peak))
        print(f"appended to {args.record}")
    return 0 if len(finished) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
