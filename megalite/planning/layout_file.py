"""The planner's choice as a config file: `tools/estimate.py CONFIG --plan --write FILE`.

The file builds on the config it was planned for (`base:`, config.py), so the model is
written once, and sets the layout keys the planner chose plus the overrides the user
gave; its header says what the estimator expects (memory per GPU, step time, MFU, the
cluster assumed) and the command that starts it. `./launch.sh FILE` accepts it.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import yaml

from megalite.config import DEFAULT_CONFIG
from megalite.errors import ConfigError

GIB = 2 ** 30


def layout_file_text(source: Path | None, target: Path, overrides: list[tuple[str, str]],
                     chosen: dict, cluster) -> str:
    """The YAML text of `chosen` (a plan: layout, memory_bytes, step_time, mfu) for
    `source` (None: the default config), to be written at `target`."""
    source = Path(source) if source else DEFAULT_CONFIG
    values = {key: yaml.safe_load(v) if isinstance(v, str) and v.strip() else v
              for key, v in overrides}
    values.update(chosen["layout"])  # the planner's choice over a layout key given
    sections: dict[str, dict] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    start = (f"sbatch --nodes={cluster.nodes} examples/slurm.sbatch {target}"
             if cluster.nodes > 1 else f"./launch.sh {target}")
    times = chosen["step_time"]
    nodes = (f"{cluster.nodes} nodes of {cluster.gpus_per_node}" if cluster.nodes > 1 else
             f"one node of {cluster.gpus_per_node}" if cluster.gpus_per_node > 1 else "one")
    header = textwrap.wrap(
        f"{source.stem} on {cluster.world} GPU{'s' if cluster.world > 1 else ''} ({nodes}, "
        f"{cluster.gpu_memory_gb:g} GB each): the layout `tools/estimate.py --plan` chose. "
        f"Estimated {chosen['memory_bytes']['total'] / GIB:.1f} GiB per GPU (the most loaded "
        f"rank) and {times['total']:.2f} s per step (pipeline bubble {times['bubble']:.2f} s), "
        f"MFU {chosen['mfu']:.0%}, at {cluster.peak_tflops:g} TFLOP/s per GPU and "
        f"{cluster.efficiency:.0%} kernel efficiency.", width=86)
    planned = " ".join(["python tools/estimate.py", str(source),
                        *(f"--{k}={v}" for k, v in overrides), "--plan --gpus-per-node",
                        f"{cluster.gpus_per_node} --nodes {cluster.nodes} --write {target}"])
    header += ["Planned by:", f"  {planned}", "Start:", f"  {start}"]
    base = os.path.relpath(source.resolve(), target.resolve().parent)
    body = yaml.safe_dump({"base": base, **sections}, sort_keys=False)
    return "".join(f"# {line}\n" for line in header) + body


def write_layout_file(target: Path, text: str) -> None:
    """Write `text` to `target`, which must not exist yet (a user's config is never
    overwritten), through a temporary name so no half-written file is left."""
    target = Path(target)
    if target.exists():
        raise ConfigError(f"'{target}' exists already; --write never replaces a file. Give a "
                          f"new name or remove it.")
    if not target.parent.is_dir():
        raise ConfigError(f"--write {target}: the folder '{target.parent}' does not exist.")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
