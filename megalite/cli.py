"""Command-line plumbing shared by every entry point.

`parse_args` turns `[CONFIG.yaml] [--section.key=value ...] [--flag value ...]` into a
validated Config plus the remaining flags; `run_main` runs an entry point and turns a
MegaliteError (a user mistake) into a one-paragraph message and exit code 2 instead of
a traceback.
"""

from __future__ import annotations

import sys

from megalite.config import Config, load_config, parse_overrides
from megalite.errors import ConfigError, MegaliteError


def parse_args(argv: list[str], known_flags: tuple[str, ...] = ()) -> tuple[Config, dict]:
    config_path = None
    if argv and not argv[0].startswith("--"):
        config_path, argv = argv[0], argv[1:]
    overrides, flags = parse_overrides(argv)
    for flag in flags:
        if flag not in known_flags:
            hint = f" Known flags: {', '.join('--' + f for f in known_flags)}." if known_flags else ""
            raise ConfigError(f"unknown flag '--{flag}'. Config overrides need a section, as in "
                              f"--train.steps=100.{hint}")
    return load_config(config_path, overrides), flags


def run_main(fn, argv=None) -> int:
    try:
        return fn(sys.argv[1:] if argv is None else argv) or 0
    except MegaliteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
