"""Dynamic loss scaling for fp16 training.

fp16 gradients underflow to zero below ~6e-8, so the loss is multiplied by a large
scale before backward and the gradients divided by it before the update. The scale
starts at 2^k (`train.loss_scale_init_pow`), doubles after `growth_interval`
consecutive steps without overflow (`train.loss_scale_window`), and on overflow the
step is skipped on every rank (the optimizer all-reduces the flag) and the scale is
halved once `hysteresis` overflows have been seen since the last growth
(`train.loss_scale_hysteresis`; with 1 it halves at every overflow), never below
`min_scale` (`train.loss_scale_min`). The same rule as Megatron's DynamicGradScaler.
"""

from __future__ import annotations


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 hysteresis: int = 2, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5):
        if init_scale <= 0 or min_scale <= 0 or growth_interval < 1 or hysteresis < 1:
            raise ValueError("loss scaler: init_scale and min_scale must be > 0, "
                             "growth_interval and hysteresis >= 1")
        self.scale = float(init_scale)
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.min_scale = float(min_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_tracker = 0  # steps without overflow since the last change
        self.hysteresis_tracker = hysteresis  # overflows still tolerated before backing off

    @classmethod
    def from_config(cls, cfg) -> "DynamicLossScaler":
        t = cfg.train
        return cls(2.0 ** t.loss_scale_init_pow, t.loss_scale_window, t.loss_scale_hysteresis,
                   t.loss_scale_min)

    def scale_loss(self, loss):
        return loss * self.scale

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
