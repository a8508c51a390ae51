"""Estimator, part 1: parameters, gradients and optimizer state of a rank.

Parameter shapes per pipeline rank as the model builds them, the parameter count
(Narayanan et al. 2021), and the ZeroOptimizer's bytes laid out with its own
BucketLayout (padding included), plus its transient buffers (ZeRO 3 gathers, gradient
buckets). Every sharded term divides by the ZeRO shard size N (`zero_groups`): dp * sp,
or parallel.zero_shard under hybrid sharding, where the shards are replicated over
dp * sp / N blocks and so cost each rank as much as one shard of N.
megalite/planning/estimate.py builds the whole estimate on top.
"""

from __future__ import annotations

from megalite.config import Config
from megalite.parallel.grads.buckets import BucketLayout
from megalite.parallel.grads.reduce import MAX_IN_FLIGHT
from megalite.parallel.pipeline.stage import layer_counts
from megalite.parallel.tensor import padded_vocab_size

BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


def _block_params(m, tp: int) -> list[int]:
    """Element counts of one block's parameters on a TP rank, in registration order."""
    h, f, gpt2 = m.hidden_size, m.ffn_hidden_size, m.preset == "gpt2"
    kv_width = m.num_kv_heads * (h // m.num_heads)
    norm = [h, h] if gpt2 else [h]

    def column(i, o):  # weight rows split, bias split
        return [o // tp * i] + ([o // tp] if gpt2 else [])

    def row(i, o):  # weight columns split, bias replicated
        return [o * (i // tp)] + ([o] if gpt2 else [])

    attention = column(h, h) + column(h, kv_width) * 2 + row(h, h)
    mlp = column(h, f) + row(f, h) if gpt2 else column(h, f) * 2 + row(f, h)
    return norm + attention + norm + mlp


def vocab_rows(cfg: Config) -> int:
    p = cfg.parallel
    if p.tp == 1:  # DenseLayers: no padding
        return cfg.model.vocab_size
    return padded_vocab_size(cfg.model.vocab_size, p.tp, p.vocab_pad_multiple) // p.tp


def stage_layers(cfg: Config, pp_rank: int) -> list[list[int]]:
    """Global layer ids of each local chunk of pipeline rank `pp_rank`."""
    p = cfg.parallel
    counts = layer_counts(cfg.model.num_layers, p.pp, p.virtual_stages, p.stage_layers)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [list(range(starts[s], starts[s] + counts[s]))
            for s in range(pp_rank, p.pp * p.virtual_stages, p.pp)]


def rank_params(cfg: Config, pp_rank: int, blocks: bool = True) -> list[tuple[int | None, int]]:
    """(layer id or None, elements) of each parameter of a rank, in registration order
    (model.Transformer): embedding, positions, blocks (unless not `blocks`), final norm,
    untied head."""
    m, p = cfg.model, cfg.parallel
    h, gpt2, tied = m.hidden_size, m.preset == "gpt2", m.tie_embeddings
    first, last = pp_rank == 0, pp_rank == p.pp - 1
    out = []
    if first or (last and tied):
        out.append((None, vocab_rows(cfg) * h))
    if gpt2 and first:
        out.append((None, m.max_seq_len * h))
    if blocks:
        block = _block_params(m, p.tp)
        out += [(i, n) for chunk in stage_layers(cfg, pp_rank) for i in chunk for n in block]
    if last:
        out += [(None, h)] * (2 if gpt2 else 1)
        if not tied:
            out.append((None, vocab_rows(cfg) * h))
    return out


def zero_groups(cfg: Config) -> tuple[int, int]:
    """(ranks one ZeRO shard spans, replicas of each shard): (dp * sp, 1) unless
    parallel.zero_shard makes the sharding hybrid."""
    n = cfg.parallel.dp * cfg.parallel.sp
    shard = cfg.parallel.zero_shard or n
    return shard, n // shard


def param_count(cfg: Config) -> int:
    """Parameters of the whole model, a tied weight once, unpadded vocabulary."""
    m = cfg.model
    h, V = m.hidden_size, m.vocab_size
    positions = m.max_seq_len * h if m.preset == "gpt2" else 0
    final_norm = 2 * h if m.preset == "gpt2" else h
    head = 0 if m.tie_embeddings else V * h
    return V * h + positions + m.num_layers * sum(_block_params(m, 1)) + final_norm + head


class _Numel:
    """Stands in for a parameter in BucketLayout, which only asks for numel()."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def numel(self) -> int:
        return self.n


def _layout(cfg: Config, pp_rank: int, exact: bool) -> dict:
    """Flat-buffer sizes of a rank: total, shard and the ZeRO 3 units (padding included
    when `exact`, by building ZeroOptimizer's BucketLayout from the parameter sizes)."""
    p = cfg.parallel
    n, _ = zero_groups(cfg)  # zero.py lays its buckets out over the shard group
    if not exact:
        rest_sizes = [k for _, k in rank_params(cfg, pp_rank, blocks=False)]
        block_sizes = _block_params(cfg.model, p.tp)
        rest, block = sum(rest_sizes), sum(block_sizes)
        psi = rest + block * sum(len(chunk) for chunk in stage_layers(cfg, pp_rank))
        # ZeRO 3 buckets are its units (the rest, then each block), whatever bucket_mb;
        # otherwise a bucket holds whole tensors: one larger than bucket_mb is its own
        bucket_numel = p.bucket_mb * 2 ** 20 / BYTES[cfg.train.grad_dtype]
        largest = (max(rest, block) if p.zero == 3 else
                   min(psi, max(bucket_numel, *rest_sizes, *block_sizes)))
        return {"psi": psi, "total": psi, "shard": psi / n, "rest": rest, "block": block,
                "largest_bucket": largest}
    shapes = rank_params(cfg, pp_rank)
    params = [(i, _Numel(k)) for i, k in shapes]
    order = [q for _, q in reversed(params)]
    units = None
    if p.zero == 3:
        layers = sorted({i for i, _ in params if i is not None})
        blocks = [[q for i, q in reversed(params) if i == layer] for layer in layers]
        in_blocks = {id(q) for unit in blocks for q in unit}
        units = [[q for q in order if id(q) not in in_blocks], *reversed(blocks)]
    # A tied embedding split over stages sits alone in a bucket (zero.py `_tied_embedding`).
    tied = cfg.model.tie_embeddings and p.pp > 1 and pp_rank in (0, p.pp - 1)
    grad_bytes = BYTES[cfg.train.grad_dtype]
    bucket_numel = max(1, int(p.bucket_mb * 2 ** 20 / grad_bytes))
    layout = BucketLayout(order, n, bucket_numel, units,
                          isolate=(params[0][1],) if tied and units is None else ())
    sizes = [b.size for b in layout.buckets]
    return {"psi": layout.numel, "total": layout.total, "shard": layout.shard_size,
            "rest": sizes[0] if units else 0, "block": max(sizes[1:], default=0) if units else 0,
            "largest_bucket": max(sizes)}


def _master_bytes(cfg: Config) -> int:
    """Bytes per element of the master weights and moments: fp32,
    or fp64 for an fp64 run (zero.py's `master_dtype`)."""
    return max(4, BYTES[cfg.train.precision])


def state_bytes(cfg: Config, pp_rank: int, exact: bool = True) -> dict:
    """Parameters, gradients and optimizer state of a rank (ZeroOptimizer's tensors), and
    the ZeRO transients: gathered blocks and gradient bucket buffers."""
    p, t = cfg.parallel, cfg.train
    lay = _layout(cfg, pp_rank, exact)
    n, replicas = zero_groups(cfg)
    e, g, master = BYTES[t.precision], BYTES[t.grad_dtype], _master_bytes(cfg)
    separate_master = e != master or cfg.optim.offload == "cpu"
    opt_numel = lay["total"] if p.zero == 0 else lay["shard"]
    out = {"psi": lay["psi"], "zero_shard_size": n, "zero_replicas": replicas,
           "params": e * (lay["total"] if p.zero < 3 else lay["shard"]),
           "grads": g * lay["total"] if p.zero < 2 else g * lay["shard"],
           "optimizer": master * (2 + separate_master) * opt_numel, "host_optimizer": 0}
    if cfg.optim.offload == "cpu":
        out["host_optimizer"], out["optimizer"] = out["optimizer"], 0
    buffers = {}
    if p.zero == 3:  # the rest unit for the whole step, a block and the prefetched next
        buffers["zero3_gathered"] = e * (lay["rest"] + 2 * lay["block"])
    if p.zero >= 2:
        # GradBuffer: the bucket being filled plus MAX_IN_FLIGHT reduce-scatters, each
        # holding its full-size bucket gradient (and its output chunk), at most.
        buffers["grad_buckets"] = min(g * lay["total"], (MAX_IN_FLIGHT + 1) * g * (
            lay["largest_bucket"] * (1 + (1 / n if n > 1 else 0))))
    elif p.zero == 1 and n > 1:  # reduce-scatter outputs (a shard of 1 all-reduces in place)
        buffers["grad_buckets"] = g * lay["shard"]
    out["buffers"] = buffers
    return out
