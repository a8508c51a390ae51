"""Per-rank entry point: `python -m megalite.train [CONFIG.yaml] [--section.key=value ...]`.

`./launch.sh` starts one of these per rank under torchrun; it can also run alone.
"""

import sys

from megalite.cli import parse_args, run_main
from megalite.errors import MegaliteError


def train_main(argv: list[str]) -> int:
    cfg, flags = parse_args(argv, known_flags=("resume_from_checkpoint",))
    from megalite.parallel import launch as distributed
    from megalite.training.signals import RunSignals
    from megalite.training.trainer import Trainer  # after parsing, so a bad flag fails fast

    finished = False
    # the handlers first: a stop during start-up is honoured after the first step
    with RunSignals(cfg.run.stop_window_s) as signals:
        try:
            code = Trainer(cfg, resume=flags.get("resume_from_checkpoint")).train(signals)
            finished = True
            return code
        except MegaliteError as e:
            finished = e.every_rank  # every rank stops here together: leave in order
            raise
        finally:
            distributed.teardown(finished)


def main() -> int:
    return run_main(train_main)


if __name__ == "__main__":
    sys.exit(main())
