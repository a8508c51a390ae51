"""Learning-rate schedules: linear warm-up followed by constant, cosine or WSD.

`LRSchedule(step)` gives the learning rate for optimizer update number `step`
(updates count from 1, as checkpoints and metrics do). The schedule is a pure function
of its parameters, so resuming needs no state; `state_dict` still records the
parameters so a resume can notice that the schedule it continues is not the one the
checkpoint was trained with.

Shapes, for `warmup_steps = W`, `total_steps = T`:

- warm-up (all kinds): `lr * step / W` for `step <= W`, reaching `lr` at step W.
- constant: `lr` after warm-up; `min_lr` plays no part.
- cosine: `min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2` with
  `p = (step - W) / (T - W)`, so it equals `min_lr` exactly at step T and stays there.
- wsd (warm-up, stable, decay): `lr` until the decay starts, then a linear ramp down
  over the last `D = round(decay_fraction * T)` steps (never eating into warm-up),
  reaching `min_lr` exactly at step T and staying there (decay_fraction 0: `lr` to
  the end). Linear is the simplest
  shape that keeps the "cool-down at the end" property WSD is used for: a checkpoint
  taken before the decay can be branched and decayed for any longer run.
"""

from __future__ import annotations

import math

from megalite.errors import CheckpointError

KINDS = ("constant", "cosine", "wsd")


class LRSchedule:
    """Learning rate as a function of the optimizer update number (from 1)."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                 kind: str = "cosine", decay_fraction: float = 0.2):
        if kind not in KINDS:
            raise ValueError(f"unknown LR schedule '{kind}'; expected one of {', '.join(KINDS)}")
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, "
                             f"got {total_steps} and {warmup_steps}")
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.decay_fraction = float(decay_fraction)
        decay_steps = round(self.decay_fraction * self.total_steps)
        self._decay_start = max(self.warmup_steps, self.total_steps - decay_steps)

    @classmethod
    def from_config(cls, cfg) -> "LRSchedule":
        """Build the schedule of a `Config` (optim section, length from train.steps)."""
        o = cfg.optim
        return cls(o.lr, o.min_lr, o.warmup_steps, cfg.train.steps, o.schedule, o.decay_fraction)

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            span = self.total_steps - self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        span = self.total_steps - self._decay_start
        if step <= self._decay_start or span <= 0:  # stable phase; decay_fraction 0: no decay
            return self.lr
        progress = min(1.0, (step - self._decay_start) / span)
        return self.lr - (self.lr - self.min_lr) * progress

    def state_dict(self) -> dict:
        """The parameters (JSON-able): the schedule has no other state."""
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "kind": self.kind,
                "decay_fraction": self.decay_fraction}

    def load_state_dict(self, state: dict, strict: bool = True) -> list[str]:
        """Compare a checkpoint's schedule with this one; the current parameters are kept.

        Returns the differences as "key: checkpoint -> now" lines. With `strict`, any
        difference raises `CheckpointError`, because a resumed run would then follow a
        different learning-rate curve than the one it was trained on.
        """
        mine = self.state_dict()
        diffs = [f"{key}: {state[key]!r} -> {mine[key]!r}"
                 for key in mine if key in state and state[key] != mine[key]]
        if diffs and strict:
            raise CheckpointError(
                "the checkpoint was trained with a different learning-rate schedule ("
                + "; ".join(diffs) + "). Resume with the checkpoint's optim/train.steps "
                "values, or start a new run directory to change the schedule.")
        return diffs


from_config = LRSchedule.from_config
