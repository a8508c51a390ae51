"""Pipeline schedules as plain functions: completeness, memory bound, no deadlock, bubble.

`simulate` plays every rank's action list against the data dependencies (a forward of
virtual stage s needs s-1's forward of the same micro-batch, a backward needs s+1's
backward), with a fixed cost per action. A schedule that could deadlock stops making
progress here; one that does not gives the idle share of the step, which must equal
the textbook bubble. The distributed engine runs exactly these lists (see
test_parity.py for its parity and live-activation tests).
"""

import pytest

from megalite.parallel.pipeline.schedules import SCHEDULES, forward_only, interleaved


def simulate(schedule, m, pp, v=1, forward_cost=1.0, backward_cost=2.0):
    """(bubble fraction, peak live micro-batches per rank) of a schedule."""
    plans = [list(SCHEDULES[schedule](m, pp, r, v)) for r in range(pp)]
    last = pp * v - 1
    done, clock, cursor = {}, [0.0] * pp, [0] * pp
    live, peak = [0] * pp, [0] * pp
    while any(cursor[r] < len(plans[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if cursor[r] == len(plans[r]):
                continue
            kind, chunk, mb = plans[r][cursor[r]]
            vs = chunk * pp + r
            need = [("F", vs - 1, mb)] if kind == "F" and vs > 0 else []
            if kind == "B":
                need = [("F", vs, mb)] + ([("B", vs + 1, mb)] if vs < last else [])
            if any(n not in done for n in need):
                continue
            cost = (forward_cost if kind == "F" else backward_cost) / v
            start = max([clock[r]] + [done[n] for n in need])
            clock[r] = done[(kind, vs, mb)] = start + cost
            live[r] += 1 if kind == "F" else -1
            peak[r] = max(peak[r], live[r])
            cursor[r] += 1
            progressed = True
        assert progressed, f"{schedule} deadlocks at m={m}, pp={pp}, v={v}: {cursor}"
    busy = m * (1.0 + 2.0)
    return 1 - busy / max(clock), peak


CASES = [(s, m, pp) for s in ("gpipe", "1f1b") for pp in (2, 4) for m in (pp, pp + 1, 2 * pp, 16)]


@pytest.mark.parametrize("schedule, m, pp", CASES)
def test_every_micro_batch_runs_forward_then_backward_once(schedule, m, pp):
    for rank in range(pp):
        plan = SCHEDULES[schedule](m, pp, rank)
        assert sorted(a for a in plan if a[0] == "F") == [("F", 0, i) for i in range(m)]
        assert sorted(a for a in plan if a[0] == "B") == [("B", 0, i) for i in range(m)]
        for i in range(m):
            assert plan.index(("F", 0, i)) < plan.index(("B", 0, i))


@pytest.mark.parametrize("schedule, m, pp", CASES)
def test_bubble_matches_theory_and_memory_bound(schedule, m, pp):
    bubble, peak = simulate(schedule, m, pp)
    assert bubble == pytest.approx((pp - 1) / (m + pp - 1))
    if schedule == "gpipe":
        assert peak == [m] * pp
    else:
        assert peak == [min(pp - r, m) for r in range(pp)]


@pytest.mark.parametrize("m, pp, v", [(2, 2, 2), (4, 2, 2), (8, 2, 2), (4, 4, 2), (8, 4, 2),
                                      (16, 4, 2), (8, 2, 4)])
def test_interleaved_runs_every_chunk_and_shrinks_the_bubble(m, pp, v):
    for rank in range(pp):
        plan = interleaved(m, pp, rank, v)
        assert sorted(plan) == sorted((k, c, i) for k in "BF" for c in range(v) for i in range(m))
    bubble, _ = simulate("interleaved", m, pp, v)
    assert bubble == pytest.approx((pp - 1) / (v * m + pp - 1))


def test_interleaved_needs_micro_batches_in_groups_of_pp():
    with pytest.raises(ValueError, match="divisible by pp"):
        interleaved(5, 2, 0, 2)


def test_forward_only_visits_each_chunk_of_each_micro_batch():
    assert forward_only(2, 2, 0, 2) == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1)]
