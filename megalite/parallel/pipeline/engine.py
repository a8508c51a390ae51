"""Pipeline parallelism: schedules as plain functions, and the engine that runs them.

A schedule is the ordered list of actions one pipeline rank performs in a step:
("F", chunk, micro_batch) or ("B", chunk, micro_batch), where `chunk` is the local
model chunk (always 0 unless virtual_stages > 1; see parallel/stage.py for which
virtual stage a chunk is).

- `gpipe`: every forward, then every backward: m micro-batches' activations alive.
- `one_f_one_b`: warm-up of pp-1-rank forwards, then one forward / one backward in
  turn, then the remaining backwards: at most pp - rank micro-batches alive.
- `interleaved`: 1F1B over v chunks per rank (Megatron's order): the bubble shrinks by
  v at the price of v times more p2p messages. Micro-batches run in groups of pp, so
  it needs m % pp == 0 (config.validate rejects the rest).
- `forward_only`: validation; no activations kept.

`PipelineEngine.run` executes a schedule. It runs every layout, pp = 1 included: one
stage has no p2p and runs each micro-batch's backward right after its forward (1F1B at
pp = 1, whatever schedule is configured), so activations never pile up. Each forward
receives its input from the previous virtual stage (rank - 1 around the pp ring), each
backward the output gradient from the next. After an action, its send and the receive the *next* action
needs go out together in one `batch_isend_irecv`, and only the receive is waited for:
sends never block, so a rank waits only on data that an earlier action of its peer
produces, and the schedules' dependency order has no cycle, hence no deadlock. Every
message carries a tag naming (direction, virtual stage, micro-batch), so messages
between the same two ranks cannot be confused. Shapes are known in advance (all ranks
hold every micro-batch's token ids), so receive buffers are allocated up front.
A micro-batch's saved input and output are dropped as soon as its backward ran, and
finished sends are released as the step goes.

The loss of each micro-batch is scaled by its weight (1/m in training) exactly once,
on the last virtual stage; the engine returns the weighted loss sum there (zero
elsewhere).
"""

from __future__ import annotations

import contextlib

import torch

from megalite.parallel import comm
from megalite.parallel.topology import Topology


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


class PipelineEngine:
    """Runs a schedule of this rank's model chunks over the pp group."""

    def __init__(self, model, topo: Topology, sequence_divisor: int = 1):
        """`sequence_divisor`: how many pieces the sequence is in between blocks (tp under
        tp_sp), so a receiver knows the hidden-state shape without asking."""
        self.model, self.topo = model, topo
        self.group = topo.pp_group
        self.pp, self.rank = topo.pp, topo.pp_rank
        self.v = len(model.stage.chunks)
        self.sequence_divisor = sequence_divisor
        self.peak_live = 0  # most micro-batches with saved activations at once, last run

    def _vstage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def _peer(self, offset: int) -> int:
        return self.group.ranks[(self.rank + offset) % self.pp]

    def _tag(self, backward: bool, vstage: int, mb: int) -> int:
        return (int(backward) * self.pp * self.v + vstage) * self.m + mb

    def _needs_recv(self, action) -> tuple | None:
        """(peer, tag, shape) of the message `action` waits for, or None."""
        kind, chunk, mb = action
        vs = self._vstage(chunk)
        if kind == "F" and vs > 0:
            return self._peer(-1), self._tag(False, vs, mb), self._shape(mb)
        if kind == "B" and vs < self.pp * self.v - 1:
            return self._peer(1), self._tag(True, vs, mb), self._shape(mb)
        return None

    def _shape(self, mb: int):
        inputs = self.batches[mb][0]
        return (inputs.shape[0], inputs.shape[1] // self.sequence_divisor, self.hidden)

    def _exchange(self, sends: list, recv) -> torch.Tensor | None:
        """Post this action's sends with the next action's receive; wait for the receive."""
        buf, recvs = None, []
        if recv is not None:
            peer, tag, shape = recv
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            recvs.append((buf, peer, tag))
        if not sends and not recvs:
            return None
        works = comm.p2p(self.group, sends, recvs)
        if recv is not None:
            comm.run(self.group, "p2p", 0, works.pop().wait)
        # Keep a send's buffer only until it has left.
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]
        self.pending += [(w, t) for w, (t, _, _) in zip(works, sends)]
        return buf

    def run(self, schedule: str, batches: list, weights: list[float],
            final_backward=contextlib.nullcontext) -> torch.Tensor:
        """Run `batches` [(inputs, targets, position_ids)] through the pipeline.

        `schedule`: gpipe | 1f1b | interleaved, or "forward" (no backward, no grad).
        `final_backward()`: a context around this rank's last backward action, after which
        no gradient changes (the data-parallel buckets reduce inside it).
        Returns the sum of weight * loss over micro-batches on the last stage, else 0.
        """
        self.m, self.batches = len(batches), batches
        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.hidden = self.model.cfg.hidden_size
        train = schedule != "forward"
        if self.pp == 1 and train:
            # One stage: nothing to overlap, so each micro-batch's backward follows its
            # forward whatever the schedule, and activations never pile up.
            schedule = "1f1b"
        plan = (SCHEDULES[schedule] if train else forward_only)(self.m, self.pp, self.rank, self.v)
        last_vstage = self.pp * self.v - 1
        self.pending, saved, self.peak_live = [], {}, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        received = self._exchange([], self._needs_recv(plan[0]))
        last_backward = max((i for i, a in enumerate(plan) if a[0] == "B"), default=-1)
        for step, (kind, chunk, mb) in enumerate(plan):
            vs = self._vstage(chunk)
            sends = []
            inputs, targets, positions = batches[mb]
            if positions is None:
                positions = torch.arange(inputs.shape[1], device=inputs.device)
            if kind == "F":
                x = inputs if vs == 0 else received.requires_grad_(train)
                with torch.set_grad_enabled(train):
                    out = self.model(x, targets if vs == last_vstage else None, positions,
                                     chunk=chunk)
                if vs == last_vstage:
                    out = out * weights[mb]
                    loss_sum += out.detach()
                else:
                    sends.append((out.detach(), self._peer(1), self._tag(False, vs + 1, mb)))
                if train:
                    saved[(chunk, mb)] = (x, out)
                    self.peak_live = max(self.peak_live, len(saved))
            else:
                x, out = saved.pop((chunk, mb))
                with final_backward() if step == last_backward else contextlib.nullcontext():
                    torch.autograd.backward(out, None if vs == last_vstage else received)
                if vs > 0:
                    sends.append((x.grad, self._peer(-1), self._tag(True, vs - 1, mb)))
            following = plan[step + 1] if step + 1 < len(plan) else None
            received = self._exchange(sends, following and self._needs_recv(following))
        for work, _ in self.pending:
            comm.run(self.group, "p2p", 0, work.wait)
        self.pending = []
        return loss_sum

