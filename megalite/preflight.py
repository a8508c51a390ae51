"""Checks run by `launch.sh` before any worker starts, the data they need, and the launch.

`python -m megalite.preflight [CONFIG.yaml] [--overrides] [--resume_from_checkpoint X]`
reads the launch from the environment (NNODES, NPROC_PER_NODE, ... or Slurm's,
parallel/cluster.py) and decides the ranks per node and, for parallel.dp=auto, dp; it
validates the config for every world the launch can have (an elastic NNODES=MIN:MAX has
several), checks the resume target (present, complete, checksums) or that a fresh start
overwrites no earlier run's checkpoints, prepares the default corpus and tokenizer when
the config uses them (cached), and runs every worker's start-up check of the config
against the layout, the model and the data for all ranks (megalite/layout_checks.py: no
process group, no model). Every user mistake it finds exits with code 2 and a
one-paragraph message, so torchrun never starts on bad input.

Its stdout is what launch.sh reads, one item per line: the number of ranks, the stop
window (seconds), the run directory, and torchrun's arguments (space-separated).
"""

import contextlib
import os
import sys
from pathlib import Path

from megalite.cli import run_main, split_args
from megalite.config import Config, finish_config, read_config
from megalite.errors import ConfigError
from megalite.parallel.cluster import Launch, launch_from_env, torchrun_args
from megalite.parallel.launch import device_type


def ranks_per_node(cfg: Config, launch: Launch) -> int:
    """NPROC_PER_NODE as given (or Slurm's GPUs per node); else what the layout needs:
    tp x pp x dp x sp over the nodes, or under dp=auto every visible GPU."""
    p = cfg.parallel
    if p.dp != "auto" and launch.elastic:
        raise ConfigError(f"NNODES={launch.min_nodes}:{launch.max_nodes} lets the number of "
                          f"ranks change, but parallel.dp={p.dp} fixes it; give "
                          f"--parallel.dp=auto (world / (tp x pp x sp)).")
    if launch.nproc_per_node:
        nproc = launch.nproc_per_node
        if p.dp != "auto" and nproc * launch.max_nodes != cfg.world_size:
            raise ConfigError(
                f"NPROC_PER_NODE={nproc} x NNODES={launch.max_nodes} = "
                f"{nproc * launch.max_nodes} ranks, but the config's tp*pp*dp*sp is "
                f"{cfg.world_size}; change the layout or the launch, or give "
                f"--parallel.dp=auto.")
        return nproc
    if p.dp != "auto":
        if cfg.world_size % launch.max_nodes:
            raise ConfigError(f"the config's tp*pp*dp*sp = {cfg.world_size} ranks do not split "
                              f"over NNODES={launch.max_nodes} nodes; set NPROC_PER_NODE or "
                              f"change the layout.")
        return cfg.world_size // launch.max_nodes
    if device_type(cfg) == "cuda":
        import torch
        return torch.cuda.device_count()
    raise ConfigError("parallel.dp=auto on CPU: set NPROC_PER_NODE to the number of ranks "
                      "to start on this node (dp is then world / (tp x pp x sp)).")


def _finish(raw: Config, world: int, launch: Launch, nproc: int) -> Config:
    try:
        return finish_config(raw, world)
    except ConfigError as e:
        if not launch.elastic:
            raise
        raise ConfigError(f"with {world // nproc} nodes ({world} ranks): {e}") from None


def _check_fresh_start(cfg: Config) -> None:
    """A launch without --resume_from_checkpoint starts at step 0: into a checkpoint
    directory that holds an earlier run, its saves would mix with and prune that run's."""
    latest = Path(cfg.checkpoint.dir) / "latest"
    if latest.is_file():
        raise ConfigError(
            f"'{cfg.checkpoint.dir}' holds checkpoints of an earlier run (latest: "
            f"{latest.read_text().strip()}), and this launch would start a new one at step 0. "
            f"Resume it with --resume_from_checkpoint latest, or start elsewhere with "
            f"--run.dir=NEW_DIR (or delete that directory).")


def preflight_main(argv: list[str]) -> int:
    config_path, overrides, flags = split_args(argv, known_flags=("resume_from_checkpoint",))
    raw = read_config(config_path, overrides)
    launch = launch_from_env(os.environ)
    nproc = ranks_per_node(raw, launch)
    configs = [_finish(raw, world, launch, nproc) for world in launch.worlds(nproc)]
    args = torchrun_args(launch, nproc, configs[-1].run.max_restarts)
    from megalite.checkpoint import format as ckpt
    from megalite.data.build import build_data, prepare_default_data
    from megalite.layout_checks import check_layout

    cfg = configs[-1]
    # stdout carries only what launch.sh reads; progress goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        resume = flags.get("resume_from_checkpoint")
        if resume:
            path = ckpt.resolve_checkpoint(resume, Path(cfg.checkpoint.dir))
            ckpt.read_index(path)
            print(f"[megalite] will resume from {path}")
        else:
            _check_fresh_start(cfg)
        if not cfg.data.paths:
            prepare_default_data(cfg)
        data = build_data(cfg)  # opens every token file: a missing or damaged one fails here
        for each in configs:  # every world an elastic launch may shrink to
            check_layout(each, data)
    print(f"{cfg.world_size}\n{cfg.run.stop_window_s:g}\n{cfg.run.dir}\n{' '.join(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(preflight_main))
