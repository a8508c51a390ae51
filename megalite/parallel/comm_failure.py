"""Why a collective failed: comm.py's explanation, from what every member reports.

Each comm.Group numbers the collectives it enters (plain ints, no store traffic on the
normal path). When one fails (a peer died, or the group's timeout passed), the rank
publishes its numbers on every group it is in to the c10d store (a peer stuck in
another group's collective fails there and still reports for this one), then waits a
bounded grace for the other members' numbers: one behind did not take part, one silent
is dead or hung outside a collective. Store trouble leaves the plain message. Like
comm.py, and only for this, it calls torch.distributed.
"""

from __future__ import annotations

import time

import torch.distributed as dist

REPORT_GRACE_S = 10.0  # the longest a failure waits for the other members' numbers


class CollectiveError(RuntimeError):
    pass


def _key(group, rank: int) -> str:
    # torch names a process group by a counter that every rank advances in the same order
    # (all ranks call new_group), so the name is the same on every member and unique per
    # group instance in this world, even when a topology is re-created with equal members.
    return f"megalite/calls/{group.name}/{group.pg.group_name}/{rank}"


def _peers(group, op: str, call: int, me: int, live) -> str:
    """Publish this rank's numbers on every live group, then say how far each other member
    of `group` got, waiting for their numbers at most one timeout (a member stuck in
    another collective when this one failed fails within it), capped at REPORT_GRACE_S."""
    store = dist.distributed_c10d._get_default_store()
    for g in list(live):  # skip destroyed groups: a later world may reuse their names
        if g.pg in dist.distributed_c10d._world.pg_map:
            store.set(_key(g, me), f"{g.calls} {g.last_op} {g.p2p_calls}")
    try:
        timeout = group.pg._get_backend(group.device).options._timeout.total_seconds()
    except Exception:
        timeout = REPORT_GRACE_S
    others = [r for r in group.ranks if r != me]
    # Poll check() rather than wait(): a wait that runs out logs socket timeouts that
    # read like the cause of the failure.
    deadline = time.monotonic() + min(timeout, REPORT_GRACE_S)
    while not store.check([_key(group, r) for r in others]) and time.monotonic() < deadline:
        time.sleep(0.05)
    parts = []
    for r in others:
        if not store.check([_key(group, r)]):
            parts.append(f"rank {r} did not report (dead, or hung outside a collective)")
            continue
        n, last, p2p_n = store.get(_key(group, r)).decode().split()
        if op == "p2p":  # p2p numbers are per stage: informative, not comparable
            parts.append(f"rank {r} reached p2p call #{p2p_n}")
        else:
            behind = f" and did not take part in call #{call}" if int(n) < call else ""
            parts.append(f"rank {r} reached call #{n} ({last}){behind}")
    return "; ".join(parts)


def explain_failure(group, op: str, call: int, e: Exception, me: int, live
                    ) -> CollectiveError:
    """The CollectiveError for call #`call` (`op`) of `group` that failed with `e` on
    global rank `me`; `live`: every group with a process group, whose numbers this rank
    publishes for its peers' reports."""
    try:
        peers = f" {_peers(group, op, call, me, live)}."
    except Exception:  # no store, or it failed too: the plain message still holds
        peers = ""
    return CollectiveError(
        f"{op} on the {group.name} group (ranks {list(group.ranks)}) failed on global rank "
        f"{me} at its {'p2p ' if op == 'p2p' else ''}call #{call} on this group: {e}.{peers} "
        f"A peer rank probably died or hung; see its log in the run directory. "
        f"parallel.timeout_s sets how long a collective waits.")
