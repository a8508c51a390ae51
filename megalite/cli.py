"""Command-line plumbing shared by every entry point.

`parse_overrides` splits `--section.key=value` overrides from `--flag value` flags;
`split_args` splits `[CONFIG.yaml] [--section.key=value ...] [--flag value ...]`, and
`parse_args` turns it into a validated Config plus the remaining flags; `run_main`
runs an entry point and turns a MegaliteError (a user mistake) into a one-paragraph
message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import sys

from megalite.config import Config, load_config
from megalite.errors import ConfigError, MegaliteError


def parse_overrides(args: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """Split `--section.key=value` / `--section.key value` overrides from `--flag value` flags.

    Returns (overrides in order, flags). A key given twice: the last one wins, because
    overrides are applied in order.
    """
    overrides, flags, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like "
                              f"--section.key=value, e.g. --train.steps=100.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"'{arg}' needs a value: write {arg}=VALUE or {arg} VALUE.")
            value, i = args[i + 1], i + 1
        if "." in key:
            overrides.append((key, value))
        else:
            flags[key] = value
        i += 1
    return overrides, flags


def split_args(argv: list[str], known_flags: tuple[str, ...] = ()
               ) -> tuple[str | None, list[tuple[str, str]], dict]:
    """`[CONFIG.yaml] [--section.key=value ...] [--flag value ...]` -> (config path or
    None, overrides, flags); an unknown flag is an error."""
    config_path = None
    if argv and not argv[0].startswith("--"):
        config_path, argv = argv[0], argv[1:]
    overrides, flags = parse_overrides(argv)
    for flag in flags:
        if flag not in known_flags:
            hint = f" Known flags: {', '.join('--' + f for f in known_flags)}." if known_flags else ""
            raise ConfigError(f"unknown flag '--{flag}'. Config overrides need a section, as in "
                              f"--train.steps=100.{hint}")
    return config_path, overrides, flags


def parse_args(argv: list[str], known_flags: tuple[str, ...] = ()) -> tuple[Config, dict]:
    config_path, overrides, flags = split_args(argv, known_flags)
    return load_config(config_path, overrides), flags


def run_main(fn, argv=None) -> int:
    try:
        return fn(sys.argv[1:] if argv is None else argv) or 0
    except MegaliteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
