"""Per-rank entry point: `python -m megalite.train [CONFIG.yaml] [--section.key=value ...]`.

`./launch.sh` starts one of these per rank under torchrun; it can also run alone.
"""

import sys

from megalite.cli import parse_args, run_main


def train_main(argv: list[str]) -> int:
    cfg, flags = parse_args(argv, known_flags=("resume_from_checkpoint",))
    from megalite.parallel import launch as distributed
    from megalite.training.trainer import Trainer  # after parsing, so a bad flag fails fast

    finished = False
    try:
        code = Trainer(cfg, resume=flags.get("resume_from_checkpoint")).train()
        finished = True
        return code
    finally:
        distributed.teardown(finished)


def main() -> int:
    return run_main(train_main)


if __name__ == "__main__":
    sys.exit(main())
