"""torch.distributed in one place: process groups, collectives, point-to-point, counters.

Every call to torch.distributed goes through here (tests/test_imports.py checks it), so
one module checks devices, counts bytes and calls, times what blocks and explains a
failure. The autograd-aware mappings between tensor- and sequence-parallel regions
built on these collectives are in parallel/regions.py.

Byte counting convention: each call adds to `group.bytes[op]` the size in bytes of
the full logical tensor it operates on: the tensor for all-reduce, the gathered
output for all-gather, the unreduced input for reduce-scatter, the input for
all-to-all and p2p. Counted on every rank, forward and backward alike, so a test or a
metric reads one rank's counter as "bytes this rank put through this group".
`group.seconds[op]` adds the time this rank was blocked in the call (for asynchronous
collectives, in its wait): the communication not hidden behind compute. Calls record
their intervals in `group.blocked` (host clock on CPU, CUDA events on GPU) and
`settle` adds them up, once the trainer knows they are over.

A collective that fails (a peer died, or the group's timeout passed) raises
`CollectiveError` naming the group, the collective, the rank and the members that did
not take part: `run` for any blocking call (p2p posts and waits too), `start` + `Pending`
for asynchronous ones. Each Group numbers its calls in plain ints; comm_failure.py turns
the numbers every member reports into the message. Under NCCL this needs its errors to
reach Python (TORCH_NCCL_BLOCKING_WAIT=1); by default its watchdog aborts the process.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megalite.parallel.comm_failure import CollectiveError, explain_failure


@dataclass(eq=False)
class Group:
    """A process group as the code sees it: name, members, this rank's index, the torch
    group (None for one member: its collectives are no-ops), the device its tensors live
    on, and counters of the bytes moved and the time blocked, per operation."""
    name: str
    ranks: tuple  # global ranks, in group order
    rank: int  # this process's index in `ranks`
    pg: object = None  # torch ProcessGroup; None when the group has one member
    device: torch.device = torch.device("cpu")
    bytes: Counter = field(default_factory=Counter)  # op name -> payload bytes
    seconds: Counter = field(default_factory=Counter)  # op name -> time blocked (settled)
    blocked: list = field(default_factory=list)  # (op, began, ended) not yet settled
    calls: int = 0  # collectives entered here: every member enters the same sequence
    ops: Counter = field(default_factory=Counter)  # op name -> collectives entered
    last_op: str = "-"  # the last of them
    p2p_calls: int = 0  # posts and waits, apart: each pipeline stage has its own sequence

    def __post_init__(self):
        if self.pg is not None:
            _LIVE.add(self)

    @property
    def size(self) -> int:
        return len(self.ranks)


# Every Group with a process group, so a failure can publish the numbers of all of them.
_LIVE: weakref.WeakSet = weakref.WeakSet()


# ---- process groups ---------------------------------------------------------------------
def world() -> tuple[bool, int, int]:
    """(a process group is initialised, this global rank, world size)."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def init_world(backend: str, timeout: timedelta, device_id=None) -> None:
    """Join the default process group from torchrun's environment. Under torchrun's
    agent store (TORCHELASTIC_USE_AGENT_STORE=True) the store outlives a restart with
    the keys the last attempt's ranks wrote (each rank's gloo address, NCCL's unique id),
    which a restarted rank would read as its new peers' and connect to the dead ranks:
    each attempt (TORCHELASTIC_RESTART_COUNT) gets keys of its own."""
    options = {"backend": backend, "timeout": timeout}
    if device_id is not None:
        options["device_id"] = device_id
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              size, is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        options.update(store=dist.PrefixStore(f"megalite/attempt_{attempt}", store),
                       rank=rank, world_size=size)
    dist.init_process_group(**options)


def new_group(members: list[int], timeout_s: float | None = None):
    """A torch process group over global ranks `members`; every rank must call it."""
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    return dist.new_group(members, **kwargs)


def destroy_group(pg) -> None:
    dist.destroy_process_group(pg)


def leave(finished: bool) -> None:
    """Tear every process group down; after a finished run, first a barrier with every
    rank so no peer still talks to a group being destroyed (launch.teardown says why)."""
    if not world()[0]:
        return
    if finished:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
    dist.destroy_process_group()


def _on_device(group: Group, op: str, *tensors: torch.Tensor) -> None:
    """NCCL groups have no CPU path: every tensor of a collective must be on the group's
    device. Checked here on every call, so a stray CPU tensor fails on CPU tests too when
    the topology is told another device, and never reaches NCCL."""
    for t in tensors:
        if t.device != group.device:
            raise CollectiveError(
                f"{op} on the {group.name} group got a tensor on {t.device}, but this "
                f"topology's collectives run on {group.device}; create the tensor on "
                f"topo.device (NCCL cannot take CPU tensors).")


