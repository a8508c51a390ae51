"""StepProfiler: a Chrome trace for each listed step of a tiny model, nothing for the
others, the CUDA memory snapshot calls (faked on CPU), and bad step lists."""

import json

import pytest
import torch

from megalite.training import profiling
from megalite.config import ModelConfig
from megalite.errors import ConfigError
from megalite.model.transformer import Transformer
from megalite.training.profiling import StepProfiler


def tiny_step_fn():
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, vocab_size=64,
                      ffn_hidden_size=64, max_seq_len=16, attention="sdpa", kernels="torch",
                      tie_embeddings=False)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (2, 17))

    def step():
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()

    return step


def test_trace_for_listed_steps_only(tmp_path, capsys):
    train_step = tiny_step_fn()
    profiler = StepProfiler([2, "3"], tmp_path, device="cpu", rank=1)
    for step in range(1, 5):
        with profiler.step(step):
            train_step()
    traces = sorted((tmp_path / "profile").iterdir())
    assert [p.name for p in traces] == ["step_0000002_rank_00001.trace.json",
                                        "step_0000003_rank_00001.trace.json"]
    assert profiler.written == traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    # forward matmuls, the backward pass and the optimizer step are all in the one trace
    assert "aten::mm" in names and "aten::nll_loss_backward" in names, sorted(names)[:20]
    assert any(name.startswith("Optimizer.step#AdamW") for name in names)
    out = capsys.readouterr().out
    assert out.count("CUDA memory snapshot skipped (no CUDA device)") == 2


def test_no_steps_listed_writes_nothing(tmp_path):
    profiler = StepProfiler([], tmp_path)
    with profiler.step(1):
        pass
    assert not (tmp_path / "profile").exists() and profiler.written == []


def test_cuda_records_and_dumps_memory_history(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(profiling.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profiling.torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("record", enabled)))
    monkeypatch.setattr(profiling.torch.cuda.memory, "_dump_snapshot",
                        lambda path: calls.append(("dump", path)) or open(path, "wb").close())
    profiler = StepProfiler([1], tmp_path, device="cuda:0")
    with profiler.step(1):
        torch.ones(8).sum()
    snapshot = tmp_path / "profile" / "step_0000001_rank_00000.memory.pickle"
    assert calls == [("record", "all"), ("dump", str(snapshot)), ("record", None)]
    assert profiler.written[-1] == snapshot and profiler.written[0].name.endswith(".trace.json")


def test_trace_written_even_when_the_step_fails(tmp_path):
    profiler = StepProfiler([1], tmp_path)
    with pytest.raises(RuntimeError):
        with profiler.step(1):
            raise RuntimeError("boom")
    assert len(profiler.written) == 1 and profiler.written[0].is_file()


@pytest.mark.parametrize("bad", [["x"], [0], ["-3"]])
def test_bad_profile_steps(tmp_path, bad):
    with pytest.raises(ConfigError, match="log.profile_steps"):
        StepProfiler(bad, tmp_path)
