"""A worker's signals: one stop request however many copies arrive, and "save now".

A stop reaches a worker several times over: a terminal's Ctrl-C goes to the whole
foreground process group, `timeout` relays it once more, launch.sh relays what it gets,
torchrun forwards what it gets, and Slurm's scancel or a node's shutdown sends SIGTERM
to every process of the job at once. So SIGINT and SIGTERM within `window_s` seconds of
the first count as that one request: the worker finishes its step, every rank agrees
in the step's one transfer, saves, and exits 0. A stop signal after the window is a
person insisting: the worker dies at once of that signal.

SIGUSR1 asks for a checkpoint after the current step, and the run goes on (schedulers
send it ahead of a time limit: `sbatch --signal=USR1@120`). Its copies within the
window are one request too. launch.sh starts torchrun with SIGUSR1 ignored (its default
action would kill torchrun); the worker installs its own handler here.

The flags are plain attributes set by the handlers and read by the trainer into the
step's one device transfer, so every rank acts after the same step.
"""

from __future__ import annotations

import os
import signal
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunSignals:
    """`with RunSignals(window_s) as signals:` installs the handlers for the block.

    `stop_requested` names the first stop signal (None before); `save_requested` is
    True from a SIGUSR1 until `saved()` clears it."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.stop_requested: str | None = None
        self.save_requested = False
        self._first_stop = self._last_save = None
        self._previous = {}

    def __enter__(self):
        for sig in (*STOP_SIGNALS, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def saved(self) -> None:
        self.save_requested = False

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGUSR1:
            if self._last_save is None or now - self._last_save >= self.window_s:
                self.save_requested = True
                self._last_save = now
            return
        if self._first_stop is None:
            self._first_stop, self.stop_requested = now, signal.Signals(signum).name
            return
        if now - self._first_stop < self.window_s:
            return  # another copy of the same request
        print(f"[megalite] {signal.Signals(signum).name} {now - self._first_stop:.0f} s after "
              f"the stop request: exiting now, without a checkpoint", flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# torchrun sends SIGKILL this long after it forwards a stop (its shutdown timeout), and
# Slurm's default KillWait between SIGTERM and SIGKILL is the same.
STOP_BUDGET_S = 30.0


def stop_budget_warning(save_s: float, share_bytes: int, step_s: float | None) -> str | None:
    """The warning to print when finishing a step and saving may not fit STOP_BUDGET_S."""
    needed = save_s + (step_s or 0.0)
    if needed < STOP_BUDGET_S:
        return None
    step = f" plus a step of {step_s:.1f} s" if step_s else ""
    return (f"[megalite] warning: a stop (SIGINT/SIGTERM) must finish the step and save within "
            f"{STOP_BUDGET_S:.0f} s (torchrun's grace before SIGKILL, Slurm's default KillWait), "
            f"but saving this rank's {share_bytes / 2**20:.0f} MiB takes about {save_s:.1f} s at "
            f"the measured write speed{step}. Give the job more time to stop (Slurm: KillWait, "
            f"or sbatch --signal=USR1@120 to save ahead of the limit), write checkpoints to "
            f"faster storage, or shard the state over more ranks.")
