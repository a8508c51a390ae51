"""Fused column-parallel projections: one GEMM in memory, the tensors it fuses on disk.

q, k and v (and a SwiGLU's gate and up) read the same input, so the model holds each
group as one column-parallel weight and runs one GEMM (one read of the input, one
launch, one weight-gradient GEMM). Its parameter carries

    p.fused_parts   ((suffix, global rows), ...), e.g. (("q_proj", 4096),
                    ("k_proj", 1024), ("v_proj", 1024)): the parts in order along dim 0

and each TP rank holds, stacked along dim 0, its own TP shard of every part: rank r's
rows are [q_r; k_r; v_r], so under grouped-query attention every rank has whole query
heads and the key/value heads they read (each part splits on head boundaries,
parallel/tensor.py's `check_tp_layout`).

The global value of a fused parameter (`global_tensor`, the optimizer's state tensors)
is the parts concatenated, [q; k; v], whatever tp is. What checkpoints, Hugging Face
export/import and the layout-independent init see is the parts themselves, under
the names the separate layers had (`layers.0.attn.qkv_proj.weight` is stored as
`layers.0.attn.q_proj.weight`, `...k_proj.weight`, `...v_proj.weight`): a rank's
share of each part is one box of one stored tensor, the init draws each part by its
own name, so weights, checkpoints and exports are those of the unfused model, and
checkpoints written before fusion load as they are. `parts` is that bridge.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch


def is_fused(p) -> bool:
    return getattr(p, "fused_parts", None) is not None


def part_name(name: str, suffix: str) -> str:
    """`layers.0.attn.qkv_proj.weight`, "q_proj" -> `layers.0.attn.q_proj.weight`."""
    module, _, leaf = name.rpartition(".")
    return f"{module.rpartition('.')[0]}.{suffix}.{leaf}"


def parts(name: str, p, tp_size: int = 1) -> list[tuple[str, int, SimpleNamespace | object]]:
    """[(stored name, first local row, meta)] of parameter `name`: one entry, `p` itself,
    for an unfused parameter; for a fused one each part, `meta` carrying what the
    parameter metadata would for a separate layer (shape: its local rows, global_shape,
    tp_split_dim 0, vocab_padding 0)."""
    if not is_fused(p):
        return [(name, 0, p)]
    out, row = [], 0
    rest = tuple(p.shape[1:])
    for suffix, global_rows in p.fused_parts:
        rows = global_rows // tp_size
        meta = SimpleNamespace(shape=torch.Size((rows, *rest)), tp_split_dim=0,
                               global_shape=torch.Size((global_rows, *rest)), vocab_padding=0)
        out.append((part_name(name, suffix), row, meta))
        row += rows
    return out


def stored_shapes(named_params) -> dict[str, tuple]:
    """{stored name: global shape} of `named_params` (name, parameter) pairs."""
    out = {}
    for name, p in named_params:
        for stored, _, meta in parts(name, p):
            out[stored] = tuple(getattr(meta, "global_shape", meta.shape))
    return out


def stored_tensors(named_params, grads: bool = False) -> dict[str, torch.Tensor]:
    """{stored name: value} (or the gradient) of a single-device model's (name, parameter)
    pairs: a fused projection split into its parts (detached views)."""
    out = {}
    for name, p in named_params:
        value = p.grad if grads else p.detach()
        values = split_global(p, value) if is_fused(p) else [value]
        out.update({stored: v for (stored, _, _), v in zip(parts(name, p), values)})
    return out


def joined(name: str, p, stored: dict) -> torch.Tensor:
    """Parameter `name`'s value assembled from a {stored name: tensor} mapping."""
    if not is_fused(p):
        return stored[name]
    return torch.cat([stored[part] for part, _, _ in parts(name, p)])


def flat_pieces(name: str, p, tp_size: int, start: int, length: int):
    """The flat range [start, start + length) of this rank's `p`, cut at its parts:
    [(stored name, meta, offset inside the part's local tensor, offset inside the range,
    length)]."""
    row = math.prod(p.shape[1:])
    out = []
    for stored, first_row, meta in parts(name, p, tp_size):
        lo, hi = first_row * row, first_row * row + math.prod(meta.shape)
        a, b = max(lo, start), min(hi, start + length)
        if a < b:
            out.append((stored, meta, a - lo, a - start, b - a))
    return out


def split_global(p, value: torch.Tensor) -> list[torch.Tensor]:
    """The global value of fused `p` -> its parts (views)."""
    return list(value.split([rows for _, rows in p.fused_parts]))


def local_to_global_rows(p, gathered: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Every TP rank's local rows stacked ([q_0; k_0; v_0; q_1; ...]) -> [q; k; v]."""
    local = [rows // tp_size for _, rows in p.fused_parts]
    per_rank = [shard.split(local) for shard in gathered.chunk(tp_size)]
    return torch.cat([per_rank[r][i] for i in range(len(local)) for r in range(tp_size)])


def global_to_local_rows(p, value: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """[q; k; v] -> this rank's [q_r; k_r; v_r]."""
    return torch.cat([part.chunk(tp_size)[tp_rank] for part in split_global(p, value)])


def column(layers, in_features: int, fused_parts, bias: bool):
    """One column layer (of the `layers` factory) computing every part of `fused_parts`
    ((suffix, output features), ...) from one input: its weight (and bias) marked."""
    layer = layers.column(in_features, sum(rows for _, rows in fused_parts), bias)
    for t in (layer.weight, layer.bias):
        if t is not None:
            t.fused_parts = tuple(fused_parts)
    return layer


def local_widths(layer, width: int) -> list[int]:
    """The widths of the parts in a fused layer's output of `width` features on this
    rank (each part holds the same fraction of its global size)."""
    total = sum(rows for _, rows in layer.weight.fused_parts)
    return [rows * width // total for _, rows in layer.weight.fused_parts]
