"""Activation offloading (`train.offload_activations`): what the blocks save for backward
lives in host memory between a block's forward and its backward.

The third CPU offload beside the optimizer's and the parameters': the tensors autograd
saves inside the transformer blocks (with `train.recompute=full`: only each block's
input, which torch.utils.checkpoint keeps) are copied to host memory as they are saved
and copied back when backward unpacks them, through autograd's saved-tensor hooks.
Weights are not activations and stay where they are (a saved leaf that requires grad is
a parameter). The values round-trip exactly, so the losses are bit-identical to a run
without offloading. On CUDA the host buffers are pinned and both copies are
non-blocking, so the host never waits for them; they run on the compute stream (in
order with the kernels that produce and consume the tensors, which keeps them correct
without extra events). `bytes_offloaded` counts what went to the host, for metrics and
the test that a do-nothing offload would fail.
"""

from __future__ import annotations

import torch


class _HostCopy:
    """One device storage saved for backward, copied to host memory; brought back once
    when backward first needs it, however many saved tensors (views) share it."""

    def __init__(self, storage, device: torch.device):
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        self.host = torch.empty(raw.numel(), dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.host.copy_(raw, non_blocking=True)
        self.device, self._back = device, None

    def storage(self):
        if self._back is None:
            self._back = self.host.to(self.device, non_blocking=True)
        return self._back.untyped_storage()


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

    def _pack(self, t: torch.Tensor):
        if t.is_leaf and t.requires_grad:  # a parameter: not an activation
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._copies:
            # the storage stays referenced until the block ends, so its address cannot be
            # reused by another tensor while it is the key
            self._copies[key] = (_HostCopy(storage, t.device), storage)
            self.bytes_offloaded += storage.nbytes()
        return (self._copies[key][0], t.dtype, t.storage_offset(), t.shape, t.stride())

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        copy, dtype, offset, shape, stride = packed
        return torch.empty(0, dtype=dtype, device=copy.device).set_(
            copy.storage(), offset, shape, stride)

    def __enter__(self):
        if self.enabled and torch.is_grad_enabled():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        self._copies = {}
