"""Process start-up under torchrun: process group, device, topology and per-rank logs.

`setup(cfg)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), checks that
the world matches the config's layout, starts the process group (NCCL on CUDA, gloo on
CPU) with the configured collective timeout, builds the rank grid, and sends each
rank's output to `<run.dir>/logs/rank_NNNNN.log` (rank 0 also keeps the console). On
Linux each worker asks the kernel to kill it when its parent (torchrun) dies, so no
orphan keeps a port or a GPU after the launcher is gone. Without torchrun it is one
process with size-1 groups.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch

from megalite.errors import ConfigError
from megalite.parallel import comm
from megalite.parallel.topology import Topology, build_topology


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def device_type(cfg) -> str:
    """The kind of device this config's workers run on, cuda or cpu. It only asks whether
    CUDA is visible (no device is initialised), so the preflight on the node asks too."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --train.device=cpu.")
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def pick_device(cfg, local_rank: int) -> str:
    if device_type(cfg) == "cpu":
        return "cpu"
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def process_group_options(device: str, timeout_s: float) -> dict:
    """comm.init_world's arguments: NCCL on CUDA, bound to this rank's device (set by
    pick_device first), so torch creates each group's communicator when the group is
    made, every member present, rather than at its first p2p batch, which not every
    member of the group takes part in, and which would then hang; gloo on CPU."""
    options = {"timeout": timedelta(seconds=timeout_s)}
    if device.startswith("cuda"):
        return {"backend": "nccl", "device_id": torch.device(device), **options}
    return {"backend": "gloo", **options}


def setup(cfg) -> tuple[Topology, str]:
    """Start this rank: returns (topology, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != cfg.world_size:
        raise ConfigError(f"{world} processes were started but the layout tp*pp*dp*sp is "
                          f"{cfg.world_size}; start {cfg.world_size} (./launch.sh does) or "
                          f"change parallel.*.")
    device = pick_device(cfg, local_rank)
    if "RANK" in os.environ:
        _die_with_parent()
        _log_to_file(cfg, rank)
    if world > 1 and not comm.world()[0]:
        comm.init_world(**process_group_options(device, cfg.parallel.timeout_s))
    p = cfg.parallel
    topo = build_topology(p.tp, p.sp, p.dp, p.pp, timeout_s=p.timeout_s, device=device,
                          zero_shard=p.zero_shard)
    return topo, device


def _log_to_file(cfg, rank: int) -> None:
    logs = Path(cfg.run.dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"rank_{rank:05d}.log", "a", buffering=1)
    if rank == 0:
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
    else:
        sys.stdout = sys.stderr = log


def is_main(topo: Topology) -> bool:
    return topo.rank == 0


def teardown(finished: bool) -> None:
    """Leave the process group before the interpreter exits, so the process exits with its
    own code. Left to interpreter shutdown, the groups' C++ threads are destroyed in no
    particular order, and a rank sometimes aborted ("terminate called without an active
    exception", exit -6) after a run that had finished and saved. A finished run first
    meets its peers in a barrier: every collective and send of every rank is complete,
    so no peer is still talking to a group being destroyed. After a failure the peers
    may be gone or stuck, so there is no barrier, only the local destruction."""
    comm.leave(finished)
