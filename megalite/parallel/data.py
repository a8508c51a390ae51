"""Gradient reduction across replicas and the global gradient norm.

After backward, each rank holds gradients of its own tokens. Two reductions make them
the gradient of the global batch:
- over TP, for replicated parameters that saw a sequence-sharded input under tp_sp
  (norm weights, row-parallel biases: `p.sequence_parallel_grad`): each TP rank holds
  the partial sum over its sequence shard;
- over dp x sp, averaging: data-parallel replicas saw other samples, sequence-parallel
  replicas other tokens of the same samples, every rank the same number of tokens.

The global norm counts every parameter element once: TP-sharded parameters
(`p.tp_split_dim` set) contribute their shard on every TP rank, replicated ones only
on TP rank 0, and the sum runs over the model-parallel group (tp x pp); dp x sp
replicas hold the same reduced gradient and are not summed.
"""

from __future__ import annotations

import math

import torch

from megalite.parallel import comm
from megalite.topology import Topology


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


def global_grad_norm(params: list[torch.nn.Parameter], topo: Topology) -> float:
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        if p.grad is None:
            continue
        replicated = getattr(p, "tp_split_dim", None) is None
        if replicated and topo.tp_rank != 0:
            continue
        total += p.grad.detach().float().pow(2).sum()
    comm.all_reduce(total, topo.model_parallel_group)
    return math.sqrt(total.item())


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, topo: Topology) -> float:
    """Scale gradients so the global norm is at most max_norm (0: no clipping); returns the norm."""
    norm = global_grad_norm(params, topo)
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm

