"""Activation offloading (`train.offload_activations`): what the blocks save for backward
lives in host memory between a block's forward and its backward.

The third CPU offload beside the optimizer's and the parameters': the tensors autograd
saves inside the transformer blocks (with `train.recompute=full`: only each block's
input, which torch.utils.checkpoint keeps) are copied to host memory as they are saved
and copied back when backward unpacks them, through autograd's saved-tensor hooks.
Weights are not activations and stay where they are (a saved leaf that requires grad is
a parameter). The values round-trip exactly, so the losses are bit-identical to a run
without offloading. On CUDA the host buffers are pinned and both copies run on a side
stream, overlapped with compute: a block's copy to the host starts once the kernels
that produced its tensors are queued (the side stream waits for the compute stream,
and `record_stream` keeps the device memory from being reused before the copy is
done), and when backward first unpacks a block it also starts bringing back the block
before it in the same forward (`new_chain` marks where a forward begins), so that copy
runs under the current block's backward; the compute stream waits on each copy's
event only when it needs the tensor. On the CPU the same prefetch order runs with
plain copies (what the tests exercise). `bytes_offloaded` counts what went to the host, for metrics and
the test that a do-nothing offload would fail.
"""

from __future__ import annotations

import weakref

import torch


class _HostCopy:
    """One device storage saved for backward, copied to host memory; brought back once
    when backward first needs it (or when the block after it starts its backward),
    however many saved tensors (views) share it."""

    def __init__(self, storage, device: torch.device, side):
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        self.device, self.side, self._back, self._ready = device, side, None, None
        self.host = torch.empty(raw.numel(), dtype=torch.uint8, pin_memory=side is not None)
        if side is None:
            self.host.copy_(raw)
            return
        side.wait_stream(torch.cuda.current_stream())  # the producing kernels come first
        with torch.cuda.stream(side):
            self.host.copy_(raw, non_blocking=True)
        raw.record_stream(side)  # not reused by the allocator before the copy is done

    def fetch(self) -> None:
        """Start the copy back (on the side stream under CUDA)."""
        if self._back is not None:
            return
        self._back = torch.empty(self.host.numel(), dtype=torch.uint8, device=self.device)
        if self.side is None:
            self._back.copy_(self.host)
            return
        self.side.wait_stream(torch.cuda.current_stream())  # the memory's last user first
        with torch.cuda.stream(self.side):
            self._back.copy_(self.host, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(self.side)

    def storage(self):
        self.fetch()
        if self._ready is not None:
            torch.cuda.current_stream().wait_event(self._ready)
            self._ready = None
        return self._back.untyped_storage()


class _Block:
    """The host copies of one block's forward, and the block before it in that forward
    (weakly: only the saved tensors of the autograd graph keep a block alive, so its
    memory goes with the graph)."""

    def __init__(self, previous):
        self.copies: list[_HostCopy] = []
        self.previous = previous  # weakref.ref or None
        self.fetched = False

    def fetch(self) -> None:
        if not self.fetched:
            self.fetched = True
            for copy in self.copies:
                copy.fetch()


class ActivationOffload:
    """A context around each block's forward: `with offload: block(x)`; does nothing when
    disabled or when autograd records nothing (validation, no_grad). Storages are copied
    once per block even when several saved tensors view them (a fused q/k/v output), so
    `bytes_offloaded` counts the storages autograd keeps, as the estimator does."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bytes_offloaded = 0
        self._hooks = None
        self._copies: dict = {}  # storage address -> (_HostCopy, the storage), this block
        self._block = self._last = None  # this block's copies; the previous (a weakref)
        self._side = None  # the CUDA copy stream, made on first use

    def new_chain(self) -> None:
        """A forward begins: its first block has no block before it to prefetch."""
        self._last = None

    def _pack(self, t: torch.Tensor):
        if t.is_leaf and t.requires_grad:  # a parameter: not an activation
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._copies:
            # the storage stays referenced until the block ends, so its address cannot be
            # reused by another tensor while it is the key
            if t.device.type == "cuda" and self._side is None:
                self._side = torch.cuda.Stream(t.device)
            side = self._side if t.device.type == "cuda" else None
            self._copies[key] = (_HostCopy(storage, t.device, side), storage)
            self._block.copies.append(self._copies[key][0])
            self.bytes_offloaded += storage.nbytes()
        return (self._block, self._copies[key][0], t.dtype, t.storage_offset(), t.shape,
                t.stride())

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        block, copy, dtype, offset, shape, stride = packed
        previous = block.previous() if block.previous is not None else None
        if previous is not None:  # its backward comes next: bring it back now
            previous.fetch()
        return torch.empty(0, dtype=dtype, device=copy.device).set_(
            copy.storage(), offset, shape, stride)

    def __enter__(self):
        if self.enabled and torch.is_grad_enabled():
            self._block = _Block(self._last)
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
            self._last = weakref.ref(self._block)
        self._copies, self._block = {}, None
