"""tools/plot.py: PNGs from a run's metrics.jsonl, and the errors a user can hit."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.training.metrics import MetricsLogger

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_plot():
    spec = importlib.util.spec_from_file_location("plot_tool", REPO / "tools" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(run_dir: Path, steps=20, eval_every=10):
    """A metrics file as the trainer writes it: val_loss at step 0 and every eval_every."""
    log = MetricsLogger(run_dir, device="cpu")
    log.log({"step": 0, "val_loss": 8.0, "lr": 1e-4})
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 8.0 - 0.2 * step, "lr": 1e-3 * min(1, step / 5),
               "grad_norm": 2.0 / step, "tokens_per_s": 3000.0 + step, "step_time": 0.5}
        if step % eval_every == 0:
            row["val_loss"] = 8.1 - 0.2 * step
        log.log(row)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "lo')  # cut short by a crash: skipped


def test_plots_every_curve(tmp_path):
    plot = load_plot()
    fake_run(tmp_path)
    rows = plot.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(21))
    assert plot.series(rows, "val_loss") == ([0, 10, 20], [8.0, 6.1, 4.1])
    assert plot.main([str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


def test_curve_without_values_is_skipped(tmp_path, capsys):
    plot = load_plot()
    MetricsLogger(tmp_path).log({"step": 0, "val_loss": 8.0, "lr": 1e-4})
    written = plot.plot_run(tmp_path, tmp_path / "out")
    assert sorted(p.name for p in written) == ["loss.png", "lr.png"]
    assert "no grad_norm values in the run; grad_norm.png skipped" in capsys.readouterr().out


def test_missing_or_empty_run_dir(tmp_path):
    missing = subprocess.run([sys.executable, str(REPO / "tools" / "plot.py"),
                              str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "does not exist" in missing.stderr
    plot = load_plot()
    with pytest.raises(plot.PlotError, match="has no metrics.jsonl"):
        plot.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(plot.PlotError, match="no metrics rows yet"):
        plot.read_metrics(tmp_path)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    plot = load_plot()
    fake_run(tmp_path, steps=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plot.PlotError, match=r"pip install matplotlib"):
        plot.plot_run(tmp_path, tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


def test_another_python_runs_the_tool_in_the_project_env(tmp_path):
    """`python tools/plot.py` typed in a shell whose python is not .venv's (no torch, no
    matplotlib there): the tool starts again under .venv's (tools/project_python.py)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("the suite runs outside the project's .venv (./test.sh makes it)")
    base = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter .venv was made from
    fake_run(tmp_path, steps=3)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MEGALITE_ANY_PYTHON")}
    done = subprocess.run([str(base), str(REPO / "tools" / "plot.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plots" / "loss.png").is_file()
