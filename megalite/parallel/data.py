"""Gradient reduction across replicas: contiguous bucketed buffers, overlapped with backward.

After backward each rank holds gradients of its own tokens. Three sums make them the
gradient of the global batch:
- over TP, for replicated parameters that saw a sequence-sharded input under tp_sp
  (norm weights, row-parallel biases: `p.sequence_parallel_grad`): each TP rank holds
  the partial sum over its sequence shard;
- over the embedding group (first and last pipeline stage) for a tied embedding;
- over dp x sp, averaging: data-parallel replicas saw other samples, sequence-parallel
  replicas other tokens of the same samples, every rank the same number of tokens.
All three are linear, so their order does not matter: the dp x sp reduction runs per
bucket while backward goes on, the other two run once in `GradBuffer.finish`.

`BucketLayout` places every local parameter in one flat index space, in reverse
registration order (roughly the order backward produces gradients), cut into buckets
of about `parallel.bucket_mb`. Each bucket is padded to a multiple of
`group_size * ALIGN` elements so that it splits into equal contiguous chunks, one per
dp x sp rank: rank r owns chunk r of every bucket. Its shard (of gradients under
ZeRO 2/3, of master weights and moments under ZeRO 1-3) is the concatenation of its
chunks in bucket order. The layout is the same on every TP rank (TP shards have equal
shapes), and a tied embedding sits alone in its own bucket so that its chunk is the
same on both pipeline stages that hold it.

`GradBuffer` collects gradients with a post-accumulate-grad hook on every parameter:
the hook adds `p.grad` into the bucket (in `train.grad_dtype`) and frees it, so
parameters never hold a `.grad` and the model dtype may differ from the buffer's.
- `shard=False` (ZeRO 0/1): one full-size buffer; during the last micro-batch's
  backward (`last_micro_batch=True`, set by the optimizer) a bucket whose parameters
  are all in starts its asynchronous all-reduce (ZeRO 0) or reduce-scatter
  (`scatter=True`, ZeRO 1: a rank updates only its chunks, so only those need the
  reduced gradient; the other chunks keep stale partial sums); earlier micro-batches
  only accumulate.
- `shard=True` (ZeRO 2/3): a bucket's full-size gradient exists only while backward
  fills it; once complete (in every micro-batch) it is reduce-scattered into this
  rank's fp32 gradient shard and dropped. More traffic, shard-sized memory.
With `overlap=False` nothing starts inside backward: ZeRO 2/3 reduce-scatter every
bucket at the end of each backward, ZeRO 0/1 all-reduce in `finish`. The result is
the same to rounding. `finish()` launches what is left, waits for everything, applies
the 1/(dp*sp) average and the TP and tied-embedding sums.

`global_grad_norm` / `clip_gradients` / `reduce_gradients` keep the plain per-`.grad`
versions (one collective, no buckets) for code that holds its gradients in `.grad`.
The global norm counts every parameter element once: TP-sharded parameters
(`p.tp_split_dim` set) contribute their shard on every TP rank, replicated ones only
on TP rank 0, the last pipeline stage's copy of a tied embedding not at all, and the
sum runs over the model-parallel group (tp x pp) (and, for sharded gradients, over
dp x sp, each rank counting its own chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megalite.parallel import comm
from megalite.topology import Group, Topology

ALIGN = 64  # elements: each rank's chunk of a bucket is a multiple of this (256 B in fp32)


# ---- layout --------------------------------------------------------------------------
@dataclass(eq=False)
class Bucket:
    index: int
    start: int  # offset of the bucket in the flat index space
    size: int = 0  # padded length, a multiple of group_size * ALIGN
    params: list = field(default_factory=list)  # (param, flat offset), in buffer order
    numel: int = 0  # unpadded length

    def chunk_size(self, group_size: int) -> int:
        return self.size // group_size


class BucketLayout:
    """Where each parameter lives in the flat buffer and which chunks a rank owns.

    `units`: lists of parameters that must share one bucket each (ZeRO 3 gathers one
    unit per layer); otherwise buckets are cut at `bucket_numel`. `isolate`: parameters
    that get a bucket of their own (a tied embedding). `sort_key`: inside a bucket,
    parameters are stably sorted by it (the optimizer groups equal weight decay so one
    AdamW call covers a stretch)."""

    def __init__(self, params: list, group_size: int, bucket_numel: int, units=None,
                 isolate=(), sort_key=None):
        self.group_size = group_size
        self.params = list(params)
        isolated = {id(p) for p in isolate}
        groups: list[list] = []
        if units is not None:
            groups = [list(u) for u in units if u]
        else:
            current, current_numel = [], 0
            for p in self.params:
                if id(p) in isolated:
                    if current:
                        groups.append(current)
                    groups.append([p])
                    current, current_numel = [], 0
                    continue
                current.append(p)
                current_numel += p.numel()
                if current_numel >= bucket_numel:
                    groups.append(current)
                    current, current_numel = [], 0
            if current:
                groups.append(current)
        if sort_key is not None:
            groups = [sorted(group, key=sort_key) for group in groups]
        self.buckets: list[Bucket] = []
        self.where: dict[int, tuple[Bucket, int]] = {}
        multiple = group_size * ALIGN
        start = 0
        for i, group in enumerate(groups):
            bucket = Bucket(i, start)
            offset = start
            for p in group:
                bucket.params.append((p, offset))
                self.where[id(p)] = (bucket, offset)
                offset += p.numel()
            bucket.numel = offset - start
            bucket.size = max(multiple, -(-bucket.numel // multiple) * multiple)
            self.buckets.append(bucket)
            start += bucket.size
        self.total = start
        self.numel = sum(b.numel for b in self.buckets)
        self.padding = self.total - self.numel
        self.shard_size = self.total // group_size

    def chunk(self, bucket: Bucket, rank: int) -> tuple[int, int]:
        """Flat [start, end) of `rank`'s chunk of `bucket`."""
        size = bucket.chunk_size(self.group_size)
        return bucket.start + rank * size, bucket.start + (rank + 1) * size

    def shard_offset(self, bucket: Bucket) -> int:
        """Where `bucket`'s chunk starts in a rank's shard (chunks in bucket order)."""
        return bucket.start // self.group_size

    def segments(self, rank: int | None) -> list[tuple[int, int, int]]:
        """(flat start, length, offset in the rank's space) of what `rank` owns; None: all
        (the rank's space is then the flat space)."""
        if rank is None:
            return [(0, self.total, 0)]
        out = []
        for b in self.buckets:
            start, end = self.chunk(b, rank)
            out.append((start, end - start, self.shard_offset(b)))
        return out

    def pieces(self, rank: int | None) -> list[tuple]:
        """(param, offset inside the flattened param, flat start, offset in the rank's
        space, length) for every part of a parameter inside what `rank` owns."""
        out = []
        for b in self.buckets:
            if rank is None:
                flat_start, flat_end, space = b.start, b.start + b.size, b.start
            else:
                (flat_start, flat_end), space = self.chunk(b, rank), self.shard_offset(b)
            for p, offset in b.params:
                lo, hi = max(offset, flat_start), min(offset + p.numel(), flat_end)
                if lo < hi:
                    out.append((p, lo - offset, lo, space + lo - flat_start, hi - lo))
        return out


