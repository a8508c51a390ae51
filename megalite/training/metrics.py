"""Training metrics: model FLOPs and MFU, memory, the metrics files and the console line.

- `flops_per_token` counts the model FLOPs of one token (forward + backward), the
  numerator of MFU; recomputation is deliberately not counted (that would be
  hardware FLOPs, which flatter a run that recomputes).
- `PEAK_TFLOPS` / `peak_flops` give the denominator. A device we do not know (a CPU,
  an unlisted GPU) has no peak unless the config gives one: MFU is then absent
  rather than made up.
- `MetricsLogger` writes `metrics.jsonl` and `metrics.csv` in the run directory, the
  files users, tools/plot and tests read (see DESIGN.md "Contracts"). Only one
  process writes them; the others build a logger with `enabled=False`. On request it
  also sends every record's numbers to TensorBoard (`<run_dir>/tensorboard`) and/or
  Weights & Biases. Neither package is a dependency: asking for a sink whose package
  is missing is a ConfigError when the logger is built, on every rank, before any
  step runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
from pathlib import Path

import torch

from megalite.errors import ConfigError

# Vendor dense (no structured sparsity) bf16 tensor-core peaks per device, in TFLOP/s
# (V100: fp16, it has no bf16). Matched as case-insensitive substrings of
# torch.cuda.get_device_name() in this order, so specific names come before names
# they contain ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM; its device name carries no form factor ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
}

COLUMNS = ("step", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_time",
           "mfu", "mem_rss", "mem_gpu_alloc", "mem_gpu_peak", "skipped", "hostname", "device")


def flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs per token for one forward + backward pass, without recomputation.

    With h = hidden_size, l = num_layers, s = seq_len, V = vocab_size, f = ffn size,
    d = h / num_heads and kv = num_kv_heads:

        flops = 6 * N + 12 * l * s * h
        N = l * (2*h*h + 2*h*kv*d + m*h*f) + h*V

    N counts every matmul weight: q and output projections (h x h each), k and v
    projections (h x kv*d each: smaller under grouped-query attention), the MLP
    (m = 3 matrices for SwiGLU in the llama preset, 2 for gpt2's GELU MLP) and the
    lm_head (h x V, a matmul even when tied to the embedding). Embedding lookups,
    norms and biases are not matmuls and are left out. A weight costs 2 FLOPs per
    token forward and 4 backward (input and weight gradients): 6 * N.
    Attention scores QK^T and the weighted sum AV cost 2*s*h FLOPs each per token and
    layer forward, counted over the full s as Narayanan et al. (2021) do although
    causal masking could skip half: 4*s*h forward, x3 with backward = 12*s*h.

    For a GPT (f = 4h, kv = num_heads) this is Narayanan et al.'s
    72*B*s*l*h^2 * (1 + s/(6h) + V/(12*l*h)) divided by the B*s tokens of a batch.
    Expects a resolved ModelConfig (`config.resolve`): ffn_hidden_size and
    vocab_size set.
    """
    h, l, s = cfg.hidden_size, cfg.num_layers, seq_len
    if not cfg.ffn_hidden_size or not cfg.vocab_size:
        raise ValueError("flops_per_token needs a resolved model config "
                         "(ffn_hidden_size and vocab_size set); call config.resolve first")
    head_dim = h // cfg.num_heads
    kv_width = (cfg.num_kv_heads or cfg.num_heads) * head_dim
    mlp_matrices = 2 if cfg.preset == "gpt2" else 3
    per_layer = 2 * h * h + 2 * h * kv_width + mlp_matrices * h * cfg.ffn_hidden_size
    matmul_params = l * per_layer + h * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * l * s * h


def peak_flops(device_name: str | None, configured_tflops: float) -> float | None:
    """Dense peak FLOP/s of one device: the configured value, else the table, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device_name:
        name = device_name.lower()
        for key, tflops in PEAK_TFLOPS.items():
            if key.lower() in name:
                return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; peak_flops_total sums every rank's peak."""
    if not peak_flops_total:
        return None
    return tokens_per_s * flops_per_token / peak_flops_total


