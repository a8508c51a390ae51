"""Rewrite a checkpoint for another layout, offline, on CPU (no process group).

    python tools/reshard.py SRC DST [--tp N] [--pp N] [--dp N] [--sp N] [--zero K] [--zero-shard N]
                            [--virtual-stages V] [--stage-layers 3,3,2] [--consolidate]

SRC: a step_NNNNNNN directory, or a checkpoints directory / run directory (its latest).
DST: the checkpoints directory to write into (DST/step_NNNNNNN and DST/latest); resume
with `--checkpoint.dir=DST --resume_from_checkpoint latest` and the new layout flags.
Unset layout flags keep the source's. `--consolidate` writes one unsharded
safetensors file (layout 1 x 1 x 1 x 1). The trainer also reshards on load, so this
is only needed to move or merge files ahead of time.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.checkpoint.format import find_checkpoint  # noqa: E402
from megalite.cli import run_main  # noqa: E402
from megalite.checkpoint.reshard import reshard  # noqa: E402


def reshard_main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    for flag in ("tp", "pp", "dp", "sp", "zero", "zero-shard", "virtual-stages"):
        parser.add_argument(f"--{flag}", type=int)
    parser.add_argument("--stage-layers")
    parser.add_argument("--consolidate", action="store_true")
    args = parser.parse_args(argv)
    layout = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "sp": args.sp, "zero": args.zero,
              "zero_shard": args.zero_shard, "virtual_stages": args.virtual_stages,
              "stage_layers": args.stage_layers}
    out = reshard(find_checkpoint(args.src), args.dst, layout, args.consolidate)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(reshard_main))