# ---- asynchronous collectives with byte counting and named errors -----------------------
@dataclass(eq=False)
class _Pending:
    bucket: Bucket
    work: object  # torch Work, or None when the collective was a no-op
    group: Group
    op: str
    out: torch.Tensor | None = None  # reduce-scatter result
    keep: torch.Tensor | None = None  # input kept alive until the collective is done

    def wait(self) -> None:
        if self.work is None:
            return
        try:
            self.work.wait()
        except RuntimeError as e:
            raise _collective_error(self.group, self.op, e) from e
        self.work = None


def _collective_error(group: Group, op: str, e: Exception) -> comm.CollectiveError:
    me = dist.get_rank() if dist.is_initialized() else 0
    return comm.CollectiveError(
        f"{op} on the {group.name} group (ranks {list(group.ranks)}) failed on global rank "
        f"{me}: {e}. A peer rank probably died or hung; see its log in the run directory. "
        f"parallel.timeout_s sets how long a collective waits.")


def launch(group: Group, op: str, nbytes: int, fn):
    """Start an async collective (`fn` returns its Work), counting bytes like comm.py."""
    group.bytes[op] += nbytes
    try:
        return fn()
    except RuntimeError as e:
        raise _collective_error(group, op, e) from e


def all_gather_async(out: torch.Tensor, chunk: torch.Tensor, group: Group):
    """All-gather equal chunks into the contiguous `out` (chunk i from rank i); returns Work
    or None when the group has one member."""
    if group.size == 1:
        out.copy_(chunk)
        return None
    parts = list(out.chunk(group.size))
    return launch(group, "all_gather", out.numel() * out.element_size(),
                  lambda: dist.all_gather(parts, chunk, group=group.pg, async_op=True))