def _current_rss() -> int | None:
    # /proc/self/statm: "size resident ..." in pages. resource.getrusage only offers the
    # peak RSS, which hides a leak that was freed or a drop after data loading.
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_stats(device) -> dict:
    """Current host RSS and, on CUDA, allocated and peak-allocated GPU bytes (else None)."""
    stats = {"mem_rss": _current_rss(), "mem_gpu_alloc": None, "mem_gpu_peak": None}
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        stats["mem_gpu_alloc"] = torch.cuda.memory_allocated(device)
        stats["mem_gpu_peak"] = torch.cuda.max_memory_allocated(device)
    return stats


def _finite_or_none(value):
    # Strict JSON has no NaN/Infinity; a diverged step shows up as null plus `skipped`.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _numbers(record: dict, prefix: str = "") -> dict:
    """The record's plottable values: finite ints and floats, step and flags left out;
    a nested dict (comm_bytes per group) becomes "key/inner" entries."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif (key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def load_sinks(tensorboard: bool = False, wandb: bool = False) -> dict:
    """Import what the requested sinks need: {"tensorboard": SummaryWriter, "wandb": module}.

    A requested sink whose package is missing raises ConfigError with the fix. Every
    rank calls this (through MetricsLogger), so a missing package stops all of them at
    start-up instead of leaving the other ranks waiting on a crashed rank 0.
    """
    found = {}
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard is on but the 'tensorboard' package is not "
                              "installed (torch.utils.tensorboard needs it). Install it with "
                              "`pip install tensorboard`, or set --log.tensorboard=false.") from None
        found["tensorboard"] = SummaryWriter
    if wandb:
        try:
            import wandb as wandb_module
        except ImportError:
            raise ConfigError("log.wandb is on but the 'wandb' package is not installed. "
                              "Install it with `pip install wandb` (then `wandb login`, or set "
                              "WANDB_MODE=offline), or set --log.wandb=false.") from None
        found["wandb"] = wandb_module
    return found


class _TensorBoardSink:
    """Scalars under <run_dir>/tensorboard, one tag per metrics column."""

    def __init__(self, writer_cls, run_dir):
        self.writer_cls, self.log_dir = writer_cls, str(Path(run_dir) / "tensorboard")
        self.writer, self.purge_step = None, None

    def resume_at(self, step: int) -> None:
        # Opened lazily so a resumed run can hide the events a crashed run wrote after
        # its last checkpoint, as truncate_after does for the metrics files.
        self.purge_step = step + 1

    def log(self, step: int, values: dict) -> None:
        if self.writer is None:
            self.writer = self.writer_cls(log_dir=self.log_dir, purge_step=self.purge_step)
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        # The writer otherwise flushes every 2 minutes: a killed run would lose its tail.
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandbSink:
    """One W&B run per launch, grouped by run name: W&B drops steps that go backwards,
    so a resumed run starts a new W&B run in the same group instead of appending."""

    def __init__(self, wandb, run_dir, project: str, run_name: str | None, config: dict | None):
        try:
            self.run = wandb.init(project=project, name=run_name, group=run_name,
                                  dir=str(run_dir), config=config)
        except Exception as e:  # login, network, bad project: all fixable before the run
            raise ConfigError(f"log.wandb is on but wandb.init failed: {e}. Run `wandb login`, "
                              f"set WANDB_MODE=offline, or set --log.wandb=false.") from None

    def resume_at(self, step: int) -> None:
        pass

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Appends records to run_dir/metrics.jsonl and run_dir/metrics.csv.

    A record is a dict of plain Python values keyed by `COLUMNS` (missing ones become
    null / empty); extra keys go to the JSON file only, since the CSV columns are
    fixed. `hostname` and `device` are filled in when the record lacks them. Each
    write opens, appends and closes the files, so every logged row is on disk even
    if the process is killed.

    `tensorboard` / `wandb` add those sinks (their numeric values, keyed by column
    name, at the record's step); `wandb_project`, `run_name` and `config` (a plain
    dict, shown in the W&B UI) describe the W&B run. Build the logger with the same
    flags on every rank: each checks the packages, only the enabled one writes.
    Call `close()` at the end of the run.
    """

    def __init__(self, run_dir, enabled: bool = True, device: str | None = None,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "megalite",
                 run_name: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.defaults = {"hostname": socket.gethostname(), "device": device}
        found = load_sinks(tensorboard, wandb)
        self.sinks = []
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.sinks.append(_TensorBoardSink(found["tensorboard"], run_dir))
            if wandb:
                self.sinks.append(_WandbSink(found["wandb"], run_dir, wandb_project, run_name,
                                             config))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        row = {**dict.fromkeys(COLUMNS), **record}
        for key, default in self.defaults.items():
            if row[key] is None:
                row[key] = default
        row = {k: _finite_or_none(v) for k, v in row.items()}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_csv:
                writer.writerow(COLUMNS)
            writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
        values = _numbers(row)
        for sink in self.sinks:
            sink.log(row["step"], values)

    def close(self) -> None:
        """Flush and close the TensorBoard / W&B sinks (the metrics files need nothing)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > `step`, so a run resumed at `step` does not repeat steps.

        Rows a crash left half-written (unparseable) are dropped too. Each file is
        rewritten under a temporary name and renamed, so an interruption here leaves
        either the old or the new file, never a cut one. TensorBoard hides its later
        events too; W&B gets a new run (see _WandbSink).
        """
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.resume_at(step)
        if self.jsonl_path.exists():
            kept = []
            for line in self.jsonl_path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
            _replace(self.jsonl_path, "".join(kept))
        if self.csv_path.exists():
            rows = list(csv.reader(io.StringIO(self.csv_path.read_text(), newline="")))
            out = io.StringIO(newline="")
            writer = csv.writer(out)
            writer.writerow(COLUMNS)
            for r in rows[1:]:
                try:
                    if len(r) == len(COLUMNS) and int(r[0]) <= step:
                        writer.writerow(r)
                except ValueError:
                    continue
            _replace(self.csv_path, out.getvalue())


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.1f}{unit}" if unit != "B" else f"{n:.0f}B"
        n /= 1024
    return f"{n:.1f}TB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(record: dict, total_steps: int, elapsed_s: float, start_step: int = 0) -> str:
    """One progress line for a record; ETA extrapolates the speed since `start_step`
    (the resume step), so a resumed run's ETA is not skewed by steps it never ran."""
    step = record.get("step", 0)
    parts = [f"step {step}/{total_steps}"]

    def add(key, fmt):
        value = record.get(key)
        if value is not None:
            parts.append(fmt(value))

    add("epoch", lambda v: f"epoch {v:.3f}")
    add("loss", lambda v: f"loss {v:.4f}")
    add("val_loss", lambda v: f"val_loss {v:.4f}")
    add("lr", lambda v: f"lr {v:.3e}")
    add("grad_norm", lambda v: f"grad_norm {v:.3f}")
    add("tokens_per_s", lambda v: f"{v:,.0f} tok/s")
    add("mfu", lambda v: f"mfu {100 * v:.1f}%")
    memory = [f"{label} {_bytes(record[key])}" for key, label in
              (("mem_rss", "rss"), ("mem_gpu_alloc", "gpu"), ("mem_gpu_peak", "gpu_peak"))
              if record.get(key) is not None]
    if memory:
        parts.append("mem " + " ".join(memory))
    add("skipped", lambda v: f"skipped {v}")
    done = step - start_step
    if done > 0 and elapsed_s > 0:
        parts.append(f"eta {_duration(elapsed_s / done * max(0, total_steps - step))}")
    return " | ".join(parts)
