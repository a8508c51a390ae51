"""The pipeline engine: runs this rank's model chunks through a schedule over the pp group.

It runs every layout, pp = 1 included: one stage has no p2p and runs each
micro-batch's backward right after its forward (1F1B at pp = 1, whatever schedule is
configured), so activations never pile up.

The engine walks the lock-step rounds of `schedules.rounds` (every rank derives the
same timetable from the schedules of all ranks): in each round it runs its action,
then posts one `batch_isend_irecv` with that round's sends and receives, which its
neighbours mirror in the same round. No tags, no reliance on sends that never block:
the batch order alone pairs messages, as NCCL requires (schedules.py says why no
schedule can deadlock). A received tensor is waited for only when the action that
needs it runs; a sent tensor is kept alive until its batch completed. Shapes are known
in advance (all ranks hold every micro-batch's token ids), so receive buffers are
allocated when their batch is posted. A micro-batch's saved input and output are
dropped as soon as its backward ran.

The loss of each micro-batch is scaled by its weight (1/m in training) exactly once,
on the last virtual stage; the engine returns the weighted loss sum there (zero
elsewhere).
"""

from __future__ import annotations

import contextlib

import torch

from megalite.parallel import comm
from megalite.parallel.pipeline.schedules import SCHEDULES, forward_only, rounds
from megalite.parallel.topology import Topology


class _Batch:
    """One posted p2p batch: its Works and the tensors it must keep alive."""

    def __init__(self, group, sends: list, recvs: list):
        self.group, self.tensors = group, [t for t, _ in sends + recvs]
        self.works = comm.p2p(group, sends, recvs)

    def done(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        if self.works:
            comm.run(self.group, "p2p", 0, lambda: [w.wait() for w in self.works])
            self.works, self.tensors = [], []


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
        self.peak_waiting = 0  # most received messages not yet used at once, last run

    def _shape(self, mb: int):
        inputs = self.batches[mb][0]
        return (inputs.shape[0], inputs.shape[1] // self.sequence_divisor, self.hidden)

    def _post(self, rnd, outgoing) -> None:
        """Post this round's batch: the message this rank produced, and buffers for the
        ones its neighbours produced."""
        sends = [(outgoing, self.group.ranks[peer]) for _, peer in rnd.sends]
        recvs = [(torch.empty(self._shape(msg[2]), dtype=self.dtype, device=self.device),
                  self.group.ranks[peer]) for msg, peer in rnd.recvs]
        if not sends and not recvs:
            return
        batch = _Batch(self.group, sends, recvs)
        for (msg, _), (buf, _) in zip(rnd.recvs, recvs):
            self.inbox[msg] = (buf, batch)
        self.peak_waiting = max(self.peak_waiting, len(self.inbox))
        # release finished sends as the step goes; keep the rest until waited
        self.posted = [b for b in self.posted if not b.done()] + [batch]

    def _take(self, message) -> torch.Tensor:
        buf, batch = self.inbox.pop(message)
        batch.wait()
        return buf

    def run(self, schedule: str, batches: list, weights: list[float],
            final_backward=contextlib.nullcontext) -> torch.Tensor:
        """Run `batches` [(inputs, targets, position_ids)] through the pipeline.

        `schedule`: gpipe | 1f1b | interleaved, or "forward" (no backward, no grad).
        `final_backward()`: a context around this rank's last backward action, after which
        no gradient changes (the data-parallel buckets reduce inside it).
        Returns the sum of weight * loss over micro-batches on the last stage, else 0.
        """
        self.batches = batches
        m = len(batches)
        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.hidden = self.model.cfg.hidden_size
        train = schedule != "forward"
        if self.pp == 1 and train:
            # One stage: nothing to overlap, so each micro-batch's backward follows its
            # forward whatever the schedule, and activations never pile up.
            schedule = "1f1b"
        make = SCHEDULES[schedule] if train else forward_only
        timetable = rounds([make(m, self.pp, r, self.v) for r in range(self.pp)], self.v)
        mine = timetable[self.rank]
        last_vstage = self.pp * self.v - 1
        self.inbox, self.posted, saved, self.peak_live, self.peak_waiting = {}, [], {}, 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        last_backward = max((i for i, r in enumerate(mine) if r.action and r.action[0] == "B"),
                            default=-1)
        for step, rnd in enumerate(mine):
            outgoing = None
            if rnd.action is not None:
                kind, chunk, mb = rnd.action
                vs = chunk * self.pp + self.rank
                inputs, targets, positions = batches[mb]
                if positions is None:
                    positions = torch.arange(inputs.shape[1], device=inputs.device)
                if kind == "F":
                    x = inputs if vs == 0 else self._take(("F", vs, mb)).requires_grad_(train)
                    with torch.set_grad_enabled(train):
                        out = self.model(x, targets if vs == last_vstage else None, positions,
                                         chunk=chunk)
                    if vs == last_vstage:
                        out = out * weights[mb]
                        loss_sum += out.detach()
                    else:
                        outgoing = out.detach()
                    if train:
                        saved[(chunk, mb)] = (x, out)
                        self.peak_live = max(self.peak_live, len(saved))
                else:
                    x, out = saved.pop((chunk, mb))
                    grad = None if vs == last_vstage else self._take(("B", vs, mb))
                    with final_backward() if step == last_backward else contextlib.nullcontext():
                        torch.autograd.backward(out, grad)
                    if vs > 0:
                        outgoing = x.grad
            self._post(rnd, outgoing)
        for batch in self.posted:
            batch.wait()
        self.posted, self.inbox = [], {}
        return loss_sum
