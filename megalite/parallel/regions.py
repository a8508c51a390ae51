"""Autograd-aware collectives over a `Group` (tp, sp, ...): the mappings between regions.

| function                  | forward                          | backward                         |
|---------------------------|----------------------------------|----------------------------------|
| reduce_from_group         | all-reduce (in place)            | identity                         |
| gather_from_group(dim)    | all-gather along `dim`           | keep this rank's chunk of `dim`  |
| reduce_scatter_to_group   | reduce-scatter along `dim`       | all-gather along `dim`           |
| all_to_all(scatter, gather) | split `scatter`, exchange, concatenate on `gather` | the inverse exchange |

Megatron's tensor parallelism reduces after a row-parallel linear (reduce_from_group,
or under tp_sp reduce_scatter_to_group); a column-parallel linear maps its input in its
own autograd function (parallel/column_linear.py), which saves only the local sequence
shard under tp_sp. gather_from_group assembles full logits for generation; the `sp`
dimension's all-to-all attention uses all_to_all.

Each is an autograd Function over comm.py's collectives (which count the bytes and
check the devices), and a no-op on a group of one.
"""

from __future__ import annotations

import torch

from megalite.parallel.comm import (Group, all_gather, all_reduce, all_to_all_tensor,
                                    reduce_scatter, split)


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # In place: x is a fresh product (a row layer's GEMM, the embedding's lookup) that
        # nothing saved; mark_dirty tells autograd, which rejects it if that ever changes.
        if not x.is_contiguous():
            return all_reduce(x.contiguous(), group)
        ctx.mark_dirty(x)
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return all_to_all_tensor(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all_tensor(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def reduce_from_group(x, group: Group):
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def gather_from_group(x, group: Group, dim: int = -1):
    return x if group.size == 1 else _GatherFromGroup.apply(x, group, dim % x.ndim)


def reduce_scatter_to_group(x, group: Group, dim: int):
    return x if group.size == 1 else _ReduceScatterToGroup.apply(x, group, dim % x.ndim)


def all_to_all(x, group: Group, scatter_dim: int, gather_dim: int):
    if group.size == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim % x.ndim, gather_dim % x.ndim)
