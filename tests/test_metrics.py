"""Metrics: the FLOPs formula, peak lookup and MFU, memory, metrics files, console line."""

import csv
import json

import pytest

from megalite.config import ModelConfig
from megalite.metrics import (COLUMNS, MetricsLogger, console_line, flops_per_token,
                              memory_stats, mfu, peak_flops)


def test_flops_match_narayanan_closed_form_for_gpt():
    h, l, s, V = 768, 12, 1024, 50257
    cfg = ModelConfig(preset="gpt2", hidden_size=h, num_layers=l, num_heads=12,
                      num_kv_heads=12, ffn_hidden_size=4 * h, vocab_size=V,
                      tie_embeddings="true")
    B = 8
    closed = 72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h)) / (B * s)
    assert flops_per_token(cfg, s) == pytest.approx(closed, rel=1e-12)


def test_flops_count_gqa_and_swiglu():
    h, l, s, V, f = 512, 2, 256, 1000, 1408
    cfg = ModelConfig(preset="llama", hidden_size=h, num_layers=l, num_heads=8,
                      num_kv_heads=2, ffn_hidden_size=f, vocab_size=V)
    kv_width = 2 * (h // 8)
    params = l * (2 * h * h + 2 * h * kv_width + 3 * h * f) + h * V
    assert flops_per_token(cfg, s) == 6 * params + 12 * l * s * h
    mha = ModelConfig(preset="llama", hidden_size=h, num_layers=l, num_heads=8,
                      num_kv_heads=8, ffn_hidden_size=f, vocab_size=V)
    assert flops_per_token(mha, s) > flops_per_token(cfg, s)


def test_flops_needs_resolved_config():
    with pytest.raises(ValueError, match="resolve"):
        flops_per_token(ModelConfig(), 128)


def test_peak_lookup_configured_table_and_unknown():
    assert peak_flops("NVIDIA H100 80GB HBM3", 0.0) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", 0.0) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", 0.0) == 312e12
    assert peak_flops("NVIDIA A10G", 0.0) == 125e12
    assert peak_flops("NVIDIA L40S", 0.0) == 362e12
    assert peak_flops("NVIDIA L4", 0.0) == 121e12
    assert peak_flops("NVIDIA H100 80GB HBM3", 500.0) == 500e12  # configured wins
    assert peak_flops(None, 0.0) is None  # CPU: no peak is invented
    assert peak_flops("Some Future GPU", 0.0) is None
    assert peak_flops(None, 100.0) == 100e12


def test_mfu():
    assert mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, None) is None


def test_memory_stats_on_cpu():
    stats = memory_stats("cpu")
    assert set(stats) == {"mem_rss", "mem_gpu_alloc", "mem_gpu_peak"}
    assert stats["mem_gpu_alloc"] is None and stats["mem_gpu_peak"] is None
    assert stats["mem_rss"] is None or stats["mem_rss"] > 1 << 20


def record(step, **extra):
    return {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_s": 1000.0, "step_time": 0.1, "skipped": 0, **extra}


def read(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.reader(f))
    return rows, table


def test_logger_writes_jsonl_and_csv(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, device="cpu")
    log.log({"step": 0, "val_loss": 6.0})
    log.log(record(1, mem_rss=123))
    log.log(record(2, loss=float("nan"), custom=7))
    rows, table = read(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(set(COLUMNS) <= set(r) for r in rows)
    assert rows[0]["val_loss"] == 6.0 and rows[0]["loss"] is None and rows[0]["mfu"] is None
    assert rows[1]["device"] == "cpu" and rows[1]["hostname"]
    assert rows[2]["loss"] is None and rows[2]["custom"] == 7  # NaN -> null, strict JSON
    assert table[0] == list(COLUMNS)  # header once
    assert len(table) == 4
    col = {name: i for i, name in enumerate(COLUMNS)}
    assert table[1][col["loss"]] == "" and table[1][col["val_loss"]] == "6.0"
    assert table[2][col["mem_rss"]] == "123" and float(table[2][col["lr"]]) == 1e-3


def test_truncate_after_drops_later_and_broken_rows(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True)
    for step in range(0, 6):
        log.log(record(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a write cut short by a crash
    resumed = MetricsLogger(tmp_path, enabled=True)
    resumed.truncate_after(3)
    resumed.log(record(4))
    rows, table = read(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert table[0] == list(COLUMNS)
    assert [int(r[0]) for r in table[1:]] == [0, 1, 2, 3, 4]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False)
    log.log(record(1))
    log.truncate_after(0)
    assert not (tmp_path / "run").exists()


def test_console_line_has_the_fields():
    line = console_line(record(10, val_loss=3.25, mfu=0.412, mem_rss=3 << 30,
                               mem_gpu_alloc=1 << 30, skipped=2),
                        total_steps=100, elapsed_s=20.0)
    for part in ("10/100", "loss 4.0000", "val_loss 3.2500", "lr 1.000e-03", "grad_norm 0.500",
                 "1,000 tok/s", "mfu 41.2%", "rss 3.0GB", "gpu 1.0GB", "skipped 2", "eta 3m00s"):
        assert part in line, (part, line)
    short = console_line({"step": 60, "loss": 1.0}, total_steps=100, elapsed_s=10.0,
                         start_step=50)
    assert "mfu" not in short and "val_loss" not in short and "eta 0m40s" in short
