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

Byte counting convention: each call adds to `group.bytes[op]` the size in bytes of
the full logical tensor it operates on: the tensor for all-reduce, the gathered
output for all-gather, the unreduced input for reduce-scatter, the input for
all-to-all and p2p. Counted on every rank, forward and backward alike, so a test or a
metric reads one rank's counter as "bytes this rank put through this group".
`group.seconds[op]` adds the time this rank was blocked in the call (for asynchronous
collectives, in its wait): the communication not hidden behind compute.

A collective that fails (a peer died, or the group's timeout passed) raises
`CollectiveError` naming the group, the collective and the rank. `run` does this for any
blocking call (p2p posts and waits too), `start` + `Pending` for asynchronous ones
(`all_gather_async`; the gradient buckets' all-reduce / reduce-scatter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite.parallel.topology import Group


class CollectiveError(RuntimeError):
    pass


def _failure(group: Group, op: str, e: Exception) -> CollectiveError:
    me = dist.get_rank() if dist.is_initialized() else 0
    return CollectiveError(
        f"{op} on the {group.name} group (ranks {list(group.ranks)}) failed on global rank "
        f"{me}: {e}. A peer rank probably died or hung; see its log in the run directory. "
        f"parallel.timeout_s sets how long a collective waits.")


def run(group: Group, op: str, nbytes: int, fn):
    """Call `fn` (a blocking collective, p2p post or wait) counting `nbytes` and the time
    blocked under `op`; a failure becomes a CollectiveError naming group, op and rank."""
    group.bytes[op] += nbytes
    start = time.perf_counter()
    try:
        result = fn()
        group.seconds[op] += time.perf_counter() - start
        return result
    except RuntimeError as e:
        raise _failure(group, op, e) from e


def start(group: Group, op: str, nbytes: int, fn):
    """Start an asynchronous collective (`fn` returns its Work), counting its bytes; the
    time blocked is counted when its `Pending` is waited for."""
    group.bytes[op] += nbytes
    try:
        return fn()
    except RuntimeError as e:
        raise _failure(group, op, e) from e


@dataclass(eq=False)
class Pending:
    """An asynchronous collective in flight; `wait()` counts the time blocked in it."""
    work: object  # torch Work, or None when the collective was a no-op
    group: Group
    op: str
    key: object = None  # what the caller tracks it by (a gradient bucket)
    out: torch.Tensor | None = None  # reduce-scatter result
    keep: torch.Tensor | None = None  # input kept alive until the collective is done

    def wait(self) -> None:
        if self.work is None:
            return
        began = time.perf_counter()
        try:
            self.work.wait()
            self.group.seconds[self.op] += time.perf_counter() - began
        except RuntimeError as e:
            raise _failure(self.group, self.op, e) from e
        self.work = None


def all_gather_async(out: torch.Tensor, chunk: torch.Tensor, group: Group):
    """All-gather equal chunks into the contiguous `out` (chunk i from rank i); returns Work
    or None when the group has one member."""
    if group.size == 1:
        out.copy_(chunk)
        return None
    parts = list(out.chunk(group.size))
    return start(group, "all_gather", out.numel() * out.element_size(),
                 lambda: dist.all_gather(parts, chunk, group=group.pg, async_op=True))


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """In-place sum over the group (x must be contiguous)."""
    if group.size > 1:
        run(group, "all_reduce", x.numel() * x.element_size(),
             lambda: dist.all_reduce(x, group=group.pg))
    return x


def all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    if group.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group.size)]
    run(group, "all_gather", x.numel() * x.element_size() * group.size,
         lambda: dist.all_gather(parts, x, group=group.pg))
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce-scatter over {group.name}: dim {dim} of size {x.shape[dim]} "
                         f"is not divisible by the group size {group.size}")
    parts = [c.contiguous() for c in x.chunk(group.size, dim=dim)]
    out = torch.empty_like(parts[0])
    run(group, "reduce_scatter", x.numel() * x.element_size(),
         lambda: dist.reduce_scatter(out, parts, group=group.pg))
    return out


def split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over the {group.name} "
                         f"group of {group.size}")
    return x.chunk(group.size, dim=dim)[group.rank].contiguous()


def all_to_all_tensor(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int):
    """Chunk i of `scatter_dim` goes to rank i; received chunks are joined on `gather_dim`."""
    if group.size == 1:
        return x
    inputs = [c.contiguous() for c in x.chunk(group.size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(group.size)]
    run(group, "all_to_all", x.numel() * x.element_size(),
         lambda: dist.all_to_all(outputs, inputs, group=group.pg))
    return torch.cat(outputs, dim=gather_dim)


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
