"""Checks run by `launch.sh` before any worker starts, and the data they need.

`python -m megalite.preflight [CONFIG.yaml] [--overrides] [--resume_from_checkpoint X]`
validates the config, checks the resume target (present, complete, checksums), prepares
the default corpus and tokenizer when the config uses them (cached), runs every worker's
start-up check of the config against the layout, the model and the data for all ranks
(megalite/layout_checks.py: no process group, no model), and prints the number of ranks
to start on its last line. Every user mistake it finds exits with code 2 and a
one-paragraph message, so torchrun never starts on bad input.
"""

import contextlib
import sys
from pathlib import Path

from megalite.cli import parse_args, run_main


def preflight_main(argv: list[str]) -> int:
    cfg, flags = parse_args(argv, known_flags=("resume_from_checkpoint",))
    from megalite.checkpoint import format as ckpt
    from megalite.data.build import build_data, prepare_default_data
    from megalite.layout_checks import check_layout

    # stdout carries only what launch.sh reads (the rank count, the stop window, the run
    # directory, one per line); progress goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        resume = flags.get("resume_from_checkpoint")
        if resume:
            path = ckpt.resolve_checkpoint(resume, Path(cfg.checkpoint.dir))
            ckpt.read_index(path)
            print(f"[megalite] will resume from {path}")
        if not cfg.data.paths:
            prepare_default_data(cfg)
        data = build_data(cfg)  # opens every token file: a missing or damaged one fails here
        check_layout(cfg, data)
    print(f"{cfg.world_size}\n{cfg.run.stop_window_s:g}\n{cfg.run.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(preflight_main))
