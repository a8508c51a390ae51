"""StepGuard: skip reasons, the warm-up grace, the window, and checkpoint round-trip."""

import json
import math

from megalite.training.guard import StepGuard


def feed(guard, losses, grad_norm=1.0):
    return [guard.check(x, grad_norm) for x in losses]


def test_non_finite_values_always_skip():
    g = StepGuard(spike_factor=0.0, window=4)
    assert g.check(float("nan"), 1.0) == "nan_loss"
    assert g.check(float("inf"), 1.0) == "nan_loss"
    assert g.check(2.0, float("nan")) == "nan_grad"
    assert g.check(2.0, float("-inf")) == "nan_grad"
    assert g.check(2.0, 1.0) is None
    assert g.skipped == 4
    assert g.skipped_by_reason == {"nan_loss": 2, "nan_grad": 2, "spike": 0, "overflow": 0}
    assert g.check(2.0, float("inf"), overflow=True) == "overflow"
    assert g.skipped_by_reason["overflow"] == 1 and len(g.history) == 1
    assert list(g.history) == [2.0]  # skipped losses never enter the mean


def test_spike_detected_after_grace_only():
    g = StepGuard(spike_factor=2.0, window=20)
    # The first 5 accepted steps are never judged, even on a huge jump.
    assert feed(g, [10.0, 1.0, 1.0, 1.0, 1.0]) == [None] * 5
    assert g.mean == 2.8
    assert g.check(5.7, 1.0) == "spike"
    assert g.check(5.5, 1.0) is None
    assert g.skipped_by_reason["spike"] == 1


def test_spike_factor_zero_disables_spikes():
    g = StepGuard(spike_factor=0.0, window=3)
    assert feed(g, [1.0] * 5 + [1e6]) == [None] * 6


def test_small_window_sets_grace_and_mean_moves_with_window():
    g = StepGuard(spike_factor=2.0, window=2)
    assert feed(g, [1.0, 1.0]) == [None, None]
    assert g.check(2.5, 1.0) == "spike"  # grace is min(window, 5) = 2
    assert feed(g, [1.9, 2.8]) == [None, None]  # 2.8 <= 2 * mean(1.0, 1.9)
    assert list(g.history) == [1.9, 2.8]  # the oldest 1.0 left the window
    assert g.check(4.6, 1.0) is None  # 4.6 <= 2 * 2.35
    assert g.check(7.5, 1.0) == "spike"  # mean now (2.8 + 4.6) / 2 = 3.7


def test_spike_not_added_and_consecutive_counts():
    g = StepGuard(spike_factor=1.5, window=5)
    feed(g, [1.0] * 5)
    assert feed(g, [3.0, 3.0, 3.0]) == ["spike"] * 3
    assert g.consecutive == 3 and g.mean == 1.0
    assert g.check(1.1, 1.0) is None and g.consecutive == 0


def test_state_round_trip_gives_identical_decisions():
    a = StepGuard(spike_factor=1.5, window=6)
    feed(a, [4.0, 3.0, 2.5, float("nan"), 2.4, 2.2, 9.0, 2.1, 2.0])
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    b = StepGuard(spike_factor=1.5, window=6)
    b.load_state_dict(state)
    future = [2.0, 3.3, 3.0, float("inf"), 1.9, 2.9, 2.8, 4.5]
    assert feed(a, future) == feed(b, future)
    assert a.state_dict() == b.state_dict()
    assert b.skipped == a.skipped and b.skipped_by_reason == a.skipped_by_reason
    assert not any(math.isnan(x) for x in b.history)
