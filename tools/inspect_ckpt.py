"""Print a checkpoint's metadata and verify every file's and every flat piece's checksum.

    python tools/inspect_ckpt.py RUN_DIR|CHECKPOINTS_DIR|CHECKPOINT_DIR

Prints step, data position, loss, layout, the model and training config, the tensors,
each file with its size and sha256 status, and how many flat pieces (format 3's
optimizer-state ranges) passed their own sha256, with a line per damaged piece (tensor,
flat offset, length, file). Exits 2 with the reason when a file is missing, truncated
or corrupted or a piece is damaged (the report still shows which).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.cli import run_main  # noqa: E402
from megalite.checkpoint.inspect import inspect_checkpoint  # noqa: E402


def inspect_main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="run, checkpoints or step directory")
    args = parser.parse_args(argv)
    lines, error = inspect_checkpoint(args.path)
    print("\n".join(lines), flush=True)
    if error is not None:
        raise error
    print("checksums: all files OK, all flat pieces OK")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(inspect_main))
