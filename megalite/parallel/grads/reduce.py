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
bucket while backward goes on, the other two run once in `GradBuffer.finish`. Under
hybrid sharding (`parallel.zero_shard` < dp x sp) the dp x sp sum is two: a
reduce-scatter over the ZeRO shard group (inside a node), then an all-reduce of each
reduced chunk over the replica group (across nodes: 1/zero_shard of the bytes).

The flat layout of parameters, buckets and per-rank chunks is `parallel/buckets.py`'s.

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
  rank's gradient shard (in `train.grad_dtype` too) and dropped. More traffic,
  shard-sized memory.
With `overlap=False` nothing starts inside backward: ZeRO 2/3 reduce-scatter every
bucket at the end of each backward, ZeRO 0/1 all-reduce in `finish`. The result is
the same to rounding. `finish()` launches what is left, waits for everything, applies
the 1/(dp*sp) average and the TP and tied-embedding sums.

The global norm (computed by the optimizer from the reduced buffers) counts every parameter element once: TP-sharded parameters
(`p.tp_split_dim` set) contribute their shard on every TP rank, replicated ones only
on TP rank 0, the last pipeline stage's copy of a tied embedding not at all, and the
sum runs over the model-parallel group (tp x pp) (and, for sharded gradients, over
dp x sp, each rank counting its own chunks).
"""

from __future__ import annotations

import torch

from megalite.parallel import comm
from megalite.parallel.grads.buckets import Bucket, BucketLayout
from megalite.parallel.topology import Topology

# ZeRO 2/3: bucket reduce-scatters in flight at once. Each holds its full-size bucket
# gradient until it completes; folding the oldest into the shard before launching more
# keeps the transient at a few buckets instead of a whole unsharded gradient.
MAX_IN_FLIGHT = 2

# ---- the buffer ------------------------------------------------------------------------
class GradBuffer:
    def __init__(self, layout: BucketLayout, topo: Topology, dtype: torch.dtype, device,
                 shard: bool, overlap: bool = True, tied: tuple = (), scatter: bool = False,
                 on_bucket_complete=None, on_backward_end=None):
        self.layout, self.topo, self.dtype, self.device = layout, topo, dtype, device
        # ZeRO's shards span the shard group; under hybrid sharding (parallel.zero_shard)
        # each reduced chunk is then summed over the replica group too.
        self.group, self.replicas = topo.zero_shard_group, topo.zero_replica_group
        self.shard_mode, self.overlap = shard, overlap
        self.scatter = scatter or shard  # reduce-scatter rather than all-reduce
        self.on_bucket_complete, self.on_backward_end = on_bucket_complete, on_backward_end
        # ZeRO 0/1: the whole gradient; ZeRO 2/3: this rank's chunks, in fp32 (fp64 for fp64).
        self.full = None if shard else torch.zeros(layout.total, dtype=dtype, device=device)
        # the shard is in grad_dtype too: bf16/fp16 grads give the ZeRO paper's 2 bytes/N
        self.shard = (torch.zeros(layout.shard_size, dtype=dtype, device=device)
                      if shard else None)
        self.partial: list = [None] * len(layout.buckets)  # ZeRO 2/3: buckets being filled
        self.ready = [0] * len(layout.buckets)
        self.launched = [False] * len(layout.buckets)
        self.pending: list[comm.Pending] = []
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
            view = self.full[bucket.start:bucket.start + bucket.size]
            if n == 1:  # nothing to scatter; with replicas, `_advance` sums the bucket
                if self.replicas.size > 1:
                    self.pending.append(comm.Pending(None, group, "reduce_scatter", key=bucket,
                                                     out=view))
                return
            if self.scatter:
                out = torch.empty(bucket.chunk_size(n), dtype=self.dtype, device=self.device)
                work = comm.reduce_scatter_async(out, view, group)
                self.pending.append(comm.Pending(work, group, "reduce_scatter", key=bucket,
                                                 out=out))
                return
            work = comm.all_reduce_async(view, group)
            self.pending.append(comm.Pending(work, group, "all_reduce", key=bucket))
            return
        buf, self.partial[bucket.index] = self.partial[bucket.index], None
        # Keep at most one reduce-scatter per bucket in flight: the previous micro-batch's
        # result folds into the shard before the next one starts.
        for pending in [q for q in self.pending if q.key is bucket]:
            self._complete(pending)
        if n == 1:
            self.pending.append(comm.Pending(None, group, "reduce_scatter", key=bucket, out=buf))
        else:
            out = torch.empty(bucket.chunk_size(n), dtype=self.dtype, device=self.device)
            work = comm.reduce_scatter_async(out, buf, group)
            self.pending.append(comm.Pending(work, group, "reduce_scatter", key=bucket,
                                             out=out, keep=buf))
        while len(self.pending) > MAX_IN_FLIGHT:
            self._complete(self.pending[0])

    def _complete(self, pending: comm.Pending) -> None:
        """Wait for `pending` (and its sum over the replicas) and fold it in."""
        while pending is not None:
            pending = self._advance(pending)

    def _advance(self, pending: comm.Pending) -> comm.Pending | None:
        """Wait for `pending`. A shard-group reduction under hybrid sharding then starts
        the sum of its chunk over the replica group, queued in its place (returned);
        anything else folds into the gradient and leaves the queue."""
        pending.wait()
        index = self.pending.index(pending)
        if pending.out is not None and pending.group is self.group and self.replicas.size > 1:
            work = comm.all_reduce_async(pending.out, self.replicas)
            follow = comm.Pending(work, self.replicas, "all_reduce", key=pending.key,
                                  out=pending.out, keep=pending.keep)
            self.pending[index] = follow
            return follow
        del self.pending[index]
        if pending.out is not None and self.shard_mode:
            start = self.layout.shard_offset(pending.key)
            self.shard[start:start + pending.out.numel()].add_(pending.out)
        elif pending.out is not None:
            start, end = self.layout.chunk(pending.key, self.group.rank)
            self.full[start:end].copy_(pending.out)
        return None

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
        replicas = self.topo.dp_sp_group.size  # every rank's tokens, hybrid or not
        if replicas > 1:
            grads.mul_(1.0 / replicas)
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


# ---- the global norm -------------------------------------------------------------------
def counts_in_norm(p: torch.nn.Parameter, topo: Topology) -> bool:
    """Whether this rank's copy of `p` contributes to the global norm (once per element)."""
    if getattr(p, "pipeline_tied_copy", False):
        return False  # the first stage counts the tied embedding
    replicated = getattr(p, "tp_split_dim", None) is None
    return not (replicated and topo.tp_rank != 0)


def clip_coefficient(norm: float, max_norm: float) -> float:
    if max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return 1.0
