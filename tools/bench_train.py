"""Single-process CPU training throughput: megalite's Trainer against a plain PyTorch loop.

    python tools/bench_train.py [--models tiny,100m] [--warmup 2] [--steps N]
                                [--max-seconds 90] [--threads T] [--record]

For each model, two trainings run side by side in this process from the same
initial weights on the same batches:

- megalite: `Trainer(cfg).train_step()` at world size 1 (size-1 groups, no process
  group): sampler, ZeRO-0 flat buffers and gradient hooks, global-norm clipping, the
  flat AdamW, the step guard; no validation, checkpoints or metrics files.
- plain: the textbook loop on the same `megalite.model.transformer.Transformer` (built and
  initialised the same way): `loss / m` backward per micro-batch into `.grad`,
  `clip_grad_norm_`, `torch.optim.AdamW` with the same LR schedule and decay groups.

Warm-up steps are left out; timing stops early, after at least 3 steps, once a model
has used --max-seconds. Steps alternate megalite/plain, swapping which goes first
every step (ABBA), so a burst of load from other processes hits both alike; each side
reports its median step time. The overhead is the median over step pairs of
megalite's time / plain's time, minus 1 (target: within 5%), in wall time and in this
process's CPU time (steadier on a shared machine). The losses of the two must agree
to fp32 rounding: that shows both did the same work. `--record` replaces the
"Training throughput, CPU" section of BENCHMARKS.md. On a machine shared with other
jobs, `--threads 1` avoids the collapse of multi-threaded ops on oversubscribed cores.

Models: `tiny` is configs/tiny.yaml as is; `100m` is a llama of ~98M parameters
(hidden 768, 12 layers, 12 heads, vocabulary padded to 8192) at seq 128, micro-batch
2, global batch 4 (two micro-batches, so gradient accumulation is timed too).
"""

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megalite.cli import parse_args, run_main  # noqa: E402
from megalite.config import resolve  # noqa: E402
from megalite.data.build import build_data, prepare_default_data  # noqa: E402
from megalite.data.sampler import BatchSampler  # noqa: E402
from megalite.optim.schedule import LRSchedule  # noqa: E402
from megalite.model.build import build_model  # noqa: E402
from megalite.parallel.topology import build_topology  # noqa: E402
from megalite.training.trainer import Trainer  # noqa: E402

SECTION = "## Training throughput, CPU"
MIN_TIMED = 3  # timed steps per side kept even past --max-seconds
# name -> (config overrides on top of configs/tiny.yaml, default timed steps)
MODELS = {
    "tiny": ([], 20),
    "100m": (["--model.hidden_size=768", "--model.num_layers=12", "--model.num_heads=12",
              "--model.num_kv_heads=12", "--model.vocab_size=8192", "--train.seq_len=128",
              "--train.micro_batch_size=2", "--train.global_batch_size=4"], 5),
}


def bench_config(model: str, run_dir: Path):
    # No validation or checkpoints: the bench times optimizer steps only. steps only
    # shapes the LR schedule, which both sides share.
    args = [str(ROOT / "configs" / "tiny.yaml"), *MODELS[model][0], "--train.steps=1000",
            "--train.eval_every=0", "--checkpoint.every=0", f"--run.dir={run_dir}",
            f"--data.cache_dir={ROOT / 'data_cache'}"]
    cfg, _ = parse_args(args)
    return cfg


class PlainLoop:
    """The same model, batches and LR as the trainer's, with nothing of the trainer."""

    def __init__(self, cfg):
        self.data = build_data(cfg)
        resolve(cfg, self.data.vocab_size, "cpu")
        torch.manual_seed(cfg.train.seed)  # as the trainer does before building the model
        self.model = build_model(cfg, build_topology(), "cpu")
        o, t = cfg.optim, cfg.train
        decay = [p for n, p in self.model.named_parameters()
                 if p.ndim >= 2 and (o.decay_embeddings or "embed" not in n)]
        rest = [p for p in self.model.parameters() if all(p is not q for q in decay)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.schedule = LRSchedule.from_config(cfg)
        self.sampler = BatchSampler(len(self.data.train), t.global_batch_size, t.seed, 0, 1)
        self.mbs, self.clip, self.step = t.micro_batch_size, o.clip_grad, 0

    def train_step(self) -> float:
        self.step += 1
        for group in self.opt.param_groups:
            group["lr"] = self.schedule(self.step)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        indices = self.sampler.next_indices()
        micro = [indices[i:i + self.mbs] for i in range(0, len(indices), self.mbs)]
        loss_sum = torch.zeros(())
        for chunk in micro:
            rows = torch.from_numpy(np.stack([self.data.train[i] for i in chunk]))
            loss = self.model(rows[:, :-1], rows[:, 1:]) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip or float("inf"))
        self.opt.step()
        return loss_sum.item()


