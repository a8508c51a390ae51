"""Per-rank entry point: `python -m megalite.train [CONFIG.yaml] [--section.key=value ...]`.

`./launch.sh` starts one of these per rank under torchrun; it can also run alone. A
worker that torchrun restarted after a failure (TORCHELASTIC_RESTART_COUNT > 0,
run.max_restarts) resumes from the latest checkpoint saved since the launch began
(MEGALITE_LAUNCH_T, set by launch.sh), or else from where the first attempt started;
a first attempt resumes only from --resume_from_checkpoint.
"""

import os
import sys
from pathlib import Path

from megalite.cli import parse_args, run_main
from megalite.errors import MegaliteError


def resume_target(flag: str | None, checkpoint_dir: str) -> str | None:
    """What this attempt resumes from: `flag` on the first attempt; after a restart, the
    latest checkpoint committed since the launch began, if there is one."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restart:
        return flag
    from megalite.checkpoint import format as ckpt
    try:
        latest = ckpt.resolve_checkpoint("latest", Path(checkpoint_dir))
    except MegaliteError:
        latest = None
    launched = float(os.environ.get("MEGALITE_LAUNCH_T", "0"))
    saved = latest is not None and (latest / ckpt.INDEX).stat().st_mtime >= launched
    target = str(latest) if saved else flag
    if os.environ.get("RANK", "0") == "0":
        print(f"[megalite] restart {restart} after a failure: "
              f"{'resuming from ' + target if target else 'starting again from step 0'}",
              flush=True)
    return target


def train_main(argv: list[str]) -> int:
    cfg, flags = parse_args(argv, known_flags=("resume_from_checkpoint",))
    from megalite.parallel import launch as distributed
    from megalite.training.signals import RunSignals
    from megalite.training.trainer import Trainer  # after parsing, so a bad flag fails fast

    finished = False
    # the handlers first: a stop during start-up is honoured after the first step
    with RunSignals(cfg.run.stop_window_s) as signals:
        try:
            resume = resume_target(flags.get("resume_from_checkpoint"), cfg.checkpoint.dir)
            code = Trainer(cfg, resume=resume).train(signals)
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
