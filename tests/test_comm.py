"""A collective that cannot complete fails after parallel.timeout_s, naming its group,
its call number there and which members did not take part.

The failing tests run in their own spawned worlds (not the shared pool): a timed-out
gloo group is unusable afterwards.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite.parallel import comm
from megalite.parallel.comm import CollectiveError, Group
from megalite.parallel.topology import build_topology


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    topo = build_topology(tp=2, timeout_s=3)
    if rank == 0:  # rank 1 never joins this all-reduce
        try:
            comm.all_reduce(torch.ones(4), topo.tp_group)
            results.put("no error")
        except comm.CollectiveError as e:
            results.put(str(e))
    else:
        results.put(None)


SPAWN = mp.get_context("spawn")


def _spawn(target, world_size, *args, all_reported=None) -> list:
    """Run `target(rank, port, results, *args)` on each rank of a fresh gloo world; returns
    what each rank put on `results`, in arrival order, then sets the `all_reported` Event."""
    results = SPAWN.Queue()
    port = _free_port()
    procs = [SPAWN.Process(target=target, args=(r, port, results, *args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    messages = [results.get(timeout=120) for _ in procs]
    if all_reported is not None:
        all_reported.set()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return messages


def test_timeout_names_group_collective_and_rank():
    message = next(m for m in _spawn(_rank_main, 2) if m)
    assert "all_reduce on the tp group" in message
    assert "ranks [0, 1]" in message and "global rank 0" in message
    assert "parallel.timeout_s" in message
    assert "rank 1 did not report" in message  # it left without entering a collective


def _three_ranks_main(rank, port, results, first_call_done, all_reported):
    """tp = {0, 1, 2}. All three take part in all-reduce #1; then rank 0 enters #2, rank 1
    enters a collective of the {1, 2} group instead (it cannot complete either), rank 2
    leaves without reporting."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    tp = Group("tp", (0, 1, 2), rank, comm.new_group([0, 1, 2], timeout_s=3))
    pair_pg = comm.new_group([1, 2], timeout_s=3)  # every rank creates every group
    comm.all_reduce(torch.ones(4), tp)
    first_call_done.wait(timeout=60)  # rank 2 leaves only once #1 is over everywhere
    try:
        if rank == 0:
            comm.all_reduce(torch.ones(4), tp)
        elif rank == 1:
            comm.all_reduce(torch.ones(4), Group("pair", (1, 2), 0, pair_pg))
        results.put((rank, "no error" if rank < 2 else None))
    except CollectiveError as e:
        results.put((rank, str(e)))
    if rank == 0:  # it hosts the store: stay until the others are done reporting
        all_reported.wait(timeout=60)


def test_timeout_names_the_members_that_did_not_take_part():
    """Rank 1 published its number on tp while failing in another group's collective;
    rank 2 died without publishing. Rank 0's message tells the two apart."""
    reported = SPAWN.Event()
    messages = dict(_spawn(_three_ranks_main, 3, SPAWN.Barrier(3), reported,
                           all_reported=reported))
    message = messages[0]
    assert "all_reduce on the tp group (ranks [0, 1, 2]) failed on global rank 0 at its " \
           "call #2 on this group" in message
    assert "rank 1 reached call #1 (all_reduce) and did not take part in call #2" in message
    assert "rank 2 did not report (dead, or hung outside a collective)" in message
    assert "parallel.timeout_s" in message
    assert "all_reduce on the pair group (ranks [1, 2]) failed on global rank 1" in messages[1]
    assert "rank 2 did not report" in messages[1]


class _FailingWork:
    def wait(self):
        raise RuntimeError("timed out")


def test_calls_are_numbered_per_group_and_without_a_store_the_message_stays_plain():
    """No world here, so no store: the failure keeps the plain message. An asynchronous
    collective reports the number it started with, not the group's latest."""
    group = Group("tp", (0, 1), 0, pg=object())
    comm.run(group, "all_reduce", 0, lambda: None)
    comm.run(group, "p2p", 0, lambda: None)
    pending = comm.Pending(comm.start(group, "all_gather", 0, _FailingWork), group, "all_gather")
    comm.run(group, "reduce_scatter", 0, lambda: None)
    assert (group.calls, group.last_op, group.p2p_calls) == (3, "reduce_scatter", 1)
    with pytest.raises(CollectiveError, match=r"^all_gather on the tp group \(ranks \[0, 1\]\) "
                       r"failed on global rank 0 at its call #2 on this group: timed out\. A peer"):
        pending.wait()
    with pytest.raises(CollectiveError, match="at its p2p call #2 on this group"):
        comm.run(group, "p2p", 0, _FailingWork().wait)


def test_a_tensor_off_the_topology_device_is_refused():
    """NCCL has no CPU path: every collective and p2p checks its tensors against the
    group's device and names the operation, the group and both devices."""
    group = Group("dp", (0, 1), 0, None, torch.device("meta"))
    cpu = torch.zeros(4)
    calls = [lambda: comm.all_reduce(cpu, group), lambda: comm.all_gather(cpu, group, 0),
             lambda: comm.reduce_scatter(cpu, group, 0), lambda: comm.all_reduce_async(cpu, group),
             lambda: comm.all_gather_async(torch.zeros(8), cpu, group),
             lambda: comm.p2p(group, [(cpu, 1)], [])]
    for call in calls:
        with pytest.raises(CollectiveError, match="dp group got a tensor on cpu.* on meta"):
            call()
    assert group.bytes == {}  # refused before anything was counted or sent
