"""Deterministic, layout-independent parameter initialisation.

Every value of a parameter depends only on (seed, the parameter's global name, its
global shape), never on the process, the rank or the order in which tensors are
built: this is what lets every (dp, tp, pp, sp) layout start from the same weights
as one process (DESIGN.md "Invariants").

A tensor is drawn in blocks of `BLOCK_ROWS` rows along dim 0, each block from its own
torch.Generator seeded by a SHA-256 of (seed, name, block index) — hashlib, because
Python's hash() of a str changes per process. A rank that holds only some rows of a
tensor (a column-parallel weight, a vocab-parallel embedding) draws only the blocks
it touches with `init_tensor(..., rows=...)`; one that holds some columns (a
row-parallel weight) passes `cols=` and draws the full rows of its blocks, one block
at a time. `ParameterInit` reads the metadata that `parallel.tensor` puts on every
parameter (split dim, global shape, vocabulary padding) to find a rank's slice (pad
rows are zero) and draws any flat range of it on demand, so a rank can fill just its
ZeRO shard of a model that exists only on the meta device; `init_parameters` fills a
materialised model.

Rules (GPT-2 / Megatron): linear and embedding weights normal(0, std); output
projections (o_proj, down_proj, mlp c_proj), which add into the residual stream,
normal(0, std / sqrt(2 * num_layers)); norm weights 1; biases 0.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from megalite.parallel import fused
from megalite.parallel.tensor import local_range

BLOCK_ROWS = 64
OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "c_proj.weight")


def constant_value(name: str) -> float | None:
    """The constant a parameter starts at (norm weights 1, biases 0), or None if random."""
    if name.endswith(".bias"):
        return 0.0
    if name.endswith("norm.weight"):
        return 1.0
    return None


def normal_std(name: str, std: float, num_layers: int) -> float:
    """Standard deviation of a randomly initialised parameter."""
    if name.endswith(OUTPUT_PROJECTIONS):
        return std / math.sqrt(2 * num_layers)
    return std


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"megalite-init/{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_tensor(name: str, global_shape, rows: slice = slice(None), seed: int = 0,
                std: float = 0.02, *, cols: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` (and columns `cols`) of the global normal(0, std) tensor `name`, fp32.

    Only the row blocks that `rows` touches are drawn, so a rank builds its slice
    without the whole tensor; the values equal the same slice of the full tensor.
    """
    global_shape = tuple(global_shape)
    start, stop, step = rows.indices(global_shape[0])
    if step != 1:
        raise ValueError(f"init_tensor takes a contiguous row slice, got step {step}")
    row_shape = global_shape[1:]
    parts = []
    for block in range(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS)):
        first = block * BLOCK_ROWS
        size = min(BLOCK_ROWS, global_shape[0] - first)
        generator = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.randn((size, *row_shape), generator=generator)
        values = values[max(start, first) - first:min(stop, first + size) - first]
        # contiguous() copies a column slice, so the rest of the block is freed now.
        parts.append(values[:, cols].contiguous() if row_shape else values)
    if not parts:
        return torch.empty((0, *row_shape))
    return torch.cat(parts) * std


def _tp_shard(module: nn.Module) -> tuple[int, int]:
    """(rank, size) of the TP group a module's parameters are split over."""
    group = getattr(module, "tp_group", None)
    return (group.rank, group.size) if group is not None else (0, 1)


def _local_rows(name: str, param, rows: slice, tp_rank: int, tp_size: int,
                seed: int, std: float) -> torch.Tensor:
    """Rows `rows` of this rank's slice of the global tensor `name`, drawing only those
    (`param`: a parameter, or a fused parameter's part, parallel/fused.py)."""
    global_shape = tuple(getattr(param, "global_shape", param.shape))
    split = getattr(param, "tp_split_dim", None)
    if split is None:
        return init_tensor(name, global_shape, rows, seed, std)
    held = local_range(param, tp_rank, tp_size)
    values = torch.zeros((rows.stop - rows.start, *param.shape[1:]))
    if split == 0:
        # Clipped to the real rows: the part in the vocabulary padding stays zero.
        first, last = (min(held.start + r, global_shape[0]) for r in (rows.start, rows.stop))
        values[:last - first] = init_tensor(name, global_shape, slice(first, last), seed, std)
    else:
        real = slice(min(held.start, global_shape[split]), min(held.stop, global_shape[split]))
        values[:, :real.stop - real.start] = init_tensor(name, global_shape, rows, seed, std,
                                                         cols=real)
    return values


class ParameterInit:
    """The initial value of any range of any parameter of `model`, drawn on demand.

    `values(p, start, length)` is elements [start, start + length) of this rank's
    flattened `p` (fp32, on the CPU), equal to the same elements of `init_parameters`'
    result: only the row blocks that touch the range are drawn. The model may live on
    the meta device: only names, shapes and the `parallel.tensor` metadata are read. So
    the optimizer fills each rank's shards of a model that was never materialised
    (sharded start-up: optim/zero.py). Names are the model's own parameter names, which
    must be the global ones (a pipeline stage names its layers by their global index);
    a tied weight takes its first name (`embed.weight`). `num_layers` (for the
    output-projection scaling) defaults to `model.cfg.num_layers`.
    """

    def __init__(self, model: nn.Module, seed: int, std: float, num_layers: int | None = None):
        self.seed, self.std = seed, std
        self.num_layers = num_layers or model.cfg.num_layers
        self.owner: dict[int, tuple[str, int, int]] = {}  # id(p) -> (name, tp rank, tp size)
        for module_name, module in model.named_modules():
            tp_rank, tp_size = _tp_shard(module)
            for short_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{short_name}" if module_name else short_name
                self.owner.setdefault(id(param), (name, tp_rank, tp_size))

    def values(self, param: nn.Parameter, start: int, length: int) -> torch.Tensor:
        name, tp_rank, tp_size = self.owner[id(param)]
        pieces = fused.flat_pieces(name, param, tp_size, start, length)
        if not pieces:
            return torch.empty(0)
        if len(pieces) == 1:
            stored, meta, inside, _, _ = pieces[0]
            return self._values(stored, meta, inside, length, tp_rank, tp_size)
        # a fused projection: each part drawn as the separate tensor it is stored as
        return torch.cat([self._values(stored, meta, inside, n, tp_rank, tp_size)
                          for stored, meta, inside, _, n in pieces])

    def _values(self, name: str, param, start: int, length: int, tp_rank: int,
                tp_size: int) -> torch.Tensor:
        constant = constant_value(name)
        if constant is not None:
            return torch.full((length,), constant)
        row = math.prod(param.shape[1:])
        first, last = start // row, -(-(start + length) // row)
        std = normal_std(name, self.std, self.num_layers)
        rows = _local_rows(name, param, slice(first, last), tp_rank, tp_size, self.seed, std)
        offset = start - first * row
        return rows.reshape(-1)[offset:offset + length]


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float, num_layers: int | None = None):
    """Initialise every (materialised) parameter of `model` in place from (seed, name).

    A parameter of a tensor-parallel layer (a module with `tp_group`) gets this rank's
    slice of the global tensor; see `ParameterInit` for the names and ties."""
    init = ParameterInit(model, seed, std, num_layers)
    for param in {id(p): p for p in model.parameters()}.values():
        values = init.values(param, 0, param.numel()).view(param.shape)
        param.copy_(values.to(param.dtype))