def measure(model: str, warmup: int, steps: int, max_seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(model, Path(tmp) / "run")
        prepare_default_data(cfg)
        trainer = Trainer(cfg)
        plain = PlainLoop(bench_config(model, Path(tmp) / "plain"))
        sides = {"megalite": lambda: trainer.train_step()["loss"], "plain": plain.train_step}
        wall = {name: [] for name in sides}
        cpu = {name: [] for name in sides}
        losses = {name: [] for name in sides}
        deadline = time.perf_counter() + max_seconds
        for i in range(warmup + steps):
            if i >= warmup + MIN_TIMED and time.perf_counter() > deadline:
                break
            order = ("megalite", "plain") if i % 2 == 0 else ("plain", "megalite")
            for name in order:
                gc.collect()  # outside the timed region: neither side pays the other's garbage
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = sides[name]()
                if i >= warmup:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                    losses[name].append(loss)
        tokens = cfg.train.global_batch_size * cfg.train.seq_len
        ratios = [m / p for m, p in zip(wall["megalite"], wall["plain"])]
        # CPU time of this process: unlike wall time it does not grow while other jobs
        # hold the cores, so on a shared machine it is the steadier measure of the work.
        cpu_ratios = [m / p for m, p in zip(cpu["megalite"], cpu["plain"])]
        return {"model": model, "params": trainer.num_params(), "tokens": tokens,
                "steps": len(ratios),
                "megalite_s": statistics.median(wall["megalite"]),
                "plain_s": statistics.median(wall["plain"]),
                "overhead": statistics.median(ratios) - 1,
                "ratio_range": (min(ratios) - 1, max(ratios) - 1),
                "cpu_overhead": statistics.median(cpu_ratios) - 1,
                "loss_diff": max(abs(a - b) for a, b in zip(losses["megalite"], losses["plain"]))}


def table(results: list[dict]) -> str:
    rows = ["| model | params | tokens/step | timed steps | megalite step (s) | plain step (s) | "
            "megalite tokens/s | plain tokens/s | overhead, wall (min..max) | overhead, CPU time "
            "| max loss diff |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        low, high = r["ratio_range"]
        rows.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['steps']} | "
                    f"{r['megalite_s']:.3f} | {r['plain_s']:.3f} | "
                    f"{r['tokens'] / r['megalite_s']:,.0f} | {r['tokens'] / r['plain_s']:,.0f} | "
                    f"{100 * r['overhead']:+.1f}% ({100 * low:+.0f}%..{100 * high:+.0f}%) | "
                    f"{100 * r['cpu_overhead']:+.1f}% | {r['loss_diff']:.1e} |")
    return "\n".join(rows)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(path: Path, text: str, command: str, loads: tuple) -> None:
    """Replace (or append) the section in `path`; other sections stay as they are."""
    threads = torch.get_num_threads()
    body = (f"{SECTION}\n\n"
            f"Measured {datetime.date.today()} with `{command}`. Device: {cpu_name()}, "
            f"{os.cpu_count()} cores, {threads} torch thread{'s' * (threads != 1)}, torch "
            f"{torch.__version__}, fp32, one process. The machine was shared with other "
            f"jobs (load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end), "
            f"so the numbers are noisy; re-run on a quiet machine for reference values.\n\n"
            f"{text}\n\n"
            f"Step times are medians over the timed steps (warm-up left out); the overhead "
            f"is the median over step pairs of megalite / plain - 1 (wall time, with the "
            f"range over pairs, and this process's CPU time, which other jobs disturb less); "
            f"the loss difference shows both loops did the same work.\n")
    from tools.benchmarks import record_section
    record_section(body, path)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,100m",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--steps", type=int, help="timed steps per side (default per model)")
    parser.add_argument("--max-seconds", type=float, default=90.0,
                        help=f"per model: stop timing once this is spent (at least "
                             f"{MIN_TIMED} timed steps), which bounds the run on a busy machine")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--record", action="store_true",
                        help=f"write the table to BENCHMARKS.md ('{SECTION[3:]}')")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    results = []
    for model in models:
        results.append(measure(model, args.warmup, args.steps or MODELS[model][1],
                               args.max_seconds))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    loads.append(os.getloadavg()[0])
    text = table(results)
    print("\n" + text)
    if args.record:
        record(ROOT / "BENCHMARKS.md", text, "python tools/bench_train.py " + " ".join(argv), tuple(loads))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