def _count(group: Group, op: str) -> int:
    if op == "p2p":
        group.p2p_calls += 1
        return group.p2p_calls
    group.calls += 1
    group.ops[op] += 1
    group.last_op = op
    return group.calls


def _failure(group: Group, op: str, call: int, e: Exception) -> CollectiveError:
    return explain_failure(group, op, call, e, world()[1], _LIVE)


def run(group: Group, op: str, nbytes: int, fn):
    """Call `fn` (a blocking collective, p2p post or wait) counting `nbytes` and the time
    blocked under `op`; a failure becomes a CollectiveError naming group, op and rank."""
    group.bytes[op] += nbytes
    call = _count(group, op)
    began = _now(group)
    try:
        result = fn()
    except RuntimeError as e:
        raise _failure(group, op, call, e) from e
    group.blocked.append((op, began, _now(group)))
    return result


def _now(group: Group):
    """A mark of "now" for the time blocked: the host clock on CPU; on CUDA an event on
    the current stream, because there a collective (or a wait) returns at once and it is
    the stream that waits: the time between the events around it is the exposed
    communication, which the host clock would not see."""
    if group.device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def settle(groups, upto: dict | None = None, read: bool = True) -> None:
    """Add the blocked intervals recorded so far (the first `upto[id(group)]` of them if
    given) to each group's `seconds`, or drop them unread (`read=False`: on CUDA, their
    events are read only after the caller waited for a later event)."""
    for g in groups:
        n = len(g.blocked) if upto is None else upto[id(g)]
        for op, began, ended in g.blocked[:n] if read else ():
            g.seconds[op] += (ended - began if isinstance(began, float)
                              else began.elapsed_time(ended) / 1000)
        del g.blocked[:n]


def marks(groups) -> dict:
    """How many blocked intervals each group holds now: a cut for `settle(upto=...)`."""
    return {id(g): len(g.blocked) for g in groups}


def start(group: Group, op: str, nbytes: int, fn):
    """Start an asynchronous collective (`fn` returns its Work), counting its bytes; the
    time blocked is counted when its `Pending` is waited for."""
    group.bytes[op] += nbytes
    call = _count(group, op)
    try:
        return fn()
    except RuntimeError as e:
        raise _failure(group, op, call, e) from e


@dataclass(eq=False)
class Pending:
    """An asynchronous collective in flight; `wait()` counts the time blocked in it."""
    work: object  # torch Work, or None when the collective was a no-op
    group: Group
    op: str
    key: object = None  # what the caller tracks it by (a gradient bucket)
    out: torch.Tensor | None = None  # reduce-scatter result
    keep: torch.Tensor | None = None  # input kept alive until the collective is done
    # its number from `start`, which callers call just before; later starts move it on
    call: int = field(init=False)

    def __post_init__(self):
        self.call = self.group.p2p_calls if self.op == "p2p" else self.group.calls

    def wait(self) -> None:
        if self.work is None:
            return
        began = _now(self.group)
        try:
            self.work.wait()
        except RuntimeError as e:
            raise _failure(self.group, self.op, self.call, e) from e
        self.group.blocked.append((self.op, began, _now(self.group)))
        self.work = None


