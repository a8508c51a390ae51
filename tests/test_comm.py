"""A collective that cannot complete fails after parallel.timeout_s, naming its group.

Runs in its own two-process world (not the shared pool): a timed-out gloo group is
unusable afterwards.
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


def test_timeout_names_group_collective_and_rank():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    messages = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    message = next(m for m in messages if m)
    assert "all_reduce on the tp group" in message
    assert "ranks [0, 1]" in message and "global rank 0" in message
    assert "parallel.timeout_s" in message


def test_a_tensor_off_the_topology_device_is_refused():
    """NCCL has no CPU path: every collective and p2p checks its tensors against the
    group's device and names the operation, the group and both devices."""
    group = Group("dp", (0, 1), 0, None, torch.device("meta"))
    cpu = torch.zeros(4)
    calls = [lambda: comm.all_reduce(cpu, group), lambda: comm.all_gather(cpu, group, 0),
             lambda: comm.reduce_scatter(cpu, group, 0), lambda: comm.all_reduce_async(cpu, group),
             lambda: comm.all_gather_async(torch.zeros(8), cpu, group),
             lambda: comm.p2p(group, [(cpu, 1, 0)], [])]
    for call in calls:
        with pytest.raises(CollectiveError, match="dp group got a tensor on cpu.* on meta"):
            call()
    assert group.bytes == {}  # refused before anything was counted or sent
