"""ZeRO stage 3: gather each layer's parameters just before use, free them right after.

The optimizer (optim/zero.py) keeps every parameter as a view of its unit's full
buffer, whose storage exists only while the unit is gathered; autograd's saved
tensors see the data again once it is re-gathered. Units: one per transformer block,
one for everything else (embedding, final norm, head), gathered for the whole
forward and backward. A block is gathered in its forward pre-hook (prefetching the
next block) and freed after its forward; the gradient of its output re-gathers it for
backward (prefetching the block before it), and the optimizer's gradient buffer frees
it once all its gradients are in. A recomputation inside backward (activation
checkpointing) finds the block already gathered.
"""

from __future__ import annotations

import torch

from megalite.parallel import comm


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class LayerGather:
    """All-gathers a unit's parameters into its full buffer when needed, frees it after."""

    def __init__(self, opt, model):
        self.opt = opt
        self.pending: dict[int, comm.Pending] = {}
        self.present: set[int] = set()
        where = opt.layout.where
        layers = getattr(model, "layers", None)
        blocks = list(layers.values()) if layers is not None else []
        self.block_buckets = [where[id(next(b.parameters()))][0] for b in blocks]
        owned = {b.index for b in self.block_buckets}
        self.rest = [b for b in opt.layout.buckets if b.index not in owned]
        model.register_forward_pre_hook(self._model_pre)
        model.register_forward_hook(self._model_post)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, args, i=i: self._block_pre(i))
            block.register_forward_hook(lambda m, args, out, i=i: self._block_post(i, out))

    def _launch(self, bucket) -> None:
        opt, i = self.opt, bucket.index
        full = opt.unit_full[i]
        full.untyped_storage().resize_(full.numel() * full.element_size())
        start = opt.layout.shard_offset(bucket)
        chunk = opt.param_shard[start:start + bucket.chunk_size(opt.n)]
        work = comm.all_gather_async(full, chunk, opt.group)
        self.pending[i] = comm.Pending(work, opt.group, "all_gather", key=bucket)
        self.present.add(i)

    def prefetch(self, bucket) -> None:
        if bucket is not None and bucket.index not in self.present:
            self._launch(bucket)

    def fetch(self, bucket) -> None:
        if bucket.index not in self.present:
            self._launch(bucket)
        pending = self.pending.pop(bucket.index, None)
        if pending is not None:
            pending.wait()

    def free(self, bucket) -> None:
        if bucket.index not in self.present:
            return
        pending = self.pending.pop(bucket.index, None)
        if pending is not None:
            pending.wait()
        self.opt.unit_full[bucket.index].untyped_storage().resize_(0)
        self.present.discard(bucket.index)

    def free_all(self) -> None:
        for bucket in self.opt.layout.buckets:
            self.free(bucket)

    def _block(self, i: int):
        return self.block_buckets[i] if 0 <= i < len(self.block_buckets) else None

    def _model_pre(self, module, args):
        for bucket in self.rest:
            self.fetch(bucket)
        self.prefetch(self._block(0))

    def _model_post(self, module, args, out):
        if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
            for bucket in self.rest:
                self.free(bucket)

    def _block_pre(self, i: int):
        self.fetch(self.block_buckets[i])
        if not _in_backward():
            self.prefetch(self._block(i + 1))

    def _block_post(self, i: int, out):
        if _in_backward():
            return  # a recomputation inside backward: its backward follows at once
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, i=i: self._before_backward(i))
        self.free(self.block_buckets[i])

    def _before_backward(self, i: int) -> None:
        self.fetch(self.block_buckets[i])
        self.prefetch(self._block(i - 1))
