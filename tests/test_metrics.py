"""Metrics: the FLOPs formula, peak lookup and MFU, memory, metrics files, console line,
and the optional TensorBoard / W&B sinks (faked: neither package is a dependency)."""

import csv
import json
import sys
import types

import pytest

from megalite.config import ModelConfig
from megalite.errors import ConfigError
from megalite.training.metrics import (COLUMNS, MetricsLogger, console_line, flops_per_token,
                              memory_stats, mfu, peak_flops)


def test_flops_match_narayanan_closed_form_for_gpt():
    h, l, s, V = 768, 12, 1024, 50257
    cfg = ModelConfig(preset="gpt2", hidden_size=h, num_layers=l, num_heads=12,
                      num_kv_heads=12, ffn_hidden_size=4 * h, vocab_size=V,
                      tie_embeddings=True)
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
                               mem_gpu_alloc=1 << 30, skipped=2, epoch=0.0625),
                        total_steps=100, elapsed_s=20.0)
    for part in ("10/100", "epoch 0.062", "loss 4.0000", "val_loss 3.2500", "lr 1.000e-03", "grad_norm 0.500",
                 "1,000 tok/s", "mfu 41.2%", "rss 3.0GB", "gpu 1.0GB", "skipped 2", "eta 3m00s"):
        assert part in line, (part, line)
    short = console_line({"step": 60, "loss": 1.0}, total_steps=100, elapsed_s=10.0,
                         start_step=50)
    assert "mfu" not in short and "val_loss" not in short and "eta 0m40s" in short


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)."""

    instances = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_sinks(monkeypatch):
    FakeWriter.instances = []
    runs = []
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = FakeWriter
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return runs


def test_sinks_get_the_numbers_of_each_record(tmp_path, fake_sinks):
    log = MetricsLogger(tmp_path, device="cpu", tensorboard=True, wandb=True,
                        wandb_project="proj", run_name="tiny", config={"train": {"steps": 3}})
    log.truncate_after(1)  # as the trainer does after a resume at step 1
    log.log({"step": 0, "val_loss": 6.0})
    log.log(record(2, loss=float("nan"), skip_reason="nan_grad", comm_bytes={"dp_sp": 4096}))
    log.close()
    writer, run = FakeWriter.instances[0], fake_sinks[0]
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.purge_step == 2
    assert ("val_loss", 6.0, 0) in writer.scalars and ("grad_norm", 0.5, 2) in writer.scalars
    assert ("comm_bytes/dp_sp", 4096.0, 2) in writer.scalars
    tags = {tag for tag, _, _ in writer.scalars}
    # NaN, strings, the step itself and empty columns are not plotted
    assert not tags & {"loss", "skip_reason", "hostname", "device", "step", "mfu"}
    assert writer.closed and run.finished
    assert run.init_kwargs["project"] == "proj" and run.init_kwargs["name"] == "tiny"
    assert run.init_kwargs["config"] == {"train": {"steps": 3}}
    assert [step for step, _ in run.logged] == [0, 2]
    assert run.logged[1][1]["tokens_per_s"] == 1000.0 and "loss" not in run.logged[1][1]


def test_sinks_only_on_the_writing_rank(tmp_path, fake_sinks):
    log = MetricsLogger(tmp_path / "run", enabled=False, tensorboard=True, wandb=True)
    log.log(record(1))
    log.close()
    assert FakeWriter.instances == [] and fake_sinks == []


@pytest.mark.parametrize("sink, module", [("tensorboard", "torch.utils.tensorboard"),
                                          ("wandb", "wandb")])
def test_missing_sink_package_is_a_config_error_on_every_rank(tmp_path, monkeypatch, sink, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    for enabled in (True, False):
        with pytest.raises(ConfigError, match=f"pip install {sink}.*log.{sink}=false"):
            MetricsLogger(tmp_path, enabled=enabled, **{sink: True})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_init_failure_is_a_config_error(tmp_path, monkeypatch):
    def init(**kwargs):
        raise RuntimeError("not logged in")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ConfigError, match="not logged in.*wandb login"):
        MetricsLogger(tmp_path, wandb=True)


def test_real_tensorboard_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2):
        log.log(record(step))
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 4.900000095367432),
                                                                   (2, 4.800000190734863)]
