"""Step guard: decide whether an optimizer update must be skipped.

A non-finite loss or gradient norm would poison the weights and the Adam moments for
good, and a sudden loss spike (a bad batch, an fp16 overflow that slipped past the
scaler) often precedes divergence. The trainer calls `StepGuard.check` after the
backward pass and before `optimizer.step`; a returned reason means "drop the
gradients of this step". Every rank must call it with the same, globally reduced
loss and norm so all ranks reach the same decision.

The spike test compares the loss with the mean of the last `window` accepted losses.
It waits for `min(window, 5)` accepted steps first, so the fast-moving losses of the
first steps are not judged against an empty or one-sample mean. Skipped losses never
enter the mean, so one spike cannot raise the bar for the next. `consecutive` counts
skips in a row: a loss that moved up for good keeps being skipped, and the trainer
can stop with a clear message when that count grows.
"""

from __future__ import annotations

import math
from collections import deque

REASONS = ("nan_loss", "nan_grad", "spike", "overflow")
GRACE_STEPS = 5


class StepGuard:
    """Skip decisions for non-finite values and loss spikes, with checkpointable state."""

    def __init__(self, spike_factor: float = 0.0, window: int = 20):
        if window < 1:
            raise ValueError(f"guard window must be >= 1, got {window}")
        self.spike_factor = float(spike_factor)  # 0 disables spike detection
        self.window = int(window)
        self.history: deque[float] = deque(maxlen=self.window)
        self.skipped = 0
        self.skipped_by_reason = dict.fromkeys(REASONS, 0)
        self.consecutive = 0

    @classmethod
    def from_config(cls, cfg) -> "StepGuard":
        return cls(cfg.train.guard_spike_factor, cfg.train.guard_window)

    @property
    def mean(self) -> float | None:
        """Mean of the accepted losses in the window, None before the first one."""
        return sum(self.history) / len(self.history) if self.history else None

    def _reason(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return "nan_loss"
        if not math.isfinite(grad_norm):
            return "nan_grad"
        if (self.spike_factor > 0 and len(self.history) >= min(self.window, GRACE_STEPS)
                and loss > self.spike_factor * self.mean):
            return "spike"
        return None

    def check(self, loss: float, grad_norm: float, overflow: bool = False) -> str | None:
        """Return why this step must be skipped, or None to apply it; record the outcome.
        `overflow`: fp16 gradients overflowed at the current loss scale (the scaler
        lowers it); skipped and counted, the loss kept out of the spike mean."""
        reason = "overflow" if overflow else self._reason(float(loss), float(grad_norm))
        if reason is None:
            self.history.append(float(loss))
            self.consecutive = 0
        else:
            self.skipped += 1
            self.skipped_by_reason[reason] += 1
            self.consecutive += 1
        return reason

    def state_dict(self) -> dict:
        """JSON-able state: the accepted-loss window and the skip counters."""
        return {"history": list(self.history), "skipped": self.skipped,
                "skipped_by_reason": dict(self.skipped_by_reason),
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        # deque(maxlen) keeps the newest losses if the window shrank since the save.
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)
        self.skipped = int(state["skipped"])
        self.skipped_by_reason = dict.fromkeys(REASONS, 0)
        self.skipped_by_reason.update({k: int(v) for k, v in state["skipped_by_reason"].items()})
        self.consecutive = int(state["consecutive"])
