"""Record the p2p a real run posts, and replay it under NCCL's rules.

`Recorder` patches `torch.distributed.batch_isend_irecv` in one process: every batch
the code posts is kept, in posting order, as a list of `Op`s, and then really posted,
so the run itself goes on unchanged on gloo. A test gathers every rank's record and
hands them to `simulate`.

`simulate` holds the rules DESIGN.md lists under "Invariants for GPUs and NCCL", which
gloo (tags, sends that never block) does not:
- no tags: on each communicator, the k-th send from a to b meets the k-th receive on b
  from a, and the two must agree in shape and dtype;
- one stream per communicator: a rank runs its batches on it in posting order, one at
  a time; a batch ends only when every op in it has run;
- an op runs only while its partner's batch is the one running on the partner (a send
  may wait for its receiver, as NCCL's large sends do).
It replays the batches until nothing can move, and raises `P2PViolation` for an op that
never meets a partner, a size mismatch, or a deadlock (naming each stuck rank's batch
and where its partners are). Communicators are independent (each has its own stream);
ops are grouped by the group's member ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.distributed as dist


class P2PViolation(AssertionError):
    pass


@dataclass(frozen=True)
class Op:
    kind: str  # "send" | "recv"
    group: tuple  # the communicator's global ranks
    peer: int  # global rank
    shape: tuple
    dtype: str
    tag: int


class Recorder:
    """with Recorder() as rec: ...  rec.batches: this rank's batches, each a list of Ops."""

    def __init__(self):
        self.batches: list[list[Op]] = []

    def __enter__(self):
        self._original = dist.batch_isend_irecv

        def recording(ops):
            self.batches.append([_op(p) for p in ops])
            return self._original(ops)

        dist.batch_isend_irecv = recording
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self._original


def _op(p2p_op) -> Op:
    kind = {dist.isend: "send", dist.irecv: "recv"}[p2p_op.op]
    group = tuple(dist.get_process_group_ranks(p2p_op.group)) if p2p_op.group is not None \
        else tuple(range(dist.get_world_size()))
    t = p2p_op.tensor
    return Op(kind, group, p2p_op.peer, tuple(t.shape), str(t.dtype), p2p_op.tag)


def simulate(records: dict) -> int:
    """Replay `records` {global rank: [batch of Ops, ...]}; returns the batches replayed."""
    per_group = defaultdict(lambda: defaultdict(list))
    for rank, batches in records.items():
        for batch in batches:
            groups = {op.group for op in batch}
            if len(groups) != 1:
                raise P2PViolation(f"rank {rank} posted one batch over several groups {groups}")
            per_group[groups.pop()][rank].append(batch)
    return sum(_replay(group, batches) for group, batches in per_group.items())


def _replay(group: tuple, batches: dict) -> int:
    # partner[(rank, batch, index)] = (peer, batch, index): the k-th send a->b with the
    # k-th receive on b from a
    queues = defaultdict(list)  # (kind, me, peer) -> [(rank, batch, index)]
    for rank, bs in batches.items():
        for b, batch in enumerate(bs):
            for i, op in enumerate(batch):
                queues[(op.kind, rank, op.peer)].append((rank, b, i))
    partner = {}
    for (kind, a, b), sends in queues.items():
        if kind != "send":
            continue
        recvs = queues.get(("recv", b, a), [])
        for k in range(max(len(sends), len(recvs))):
            if k >= len(recvs) or k >= len(sends):
                side = f"send #{k} from {a} to {b}" if k >= len(recvs) else \
                    f"receive #{k} on {b} from {a}"
                raise P2PViolation(f"group {group}: {side} never meets a partner "
                                   f"({len(sends)} sends, {len(recvs)} receives)")
            s, r = sends[k], recvs[k]
            send_op, recv_op = batches[a][s[1]][s[2]], batches[b][r[1]][r[2]]
            if (send_op.shape, send_op.dtype) != (recv_op.shape, recv_op.dtype):
                raise P2PViolation(
                    f"group {group}: send #{k} from {a} to {b} (batch {s[1]}) is "
                    f"{send_op.shape} {send_op.dtype} but the receive it meets (batch {r[1]}) "
                    f"is {recv_op.shape} {recv_op.dtype}")
            partner[s], partner[r] = r, s
    for (kind, a, b), recvs in queues.items():
        if kind == "recv" and ("send", b, a) not in queues:
            raise P2PViolation(f"group {group}: receive #0 on {a} from {b} never meets a "
                               f"partner (0 sends, {len(recvs)} receives)")

    current = {rank: 0 for rank in batches}
    done = set()
    moved = True
    while moved:
        moved = False
        for rank, bs in batches.items():
            if current[rank] == len(bs):
                continue
            b = current[rank]
            for i in range(len(bs[b])):
                peer, pb, pi = partner[(rank, b, i)]
                if (rank, b, i) not in done and current[peer] == pb:
                    done |= {(rank, b, i), (peer, pb, pi)}
                    moved = True
            if all((rank, b, i) in done for i in range(len(bs[b]))):
                current[rank] += 1
                moved = True
    stuck = [rank for rank, bs in batches.items() if current[rank] < len(bs)]
    if stuck:
        lines = []
        for rank in stuck:
            b = current[rank]
            waits = [f"{op.kind} with {op.peer} (its partner is in {op.peer}'s batch "
                     f"{partner[(rank, b, i)][1]}, {op.peer} is at batch {current[op.peer]})"
                     for i, op in enumerate(batches[rank][b]) if (rank, b, i) not in done]
            lines.append(f"rank {rank} at batch {b} of {len(batches[rank])}: " + "; ".join(waits))
        raise P2PViolation(f"group {group} deadlocks under NCCL's rules:\n" + "\n".join(lines))
    return sum(len(bs) for bs in batches.values())
