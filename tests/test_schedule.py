"""LR schedule values at chosen steps, shapes between them, and the resume check."""

import math

import pytest

from megalite.config import Config
from megalite.errors import CheckpointError
from megalite.optim.schedule import LRSchedule

LR, MIN_LR = 1e-3, 1e-4


def make(kind, warmup=10, total=100, decay_fraction=0.2):
    return LRSchedule(LR, MIN_LR, warmup, total, kind, decay_fraction)


@pytest.mark.parametrize("kind", ["constant", "cosine", "wsd"])
def test_warmup_is_linear_from_zero_to_lr(kind):
    s = make(kind)
    assert s(1) == pytest.approx(LR / 10)
    assert s(5) == pytest.approx(LR / 2)
    assert s(10) == pytest.approx(LR)
    ups = [s(i) for i in range(1, 11)]
    assert all(a < b for a, b in zip(ups, ups[1:]))


def test_constant_ignores_min_lr():
    s = make("constant")
    assert [s(i) for i in (11, 50, 100, 1000)] == [LR] * 4


def test_no_warmup_starts_at_lr():
    assert make("constant", warmup=0)(1) == make("constant", warmup=0)(0) == LR
    assert make("cosine", warmup=0)(1) == pytest.approx(LR, rel=1e-3)


def test_cosine_values_and_shape():
    s = make("cosine")
    assert s(55) == pytest.approx((LR + MIN_LR) / 2)  # half-way through the decay
    assert s(100) == pytest.approx(MIN_LR, abs=1e-15)
    assert s(101) == s(500) == pytest.approx(MIN_LR, abs=1e-15)
    expected_30 = MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 20 / 90))
    assert s(30) == pytest.approx(expected_30)
    downs = [s(i) for i in range(10, 101)]
    assert all(a > b for a, b in zip(downs, downs[1:]))
    assert min(s(i) for i in range(1, 300) if i > 10) >= MIN_LR - 1e-15


def test_wsd_values_and_shape():
    s = make("wsd", decay_fraction=0.2)  # decay over steps 81..100
    assert s(11) == s(50) == s(80) == LR
    assert s(90) == pytest.approx(LR - (LR - MIN_LR) * 0.5)
    assert s(100) == pytest.approx(MIN_LR)
    assert s(150) == pytest.approx(MIN_LR)
    downs = [s(i) for i in range(80, 101)]
    assert all(a > b for a, b in zip(downs, downs[1:]))


def test_wsd_decay_never_eats_warmup_and_zero_fraction_keeps_lr():
    s = make("wsd", warmup=10, total=12, decay_fraction=0.9)
    assert s(10) == pytest.approx(LR)
    assert s(11) == pytest.approx((LR + MIN_LR) / 2)
    assert s(12) == pytest.approx(MIN_LR)
    flat = make("wsd", decay_fraction=0.0)
    assert flat(100) == flat(200) == LR


def test_from_config_uses_optim_and_train_steps():
    cfg = Config()
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps = "wsd", 4, 40
    s = LRSchedule.from_config(cfg)
    assert (s.kind, s.warmup_steps, s.total_steps, s.lr) == ("wsd", 4, 40, cfg.optim.lr)


def test_state_dict_round_trip_and_mismatch():
    s = make("cosine")
    assert s.load_state_dict(dict(s.state_dict())) == []
    other = make("cosine", total=200).state_dict()
    with pytest.raises(CheckpointError, match="total_steps"):
        s.load_state_dict(other)
    assert s.load_state_dict(other, strict=False) == ["total_steps: 200 -> 100"]
    assert s(100) == pytest.approx(MIN_LR, abs=1e-15)  # current parameters are kept


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="linear"):
        LRSchedule(LR, MIN_LR, 0, 10, "linear")
