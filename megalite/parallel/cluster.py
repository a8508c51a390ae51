"""Where the ranks run: the launch read from the environment, by hand or under Slurm.

`launch_from_env(env)` reads what launch.sh was given: NNODES (a count, or MIN:MAX for an
elastic run), NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_ID, and RDZV_CONF
(torchrun's --rdzv_conf: how long an elastic rendezvous waits, e.g.
`last_call_timeout=5,keep_alive_interval=1`; by default a lost node is noticed after
3 missed 5 s heartbeats and a shrunken group forms 30 s later). Under `srun`
(one task per node) the ones not set come from Slurm: SLURM_NNODES, SLURM_NODEID,
SLURM_GPUS_ON_NODE, the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) as the
rendezvous host, and the port and rendezvous id from SLURM_JOB_ID, so two jobs sharing a
node never meet in one rendezvous. Explicit variables win. `torchrun_args` turns it into
torchrun's arguments.

Slurm writes node lists compressed (`gpu[001-004,010],login1`); `expand_hostlist` reads
that syntax, and `first_host` asks `scontrol show hostnames` where it exists.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from megalite.errors import ConfigError

DEFAULT_PORT = 29500
# Ports from a Slurm job id: below Linux's ephemeral range (32768+), which the
# kernel hands to outgoing connections, and above the usual services.
JOB_PORT_BASE, JOB_PORT_SPAN = 15000, 15000


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list -> host names, in order: `a[1-3,7],b` is a1 a2 a3 a7
    b; ranges keep their zero padding (`n[08-10]` is n08 n09 n10); several bracket groups
    in one name multiply (`r[1-2]n[1-2]`)."""
    hosts, depth, start = [], 0, 0
    for i, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
        if char == "," and depth == 0:
            if i > start:
                hosts += _expand_name(hostlist[start:i], hostlist)
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
    return hosts


def _expand_name(name: str, hostlist: str) -> list[str]:
    parts = re.split(r"\[([^\]]*)\]", name)  # text, ranges, text, ranges, ..., text
    choices = [[parts[0]]]
    for ranges, text in zip(parts[1::2], parts[2::2]):
        choices += [_expand_ranges(ranges, hostlist), [text]]
    return ["".join(p) for p in itertools.product(*choices)]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    out = []
    for item in ranges.split(","):
        low, dash, high = item.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {hostlist!r}")
        if not dash:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in host list {hostlist!r}")
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return out


def first_host(hostlist: str) -> str:
    """The first host of a Slurm host list: scontrol's answer where it is installed (it
    knows every form Slurm writes), the parser above otherwise."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    try:
        return expand_hostlist(hostlist)[0]
    except (ValueError, IndexError) as e:
        raise ConfigError(f"cannot read the Slurm node list {hostlist!r} ({e}); set "
                          f"MASTER_ADDR to the first node's host name.") from None


@dataclass(frozen=True)
class Launch:
    """What one node's launch.sh starts: `min_nodes`..`max_nodes` nodes (equal unless
    elastic) of `nproc_per_node` ranks (None: not given, launch.sh decides), and where
    their rendezvous is."""
    min_nodes: int
    max_nodes: int
    node_rank: int
    nproc_per_node: int | None
    master_addr: str | None
    master_port: int
    rdzv_id: str
    rdzv_conf: str = ""

    @property
    def elastic(self) -> bool:
        return self.min_nodes != self.max_nodes

    def worlds(self, nproc: int) -> list[int]:
        """Every number of ranks this launch can run with."""
        return [n * nproc for n in range(self.min_nodes, self.max_nodes + 1)]


def _int(env: Mapping, name: str, low: int = 0) -> int:
    value = env[name]
    if not value.isdigit() or int(value) < low:
        raise ConfigError(f"{name}={value!r} must be a whole number >= {low}.")
    return int(value)


def _nodes(env: Mapping) -> tuple[int, int]:
    if "NNODES" not in env:
        return (_int(env, "SLURM_NNODES", 1),) * 2 if "SLURM_NNODES" in env else (1, 1)
    value = env["NNODES"]
    low, colon, high = value.partition(":")
    if not low.isdigit() or (colon and not high.isdigit()) or int(low) < 1 or \
            int(high or low) < int(low):
        raise ConfigError(f"NNODES={value!r}: give the number of nodes (NNODES=2) or, for a run "
                          f"that goes on when nodes leave, a range MIN:MAX (NNODES=1:2).")
    return int(low), int(high or low)


def _first_set(env: Mapping, *names: str) -> str | None:
    """The first of `names` set to something (a CPU node's SLURM_GPUS_ON_NODE=0 is not)."""
    return next((n for n in names if env.get(n) and not (n == "SLURM_GPUS_ON_NODE"
                                                        and env[n] == "0")), None)


def launch_from_env(env: Mapping[str, str]) -> Launch:
    """The launch as the environment describes it; explicit variables win over Slurm's."""
    min_nodes, max_nodes = _nodes(env)
    rank_var = _first_set(env, "NODE_RANK", "SLURM_NODEID")
    nproc_var = _first_set(env, "NPROC_PER_NODE", "SLURM_GPUS_ON_NODE")
    addr = env.get("MASTER_ADDR") or None
    nodelist = _first_set(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
    if addr is None and nodelist and max_nodes > 1:
        addr = first_host(env[nodelist])
    job = env.get("SLURM_JOB_ID", "")
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT", 1)
    elif job.isdigit():
        port = JOB_PORT_BASE + int(job) % JOB_PORT_SPAN
    else:
        port = DEFAULT_PORT
    rdzv_id = env.get("RDZV_ID") or (f"megalite-{job}" if job else f"megalite-{port}")
    launch = Launch(min_nodes, max_nodes, _int(env, rank_var) if rank_var else 0,
                    _int(env, nproc_var, 1) if nproc_var else None, addr, port, rdzv_id,
                    env.get("RDZV_CONF", ""))
    if launch.node_rank >= max_nodes:
        raise ConfigError(f"{rank_var}={launch.node_rank} but there are {max_nodes} nodes "
                          f"(NNODES); node ranks go from 0 to {max_nodes - 1}.")
    return launch


def torchrun_args(launch: Launch, nproc: int, max_restarts: int) -> list[str]:
    """torchrun's arguments for this launch: a standalone rendezvous on one node (a free
    port of its own), c10d at MASTER_ADDR:port under the launch's id on several."""
    common = [f"--nproc_per_node={nproc}", f"--max_restarts={max_restarts}"]
    if launch.max_nodes == 1:
        return ["--standalone", *common]
    if not launch.master_addr:
        raise ConfigError(f"{launch.max_nodes} nodes need a rendezvous host: set MASTER_ADDR "
                          f"to the host name of one node (the same on every node), or run "
                          f"under srun, which names the nodes.")
    nodes = (f"{launch.min_nodes}:{launch.max_nodes}" if launch.elastic
             else str(launch.max_nodes))
    conf = [f"--rdzv_conf={launch.rdzv_conf}"] if launch.rdzv_conf else []
    return [f"--nnodes={nodes}", f"--node_rank={launch.node_rank}", "--rdzv_backend=c10d",
            f"--rdzv_id={launch.rdzv_id}",
            f"--rdzv_endpoint={launch.master_addr}:{launch.master_port}", *conf, *common]