def all_gather_async(out: torch.Tensor, chunk: torch.Tensor, group: Group):
    """All-gather equal chunks into the contiguous `out` (chunk i from rank i); returns Work
    or None when the group has one member."""
    if group.size == 1:
        out.copy_(chunk)
        return None
    _on_device(group, "all_gather", out, chunk)
    return start(group, "all_gather", out.numel() * out.element_size(),
                 lambda: _gather_single(out, chunk, group=group.pg, async_op=True))


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
# Single-buffer collectives (one contiguous output / input, no list of chunks to copy
# through): torch 2.13 renames them; 2.4 has only the older names.
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(x: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over the group (x must be contiguous)."""
    if group.size > 1:
        _on_device(group, "all_reduce", x)
        run(group, "all_reduce", x.numel() * x.element_size(),
            lambda: dist.all_reduce(x, op=REDUCE_OPS[op], group=group.pg))
    return x


def all_reduce_async(x: torch.Tensor, group: Group):
    """Start an in-place sum over the group of more than one member; returns Work."""
    _on_device(group, "all_reduce", x)
    return start(group, "all_reduce", x.numel() * x.element_size(),
                 lambda: dist.all_reduce(x, group=group.pg, async_op=True))


def reduce_scatter_async(out: torch.Tensor, x: torch.Tensor, group: Group):
    """Start the sum over the group of contiguous `x`, chunk r of it into `out` on rank r;
    returns Work (the group has more than one member)."""
    _on_device(group, "reduce_scatter", out, x)
    return start(group, "reduce_scatter", x.numel() * x.element_size(),
                 lambda: _scatter_single(out, x, group=group.pg, async_op=True))


class Started:
    """A collective in flight whose result `wait()` returns (tensor parallelism's
    overlapped backward: parallel/column_linear.py)."""

    def __init__(self, pending: Pending | None, result):
        self.pending, self.result = pending, result

    def wait(self) -> torch.Tensor:
        if self.pending is not None:
            self.pending.wait()
        return self.result()


def all_gather_start(x: torch.Tensor, group: Group, dim: int) -> Started:
    """`all_gather(x, group, dim)`, started; its result when waited for."""
    if group.size == 1:
        return Started(None, lambda: x)
    x = x.contiguous()
    _on_device(group, "all_gather", x)
    out = x.new_empty((group.size * x.shape[0], *x.shape[1:]))
    work = start(group, "all_gather", out.numel() * out.element_size(),
                 lambda: _gather_single(out, x, group=group.pg, async_op=True))
    return Started(Pending(work, group, "all_gather", keep=x),
                   lambda: _along(out, group.size, dim))


def reduce_start(x: torch.Tensor, group: Group, scatter_dim: int | None) -> Started:
    """The sum of `x` over the group, started: all of it (in place, `scatter_dim` None)
    or this rank's chunk of `scatter_dim` (a reduce-scatter)."""
    if group.size == 1:
        return Started(None, lambda: x)
    if scatter_dim is None:
        x = x.contiguous()
        return Started(Pending(all_reduce_async(x, group), group, "all_reduce"), lambda: x)
    _on_device(group, "reduce_scatter", x)
    x, out = _ranks_first(x, group.size, scatter_dim)
    work = start(group, "reduce_scatter", x.numel() * x.element_size(),
                 lambda: _scatter_single(out, x, group=group.pg, async_op=True))
    return Started(Pending(work, group, "reduce_scatter", keep=x), lambda: out)


def p2p(group: Group, sends: list, recvs: list) -> list:
    """Post one batch of sends and receives, each (tensor, peer global rank), sends first;
    returns their Works in that order (wait through `run(group, "p2p", 0, ...)`).

    No tags: NCCL ignores them (the k-th send from a to b meets the k-th receive on b
    from a), so callers keep messages apart by posting order alone, and gloo, which
    matches in posting order per tag, then behaves the same. Always one batch, even for
    one op: a lone isend/irecv may go to a separate NCCL communicator, unordered with
    the batched ones between the same two ranks."""
    tensors = [t for t, _ in sends + recvs]
    _on_device(group, "p2p", *tensors)
    ops = ([dist.P2POp(dist.isend, t, peer, group=group.pg) for t, peer in sends]
           + [dist.P2POp(dist.irecv, t, peer, group=group.pg) for t, peer in recvs])
    nbytes = sum(t.numel() * t.element_size() for t, _ in sends)
    return run(group, "p2p", nbytes, lambda: dist.batch_isend_irecv(ops))


def _along(gathered: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The n rank-major pieces of a single-buffer all-gather, joined along `dim` (free
    for dim 0; a [B, S, H] sequence gather needs the one copy a concatenation would)."""
    if dim == 0:
        return gathered
    pieces = gathered.unflatten(0, (n, -1))  # [n, *piece]
    return pieces.movedim(0, dim).flatten(dim, dim + 1)


def _ranks_first(x: torch.Tensor, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with rank r's chunk of `dim` as the r-th block of a contiguous buffer, the
    output for this rank's chunk): no copy for dim 0, one (the chunking's) otherwise."""
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: dim {dim} of size {x.shape[dim]} is not divisible "
                         f"by the group size {n}")
    if dim != 0:  # [n, ..., chunk, ...] as blocks of dim 0, as the collective wants
        x = x.unflatten(dim, (n, -1)).movedim(dim, 0).contiguous().flatten(0, 1)
    x = x.contiguous()
    return x, x.new_empty((x.shape[0] // n, *x.shape[1:]))


def all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    if group.size == 1:
        return x
    x = x.contiguous()
    _on_device(group, "all_gather", x)
    out = x.new_empty((group.size * x.shape[0], *x.shape[1:]))
    run(group, "all_gather", out.numel() * out.element_size(),
        lambda: _gather_single(out, x, group=group.pg))
    return _along(out, group.size, dim)


def reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce-scatter over {group.name}: dim {dim} of size {x.shape[dim]} "
                         f"is not divisible by the group size {group.size}")
    _on_device(group, "reduce_scatter", x)
    x, out = _ranks_first(x, group.size, dim)
    run(group, "reduce_scatter", x.numel() * x.element_size(),
        lambda: _scatter_single(out, x, group=group.pg))
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
    _on_device(group, "all_to_all", x)
    inputs = [c.contiguous() for c in x.chunk(group.size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(group.size)]
    run(group, "all_to_all", x.numel() * x.element_size(),
         lambda: dist.all_to_all(outputs, inputs, group=group.pg))
    return torch.cat(outputs, dim=gather_dim)