# ---- the buffer ------------------------------------------------------------------------
class GradBuffer:
    def __init__(self, layout: BucketLayout, topo: Topology, dtype: torch.dtype, device,
                 shard: bool, overlap: bool = True, tied: tuple = (), scatter: bool = False,
                 on_bucket_complete=None, on_backward_end=None):
        self.layout, self.topo, self.dtype, self.device = layout, topo, dtype, device
        self.group = topo.dp_sp_group
        self.shard_mode, self.overlap = shard, overlap
        self.scatter = scatter or shard  # reduce-scatter rather than all-reduce
        self.on_bucket_complete, self.on_backward_end = on_bucket_complete, on_backward_end
        # ZeRO 0/1: the whole gradient; ZeRO 2/3: this rank's chunks, always fp32.
        self.full = None if shard else torch.zeros(layout.total, dtype=dtype, device=device)
        self.shard = (torch.zeros(layout.shard_size, dtype=torch.float32, device=device)
                      if shard else None)
        self.partial: list = [None] * len(layout.buckets)  # ZeRO 2/3: buckets being filled
        self.ready = [0] * len(layout.buckets)
        self.launched = [False] * len(layout.buckets)
        self.pending: list[_Pending] = []
        self.last_micro_batch = False
        self._callback_queued = False
        self.tied_buckets = [layout.where[id(p)][0] for p in tied]
        self.sequence_parallel = [p for p in layout.params
                                  if topo.tp > 1 and getattr(p, "sequence_parallel_grad", False)]
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                        for p in layout.params]

    # -- during backward
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        bucket, offset = self.layout.where[id(p)]
        grad = p.grad.reshape(-1)
        if self.shard_mode:
            buf = self.partial[bucket.index]
            if buf is None:
                buf = self.partial[bucket.index] = torch.zeros(bucket.size, dtype=self.dtype,
                                                               device=self.device)
            start = offset - bucket.start
            buf[start:start + grad.numel()].add_(grad)
        else:
            self.full[offset:offset + grad.numel()].add_(grad)
        p.grad = None
        counting = self.shard_mode or self.last_micro_batch or self.on_bucket_complete
        if not counting:
            return
        self.ready[bucket.index] += 1
        if self.ready[bucket.index] < len(bucket.params):
            return
        self.ready[bucket.index] = 0
        if self.overlap and (self.shard_mode or self.last_micro_batch):
            self._launch(bucket)
        if self.on_bucket_complete is not None:
            self.on_bucket_complete(bucket)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.ready = [0] * len(self.layout.buckets)
        if self.shard_mode:
            for bucket in self.layout.buckets:
                if self.partial[bucket.index] is not None:
                    self._launch(bucket)
            if not self.overlap:
                self._wait_all()
        elif self.last_micro_batch and self.overlap:
            for bucket in self.layout.buckets:
                if not self.launched[bucket.index]:
                    self._launch(bucket)
        if self.on_backward_end is not None:
            self.on_backward_end()

    def _launch(self, bucket: Bucket) -> None:
        group, n = self.group, self.group.size
        if not self.shard_mode:
            self.launched[bucket.index] = True
            if n == 1:
                return
            view = self.full[bucket.start:bucket.start + bucket.size]
            if self.scatter:
                out = torch.empty(bucket.chunk_size(n), dtype=self.dtype, device=self.device)
                parts = list(view.chunk(n))
                work = launch(group, "reduce_scatter", view.numel() * view.element_size(),
                              lambda: dist.reduce_scatter(out, parts, group=group.pg,
                                                          async_op=True))
                self.pending.append(_Pending(bucket, work, group, "reduce_scatter", out=out))
                return
            work = launch(group, "all_reduce", view.numel() * view.element_size(),
                          lambda: dist.all_reduce(view, group=group.pg, async_op=True))
            self.pending.append(_Pending(bucket, work, group, "all_reduce"))
            return
        buf, self.partial[bucket.index] = self.partial[bucket.index], None
        # Keep at most one reduce-scatter per bucket in flight: the previous micro-batch's
        # result folds into the shard before the next one starts.
        for pending in [q for q in self.pending if q.bucket is bucket]:
            self._complete(pending)
        if n == 1:
            self.pending.append(_Pending(bucket, None, group, "reduce_scatter", out=buf))
            return
        out = torch.empty(bucket.chunk_size(n), dtype=self.dtype, device=self.device)
        parts = list(buf.chunk(n))
        work = launch(group, "reduce_scatter", buf.numel() * buf.element_size(),
                      lambda: dist.reduce_scatter(out, parts, group=group.pg, async_op=True))
        self.pending.append(_Pending(bucket, work, group, "reduce_scatter", out=out, keep=buf))

    def _complete(self, pending: _Pending) -> None:
        pending.wait()
        if pending.out is not None and self.shard_mode:
            start = self.layout.shard_offset(pending.bucket)
            self.shard[start:start + pending.out.numel()].add_(pending.out)
        elif pending.out is not None:
            start, end = self.layout.chunk(pending.bucket, self.group.rank)
            self.full[start:end].copy_(pending.out)
        self.pending.remove(pending)

    def _wait_all(self) -> None:
        for pending in list(self.pending):
            self._complete(pending)

    # -- after backward
    def finish(self) -> None:
        """Launch what is left, wait, average over dp x sp, sum over TP and tied copies."""
        for bucket in self.layout.buckets:
            if self.shard_mode and self.partial[bucket.index] is not None:
                self._launch(bucket)
            elif not self.shard_mode and not self.launched[bucket.index]:
                self._launch(bucket)
        self._wait_all()
        grads = self.shard if self.shard_mode else self.full
        if self.group.size > 1:
            grads.mul_(1.0 / self.group.size)
        self._sum_sequence_parallel()
        for bucket in self.tied_buckets:
            comm.all_reduce(self._owned_view(bucket), self.topo.embedding_group)
        self.launched = [False] * len(self.layout.buckets)
        self.ready = [0] * len(self.layout.buckets)

    def _owned_view(self, bucket: Bucket) -> torch.Tensor:
        if not self.shard_mode:
            return self.full[bucket.start:bucket.start + bucket.size]
        start = self.layout.shard_offset(bucket)
        return self.shard[start:start + bucket.chunk_size(self.group.size)]

    def _sum_sequence_parallel(self) -> None:
        if not self.sequence_parallel:
            return
        wanted = {id(p) for p in self.sequence_parallel}
        rank = self.group.rank if self.scatter else None
        views = [self.grad_view(flat, space, length)
                 for p, _, flat, space, length in self.layout.pieces(rank) if id(p) in wanted]
        if views:
            flat = torch.cat(views)
            comm.all_reduce(flat, self.topo.tp_group)
            offset = 0
            for v in views:
                v.copy_(flat[offset:offset + v.numel()])
                offset += v.numel()

    def grad_view(self, flat: int, space: int, length: int) -> torch.Tensor:
        """The reduced gradient of flat range [flat, flat+length), which is at `space` in
        this rank's shard under ZeRO 2/3."""
        if self.shard_mode:
            return self.shard[space:space + length]
        return self.full[flat:flat + length]

    def zero(self) -> None:
        self._wait_all()
        (self.shard if self.shard_mode else self.full).zero_()
        self.partial = [None] * len(self.layout.buckets)
        self.ready = [0] * len(self.layout.buckets)
        self.launched = [False] * len(self.layout.buckets)

    def nbytes(self) -> int:
        t = self.shard if self.shard_mode else self.full
        return t.numel() * t.element_size()

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---- the plain per-.grad path -------------------------------------------------------------
def reduce_gradients(params: list[torch.nn.Parameter], topo: Topology) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if topo.tp > 1:
        partial = [p.grad for p in params
                   if p.grad is not None and getattr(p, "sequence_parallel_grad", False)]
        _all_reduce_flat(partial, topo.tp_group, scale=1.0)
    group = topo.dp_sp_group
    if group.size > 1:
        _all_reduce_flat(grads, group, scale=1.0 / group.size)


def _all_reduce_flat(grads: list[torch.Tensor], group, scale: float) -> None:
    """One collective for many tensors: flatten, reduce, scale, copy back."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group)
    if scale != 1.0:
        flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def counts_in_norm(p: torch.nn.Parameter, topo: Topology) -> bool:
    """Whether this rank's copy of `p` contributes to the global norm (once per element)."""
    if getattr(p, "pipeline_tied_copy", False):
        return False  # the first stage counts the tied embedding
    replicated = getattr(p, "tp_split_dim", None) is None
    return not (replicated and topo.tp_rank != 0)


def global_grad_norm(params: list[torch.nn.Parameter], topo: Topology) -> float:
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is None or not counts_in_norm(p, topo):
            continue
        total += p.grad.detach().float().pow(2).sum()
    comm.all_reduce(total, topo.model_parallel_group)
    return math.sqrt(total.item())


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, topo: Topology) -> float:
    """Scale gradients so the global norm is at most max_norm (0: no clipping); returns the norm."""
    norm = global_grad_norm(params, topo)
    coef = clip_coefficient(norm, max_norm)
    if coef != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def clip_coefficient(norm: float, max_norm: float) -> float:
    if max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return 1.0
