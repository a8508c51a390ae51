"""Pipeline schedules as plain functions, and the lock-step rounds that carry their messages.

A schedule is the ordered list of actions one pipeline rank performs in a step:
("F", chunk, micro_batch) or ("B", chunk, micro_batch), where `chunk` is the local
model chunk (always 0 unless virtual_stages > 1; see stage.py for which virtual stage
a chunk is).

- `gpipe`: every forward, then every backward: m micro-batches' activations alive.
- `one_f_one_b`: warm-up of pp-1-rank forwards, then one forward / one backward in
  turn, then the remaining backwards: at most pp - rank micro-batches alive.
- `interleaved`: 1F1B over v chunks per rank (Megatron's order): the bubble shrinks by
  v at the price of v times more p2p messages. Micro-batches run in groups of pp, so
  it needs m % pp == 0 (config.validate rejects the rest).
- `forward_only`: validation; no activations kept.

`rounds` turns the schedules of all pp ranks into one global timetable that every rank
computes alike. Round t: each rank runs its next action if the message it needs was
produced in an earlier round, then every rank posts ONE p2p batch holding the messages
produced in round t that it sends and the ones it receives. A message is posted in the
same round by both ends, so each batch is mirrored by its neighbours' batch of that
round, and batches are posted in round order. That is what NCCL needs (DESIGN.md,
"Invariants for GPUs and NCCL"): the k-th send from a to b meets the k-th receive on b
from a without tags, a batch can finish because all its partners are in the
partners' batch of the same round, and by induction over rounds every batch finishes,
whatever the schedule, v or m. Each rank runs at most one action per round, so a
batch carries at most one message per direction between two ranks: nothing to
confuse even when both neighbours are one rank (pp = 2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


def gpipe(m: int, pp: int, rank: int, v: int = 1) -> list[tuple]:
    return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]


def one_f_one_b(m: int, pp: int, rank: int, v: int = 1) -> list[tuple]:
    warmup = min(pp - rank - 1, m)
    actions = [("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [("F", 0, warmup + i), ("B", 0, i)]
    return actions + [("B", 0, i) for i in range(m - warmup, m)]


def interleaved(m: int, pp: int, rank: int, v: int) -> list[tuple]:
    """Megatron's interleaved 1F1B: virtual micro-batch k walks chunks in groups of pp."""
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({m}) divisible by pp ({pp})")
    total = m * v

    def unit(k: int, backward: bool) -> tuple:
        chunk = (k // pp) % v
        return (v - 1 - chunk if backward else chunk), (k // (pp * v)) * pp + k % pp

    # m == pp: the warm-up would overrun the steady phase; run every forward first.
    warmup = total if m == pp else min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    actions = [("F", *unit(k, False)) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [("F", *unit(warmup + k, False)), ("B", *unit(k, True))]
    return actions + [("B", *unit(k, True)) for k in range(total - warmup, total)]


def forward_only(m: int, pp: int, rank: int, v: int = 1) -> list[tuple]:
    return [("F", c, i) for i in range(m) for c in range(v)]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved}


@dataclass
class Round:
    """What one rank does in one round: an action (or None while it waits) and the
    messages of that round it sends and receives, as (message, peer pipeline rank).
    A message is (kind, destination virtual stage, micro-batch): ("F", s, i) is the
    activation entering stage s, ("B", s, i) the gradient of stage s's output."""
    action: tuple | None
    sends: list = field(default_factory=list)
    recvs: list = field(default_factory=list)


def _messages(action: tuple, rank: int, pp: int, v: int):
    """(message consumed or None, message produced or None) by `action` on `rank`."""
    kind, chunk, mb = action
    vs, last = chunk * pp + rank, pp * v - 1
    if kind == "F":
        return (("F", vs, mb) if vs > 0 else None), (("F", vs + 1, mb) if vs < last else None)
    return (("B", vs, mb) if vs < last else None), (("B", vs - 1, mb) if vs > 0 else None)


def rounds(plans: list[list[tuple]], v: int) -> list[list[Round]]:
    """Every rank's rounds for the schedules `plans` (plans[r]: rank r's actions).
    Rounds in which a rank neither acts nor communicates are left out of its list.
    Raises ValueError if the schedules deadlock (an action waits for a message that
    is never produced)."""
    pp = len(plans)
    cursor, produced_before = [0] * pp, set()
    out: list[list[Round]] = [[] for _ in range(pp)]
    while any(cursor[r] < len(plans[r]) for r in range(pp)):
        this_round = [Round(None) for _ in range(pp)]
        produced = []
        for r in range(pp):
            if cursor[r] == len(plans[r]):
                continue
            action = plans[r][cursor[r]]
            consumed, message = _messages(action, r, pp, v)
            if consumed is not None and consumed not in produced_before:
                continue
            this_round[r].action = action
            cursor[r] += 1
            if message is not None:
                produced.append((r, message))
        if all(rd.action is None for rd in this_round):
            raise ValueError(f"pipeline schedules deadlock: rank positions {cursor} of "
                             f"{[len(p) for p in plans]} actions")
        for src, message in produced:
            dst = message[1] % pp
            if dst == src:
                raise ValueError(f"virtual stages {message[1] - 1} and {message[1]} are both "
                                 f"on pipeline rank {src}; use pp > 1 with virtual stages")
            this_round[src].sends.append((message, dst))
            this_round[dst].recvs.append((message, src))
            produced_before.add(message)
        for r, rd in enumerate(this_round):
            if rd.action is not None or rd.sends or rd.recvs:
                out[r].append(rd)
    return out


@functools.lru_cache(maxsize=256)
def most_waiting(schedule: str, m: int, pp: int, v: int) -> tuple[int, ...]:
    """Per rank, the most messages it holds received but not yet used at once: the
    receive buffers alive beside the activations (1 for GPipe, 2 for 1F1B, up to 4 for
    interleaved 1F1B up to pp = 8, v = 4). `schedule`: a SCHEDULES name or "forward"."""
    make = forward_only if schedule == "forward" else SCHEDULES[schedule]
    timetable = rounds([make(m, pp, r, v) for r in range(pp)], v)
    out = []
    for rank, mine in enumerate(timetable):
        waiting, most = set(), 0
        for rnd in mine:
            if rnd.action is not None:
                waiting.discard(_messages(rnd.action, rank, pp, v)[0])
            waiting |= {message for message, _ in rnd.recvs}
            most = max(most, len(waiting))
        out.append(most)
    return tuple(out)
