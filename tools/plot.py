"""Draw a run's training curves from RUN_DIR/metrics.jsonl to PNG files.

    python tools/plot.py RUN_DIR [--out DIR]

Writes into DIR (default RUN_DIR/plots): loss.png (training loss, and validation loss
where the run validated), lr.png, grad_norm.png and throughput.png (tokens/s over all
ranks), each against the optimizer step. A curve with no values in the run (say,
grad_norm of a run stopped before its first step) is skipped with a note. Needs
matplotlib, which megalite itself does not: `pip install matplotlib` (or the `viz`
extra, `pip install -e .[viz]`).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.cli import run_main  # noqa: E402
from megalite.errors import MegaliteError  # noqa: E402

# file stem -> (title, y label, log y axis, [(metrics column, legend label)])
FIGURES = {
    "loss": ("Loss", "cross-entropy", False, [("loss", "train"), ("val_loss", "validation")]),
    "lr": ("Learning rate", "lr", False, [("lr", "lr")]),
    "grad_norm": ("Gradient norm (before clipping)", "global L2 norm", True,
                  [("grad_norm", "grad_norm")]),
    "throughput": ("Throughput", "tokens/s (all ranks)", False, [("tokens_per_s", "tokens/s")]),
}


class PlotError(MegaliteError):
    """The run directory has nothing to plot, or matplotlib is missing."""


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl by step; a row cut short by a crash is skipped, and
    when a step appears twice (a resume that did not truncate) the later row wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        where = "does not exist" if not run_dir.is_dir() else "has no metrics.jsonl"
        raise PlotError(f"run directory '{run_dir}' {where}. Pass the run.dir of a training "
                        f"run (runs/<config name> by default), after it has logged a step.")
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            continue
    if not rows:
        raise PlotError(f"'{path}' holds no metrics rows yet; plot again once the run has "
                        f"logged (every log.every steps).")
    return [rows[step] for step in sorted(rows)]


def series(rows: list[dict], column: str) -> tuple[list, list]:
    points = [(r["step"], r[column]) for r in rows if r.get(column) is not None]
    return [s for s, _ in points], [v for _, v in points]


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("tools/plot.py needs matplotlib, which megalite does not install. "
                        "Install it with `pip install matplotlib` (or `pip install -e .[viz]` "
                        "in the repository).") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    """Writes the PNGs; returns their paths."""
    rows = read_metrics(run_dir)
    plt = import_pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, ylabel, log_y, columns) in FIGURES.items():
        curves = [(label, *series(rows, column)) for column, label in columns]
        curves = [(label, x, y) for label, x, y in curves if x]
        if not curves:
            print(f"no {', '.join(c for c, _ in columns)} values in the run; {stem}.png skipped")
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, x, y in curves:
            # Validation is sparse: markers show where each value was measured.
            ax.plot(x, y, label=label, marker="o" if len(x) < 0.5 * len(rows) else None,
                    markersize=3)
        values = [v for _, _, y in curves for v in y]
        # A log axis only pays off when the values span decades (early grad-norm spikes).
        if log_y and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
        ax.set(title=f"{title}: {run_dir.name}", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out or args.run_dir / "plots"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
