"""The rank grid and every process group, in one object passed to the code that needs it.

    rank = tp_rank + tp * (sp_rank + sp * (dp_rank + dp * pp_rank))

TP varies fastest so a TP group sits inside one node. Groups: tp, sp, dp, pp; dp x sp
(gradients and optimizer shards: SP ranks hold the same weights); tp x pp (the model-
parallel group: one full model replica); embedding (first and last pipeline stage,
for tied embeddings); under hybrid sharding (`parallel.zero_shard` < dp x sp) the ZeRO
shard and replica groups that split dp x sp. Each is a `Group`: the torch process group plus its name, size,
this rank's index in it, and counters of the bytes its collectives move.

Every process of the default group must take part in creating every group, so
`build_topology` walks all of them in the same order on all ranks. A topology may
cover only a prefix of the world's ranks (tests build many layouts inside one pool of
workers); on a rank outside it `build_topology` returns None. Each rank then runs one
all-reduce on each of its groups, so that NCCL communicators all exist before the first
pipeline p2p batch (which only two members of a group post). With no process group
initialised, every group has size 1 and collectives are no-ops.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from megalite.errors import ConfigError
from megalite.parallel import comm
from megalite.parallel.comm import Group


@dataclass(eq=False)
class Topology:
    tp: int
    sp: int
    dp: int
    pp: int
    rank: int  # index in the grid
    tp_group: Group
    sp_group: Group
    dp_group: Group
    pp_group: Group
    dp_sp_group: Group
    model_parallel_group: Group  # tp x pp
    embedding_group: Group
    device: torch.device = torch.device("cpu")  # where every tensor of a collective lives
    # Hybrid sharding (parallel.zero_shard): ZeRO shards span `zero_shard_group`, blocks of
    # consecutive dp x sp ranks, replicated over `zero_replica_group`. By default the shard
    # group is dp x sp itself and the replica group is this rank alone.
    zero_shard_group: Group | None = None
    zero_replica_group: Group | None = None

    def __post_init__(self):
        if self.zero_shard_group is None:
            self.zero_shard_group = self.dp_sp_group
        if self.zero_replica_group is None:
            self.zero_replica_group = Group("zero_replica", (self.rank,), 0, None, self.device)

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def sp_rank(self) -> int:
        return self.rank // self.tp % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.sp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.sp * self.dp)

    @property
    def groups(self) -> list[Group]:
        return [self.tp_group, self.sp_group, self.dp_group, self.pp_group, self.dp_sp_group,
                self.model_parallel_group, self.embedding_group, self.zero_shard_group,
                self.zero_replica_group]

    def all_reduce(self, x, op: str = "sum"):
        """In-place sum (or max) of `x` over every rank of the grid: dp x sp, then tp x pp
        (the two groups span the grid, each rank once)."""
        comm.all_reduce(x, self.dp_sp_group, op)
        return comm.all_reduce(x, self.model_parallel_group, op)

    def reset_bytes(self) -> None:
        for g in self.groups:
            g.bytes.clear()
            g.ops.clear()


def grid_rank(tp_rank: int, sp_rank: int, dp_rank: int, pp_rank: int, tp: int, sp: int,
              dp: int) -> int:
    return tp_rank + tp * (sp_rank + sp * (dp_rank + dp * pp_rank))


def _rank_lists(tp: int, sp: int, dp: int, pp: int, varying: tuple[str, ...]) -> list[list[int]]:
    """All groups whose members differ only in the `varying` coordinates."""
    sizes = {"tp": tp, "sp": sp, "dp": dp, "pp": pp}
    fixed = [d for d in sizes if d not in varying]
    lists = []
    for fixed_coords in itertools.product(*(range(sizes[d]) for d in fixed)):
        coords = dict(zip(fixed, fixed_coords))
        members = []
        # the last name in `varying` varies fastest, so group order follows the grid
        for var_coords in itertools.product(*(range(sizes[d]) for d in reversed(varying))):
            coords.update(zip(reversed(varying), var_coords))
            members.append(grid_rank(coords["tp"], coords["sp"], coords["dp"], coords["pp"],
                                     tp, sp, dp))
        lists.append(sorted(members))
    return lists


def _embedding_lists(tp: int, sp: int, dp: int, pp: int) -> list[list[int]]:
    return [sorted({members[0], members[-1]}) for members in _rank_lists(tp, sp, dp, pp, ("pp",))]


def _zero_lists(tp: int, sp: int, dp: int, pp: int, shard: int) -> dict[str, list[list[int]]]:
    """Hybrid sharding: each dp x sp group cut into blocks of `shard` consecutive members
    (TP varies fastest in the grid, so a block spans shard * tp consecutive ranks: inside
    a node when that is <= the GPUs of a node), and the replica groups across the blocks
    (the members at the same place in each block)."""
    lists = _rank_lists(tp, sp, dp, pp, GROUP_SHAPES["dp_sp"])
    return {"zero_shard": [m[i:i + shard] for m in lists for i in range(0, len(m), shard)],
            "zero_replica": [m[j::shard] for m in lists for j in range(shard)]}


GROUP_SHAPES = {"tp": ("tp",), "sp": ("sp",), "dp": ("dp",), "pp": ("pp",),
                "dp_sp": ("dp", "sp"), "model_parallel": ("pp", "tp")}


def build_topology(tp: int = 1, sp: int = 1, dp: int = 1, pp: int = 1,
                   timeout_s: float | None = None, device="cpu",
                   zero_shard: int = 0) -> Topology | None:
    """Create every group for this layout over global ranks 0 .. tp*sp*dp*pp - 1; their
    collectives take tensors on `device` (comm.py checks it). `zero_shard`: dp x sp ranks
    per ZeRO shard (0: all of them; parallel.zero_shard)."""
    size = tp * sp * dp * pp
    shard = zero_shard or dp * sp
    if (dp * sp) % shard:
        raise ConfigError(f"parallel.zero_shard={zero_shard} does not divide dp x sp = "
                          f"{dp * sp}: a ZeRO shard spans zero_shard data-parallel ranks and "
                          f"the shards replicate over the rest; choose a divisor.")
    device = torch.device(device)
    initialised, me, world = comm.world()
    if size > world:
        raise ConfigError(f"the layout tp*sp*dp*pp = {tp}*{sp}*{dp}*{pp} = {size} needs {size} "
                          f"ranks but the world has {world}; launch {size} processes "
                          f"(NPROC_PER_NODE x NNODES) or shrink the layout.")
    mine = {}
    lists_of = {name: _rank_lists(tp, sp, dp, pp, varying)
                for name, varying in GROUP_SHAPES.items()}
    lists_of["embedding"] = _embedding_lists(tp, sp, dp, pp)
    if shard < dp * sp:  # else the shard group is dp x sp and the replica group one rank
        lists_of.update(_zero_lists(tp, sp, dp, pp, shard))
    for name, lists in lists_of.items():
        for members in lists:
            # size-1 groups need no process group (their collectives are no-ops); the
            # condition is the same on every rank, so creation order stays in step
            pg = comm.new_group(members, timeout_s) if initialised and len(members) > 1 else None
            if me in members:
                mine[name] = Group(name, tuple(members), members.index(me), pg, device)
    if me >= size:
        return None
    # One collective per group at start-up, in creation order (the same on every rank, so
    # the lowest group not yet done always has all its members there): every communicator
    # is up before the first p2p batch, which only some members of a group post.
    for group in mine.values():
        comm.all_reduce(torch.zeros(1, device=device), group)
    # Middle pipeline stages hold no embedding: their embedding group is just themselves.
    mine.setdefault("embedding", Group("embedding", (me,), 0, None, device))
    return Topology(tp, sp, dp, pp, me, mine["tp"], mine["sp"], mine["dp"], mine["pp"],
                    mine["dp_sp"], mine["model_parallel"], mine["embedding"], device,
                    mine.get("zero_shard"), mine.get("zero_replica"))


def destroy_topology(topo: Topology | None) -> None:
    """Free this rank's process groups (tests build many layouts in one world)."""
    if topo is None:
        return
    for g in {id(g): g for g in topo.groups}.values():
        if g.pg is not None:
            comm.destroy_group(g.pg)
            g.pg = None
