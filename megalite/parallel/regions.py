"""Autograd-aware collectives over a `Group` (tp, sp, ...): the mappings between regions.

| function                  | forward                          | backward                         |
|---------------------------|----------------------------------|----------------------------------|
| copy_to_group             | identity                         | all-reduce                       |
| reduce_from_group         | all-reduce                       | identity                         |
| scatter_to_group(dim)     | keep this rank's chunk of `dim`  | all-gather along `dim`           |
| gather_from_group(dim)    | all-gather along `dim`           | keep this rank's chunk of `dim`  |
| gather_for_column(dim)    | all-gather along `dim`           | reduce-scatter along `dim`       |
| reduce_scatter_to_group   | reduce-scatter along `dim`       | all-gather along `dim`           |
| all_to_all(scatter, gather) | split `scatter`, exchange, concatenate on `gather` | the inverse exchange |

Megatron's tensor parallelism uses copy/reduce around column/row-parallel linears;
its sequence parallelism (tp_sp) uses gather_for_column before a column-parallel
linear (the gradient flowing back is a partial sum per rank, hence reduce-scatter) and
reduce_scatter_to_group after a row-parallel one. The `sp` dimension's all-to-all
attention uses all_to_all.

Each is an autograd Function over comm.py's collectives (which count the bytes and
check the devices), and a no-op on a group of one.
"""

from __future__ import annotations

import torch

from megalite.parallel.comm import (Group, all_gather, all_reduce, all_to_all_tensor,
                                    reduce_scatter, split)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return reduce_scatter(grad, ctx.group, ctx.dim), None, None, None
        return split(grad, ctx.group, ctx.dim), None, None, None


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


def copy_to_group(x, group: Group):
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x, group: Group):
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_group(x, group: Group, dim: int = -1):
    return x if group.size == 1 else _ScatterToGroup.apply(x, group, dim % x.ndim)


def gather_from_group(x, group: Group, dim: int = -1):
    return x if group.size == 1 else _GatherFromGroup.apply(x, group, dim % x.ndim, False)


def gather_for_column(x, group: Group, dim: int):
    """All-gather a sequence-sharded input of a column-parallel layer (tp_sp)."""
    return x if group.size == 1 else _GatherFromGroup.apply(x, group, dim % x.ndim, True)


def reduce_scatter_to_group(x, group: Group, dim: int):
    return x if group.size == 1 else _ReduceScatterToGroup.apply(x, group, dim % x.ndim)


def all_to_all(x, group: Group, scatter_dim: int, gather_dim: int):
    if group.size == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim % x.ndim, gather_dim % x.ndim)
