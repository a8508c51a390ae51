"""Tensor parallelism (Megatron-style): layers that hold 1/tp of a weight, and the loss
over a vocabulary split across the TP group.

- `ColumnParallelLinear` splits output features: weight rows [out/tp, in]; the input is
  replicated (or, under tp_sp, sequence-sharded and gathered here); the output stays
  split on the last dim.
- `RowParallelLinear` splits input features: weight [out, in/tp]; it takes the split
  output of a column layer and sums the partial products (all-reduce, or under tp_sp a
  reduce-scatter along the sequence); the bias is replicated and added once, after.
- `VocabParallelEmbedding` / `VocabParallelHead` split the vocabulary rows, padded up to
  a multiple of tp * pad_to_multiple so every rank holds the same number of rows; pad
  rows stay zero and pad logits are masked out of the softmax.
- `vocab_parallel_cross_entropy`: the exact mean loss from logit shards, never
  gathering full-vocabulary logits.
- `TensorParallelLayers`: the factory `model.Transformer` builds its layers with.

tp_sp (Megatron sequence parallelism): between blocks the residual stream holds
[B, S/tp, H] on each rank, so norms, dropout and residual adds do 1/tp of the work;
column layers all-gather the sequence before their matmul, row layers reduce-scatter
after it (comm.py's mapping table).

Every parameter of a model built here carries metadata so that the optimizer,
checkpoints and init can reason about it without knowing layer types:
    p.tp_split_dim            0 (split rows), 1 (split columns) or None (replicated)
    p.global_shape            the unpadded global shape
    p.fused_parts             a fused projection's parts (parallel/fused.py)
    p.vocab_padding           zero rows appended along dim 0 before splitting (vocab)
    p.sequence_parallel_grad  True when the gradient on each TP rank is a partial sum
                              over its sequence shard (replicated parameters under
                              tp_sp): the trainer all-reduces those over TP.
`global_tensor` and `local_slice` convert between a rank's shard and the global value.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.reference import compute_dtype
from megalite.errors import ConfigError
from megalite.parallel import comm, fused, regions
from megalite.parallel.column_linear import column_linear
from megalite.parallel.topology import Group, Topology


def check_tp_layout(model_cfg, tp: int, seq_len: int | None = None) -> None:
    """Raise ConfigError when the model cannot be split over `tp` ranks.

    Each rank must hold whole attention heads (query and key/value) and an equal share
    of the MLP; with tp_sp (pass the per-rank sequence length as `seq_len`) an equal
    share of the sequence.
    """
    if tp == 1:
        return
    m = model_cfg
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % tp:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}: "
                          f"each tensor-parallel rank holds whole heads. Choose tp dividing "
                          f"num_heads, or change num_heads.")
    if kv % tp:
        raise ConfigError(f"model.num_kv_heads={kv} is not divisible by parallel.tp={tp}: each "
                          f"tensor-parallel rank needs whole key/value heads (at least one). "
                          f"Use parallel.tp <= {kv} dividing num_kv_heads, or raise "
                          f"model.num_kv_heads to a multiple of {tp}.")
    if m.ffn_hidden_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by "
                          f"parallel.tp={tp}; set it to a multiple of {tp}.")
    if seq_len is not None and seq_len % tp:
        raise ConfigError(f"parallel.tp_sp shards the sequence over tp={tp} ranks, but the "
                          f"sequence length {seq_len} is not divisible by {tp}; set "
                          f"train.seq_len to a multiple of {tp} (times sp) or turn tp_sp off.")


def padded_vocab_size(vocab_size: int, tp: int, pad_to_multiple: int) -> int:
    multiple = tp * pad_to_multiple
    return -(-vocab_size // multiple) * multiple


def _mark(p: nn.Parameter, split_dim, global_shape, vocab_padding: int = 0,
          sequence_parallel_grad: bool = False) -> nn.Parameter:
    p.tp_split_dim = split_dim
    p.global_shape = torch.Size(global_shape)
    p.vocab_padding = vocab_padding
    p.sequence_parallel_grad = sequence_parallel_grad
    return p


def swap_in(param: nn.Parameter, data: torch.Tensor) -> None:
    """Make `param` hold `data` (its storage: a view of a flat buffer stays one) on any
    device, a meta parameter included, keeping the parameter object (ties, hooks, module
    references) and its attributes (the metadata above)."""
    if param.is_meta:  # `.data =` cannot leave the meta device: swap in an empty tensor
        attributes = dict(param.__dict__)
        empty = torch.empty(0, dtype=data.dtype, device=data.device)
        torch.utils.swap_tensors(param, nn.Parameter(empty, param.requires_grad))
        param.__dict__.update(attributes)
    # `.data =` rather than a Parameter over the view: the parameter keeps its own version
    # counter, so writing the buffer (ZeRO's all-gathers) does not invalidate the tensors
    # autograd saved from it.
    param.data = data


def mark_replicated(model: nn.Module, sequence_parallel: bool = False) -> None:
    """Give every parameter no parallel layer annotated the metadata of a replicated one.

    Those are the norms (and, in a dense model, everything). Under tp_sp the norms run
    on the sequence shard, so their gradients are partial sums over it.
    """
    for p in model.parameters():
        if not hasattr(p, "tp_split_dim"):
            _mark(p, None, p.shape, sequence_parallel_grad=sequence_parallel)


def _local_size(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ConfigError(f"{what}={n} is not divisible by parallel.tp={tp}; choose sizes "
                          f"that are multiples of tp.")
    return n // tp


def _placeholder(*shape) -> nn.Parameter:
    # Values come from megalite.model.init (layout-independent): nothing is drawn here,
    # and the model is usually built on the meta device anyway.
    return nn.Parameter(torch.empty(shape))


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp_group: Group,
                 sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        local_out = _local_size(out_features, tp_group.size, "output features")
        self.weight = _mark(_placeholder(local_out, in_features), 0, (out_features, in_features))
        self.bias = (_mark(nn.Parameter(torch.zeros(local_out)), 0, (out_features,))
                     if bias else None)

    def forward(self, x):
        return column_linear(x, self.weight, self.bias, self.tp_group, self.sequence_parallel)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp_group: Group,
                 sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        local_in = _local_size(in_features, tp_group.size, "input features")
        self.weight = _mark(_placeholder(out_features, local_in), 1, (out_features, in_features))
        # Added after the reduction, to the sequence shard under tp_sp.
        self.bias = (_mark(nn.Parameter(torch.zeros(out_features)), None, (out_features,),
                           sequence_parallel_grad=sequence_parallel) if bias else None)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = regions.reduce_scatter_to_group(y, self.tp_group, dim=1)
        else:
            y = regions.reduce_from_group(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (padded vocabulary) are split across the TP group.

    Each rank looks up the ids in its row range and writes zeros for the others; the
    partial outputs are summed (reduce-scattered along the sequence under tp_sp).
    """

    def __init__(self, num_embeddings: int, dim: int, tp_group: Group,
                 sequence_parallel: bool = False, pad_to_multiple: int = 1):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        padded = padded_vocab_size(num_embeddings, tp_group.size, pad_to_multiple)
        self.rows = padded // tp_group.size
        self.vocab_start = tp_group.rank * self.rows
        self.weight = _mark(_placeholder(self.rows, dim), 0, (num_embeddings, dim),
                            vocab_padding=padded - num_embeddings)

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return regions.reduce_scatter_to_group(out, self.tp_group, dim=1)
        return regions.reduce_from_group(out, self.tp_group)


class SequenceShardedPositions(nn.Embedding):
    """Learned positions under tp_sp: the rows of this rank's sequence shard.

    Replicated weights, but each rank reads only its shard's positions, so the
    gradient is a partial sum (`sequence_parallel_grad`), like a norm's.
    """

    def __init__(self, num_embeddings: int, dim: int, tp_group: Group):
        super().__init__(num_embeddings, dim)
        self.tp_group = tp_group
        _mark(self.weight, None, self.weight.shape, sequence_parallel_grad=True)

    def forward(self, position_ids):
        return super().forward(comm.split(position_ids, self.tp_group, dim=0))


class VocabParallelHead(ColumnParallelLinear):
    """The LM head: a column-parallel linear over the padded vocabulary.

    `loss` is the vocab-parallel cross-entropy of its logit shards; `full_logits`
    gathers them and drops the pad columns (generation).
    """

    def __init__(self, hidden_size: int, vocab_size: int, tp_group: Group,
                 sequence_parallel: bool, pad_to_multiple: int, ops):
        padded = padded_vocab_size(vocab_size, tp_group.size, pad_to_multiple)
        super().__init__(hidden_size, padded, False, tp_group, sequence_parallel)
        _mark(self.weight, 0, (vocab_size, hidden_size), vocab_padding=padded - vocab_size)
        self.vocab_size = vocab_size
        self.vocab_start = tp_group.rank * (padded // tp_group.size)
        # The op table's full-vocabulary loss (maybe a fused kernel): exact only when
        # one rank holds the whole, unpadded vocabulary. Otherwise the Triton op table's
        # vocab-parallel kernel (model.kernels=triton, the default on CUDA: one pass over
        # the shard, padding masked, no fp32 copy of the logits, no host sync), or the
        # torch path below (the CPU reference). Functions, not the ops module: modules
        # cannot be deep-copied.
        self.cross_entropy = ops.cross_entropy
        self.fused_vocab_parallel = getattr(ops, "vocab_parallel_cross_entropy", None)
        self.whole_vocab = tp_group.size == 1 and padded == vocab_size

    def loss(self, logits, targets):
        if self.whole_vocab:
            return self.cross_entropy(logits, targets)
        if self.fused_vocab_parallel is not None:
            group = self.tp_group
            return self.fused_vocab_parallel(logits, targets, self.vocab_start,
                                             lambda x, op: comm.all_reduce(x, group, op),
                                             vocab_size=self.vocab_size)
        return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.vocab_start,
                                            self.vocab_size)

    def full_logits(self, logits):
        return regions.gather_from_group(logits, self.tp_group, dim=-1)[..., :self.vocab_size]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        x = logits.to(compute_dtype(logits.dtype))
        columns = vocab_start + torch.arange(x.shape[1], device=x.device)
        x = x.masked_fill(columns >= vocab_size, float("-inf"))
        local = targets - vocab_start
        mine = (local >= 0) & (local < x.shape[1]) & (targets != ignore_index)
        target_logit = x.gather(1, local.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(mine, target_logit, 0.0)
        # One all-gather of each shard's (log-sum-exp, target logit) gives every rank
        # the global values: lse = logsumexp over shards (a shard of only pad columns
        # gives -inf, which drops out), target logit = the one non-zero shard's.
        stats = torch.stack([torch.logsumexp(x, dim=1), target_logit]).unsqueeze(0)
        stats = comm.all_gather(stats, group, dim=0)
        lse = torch.logsumexp(stats[:, 0], dim=0)
        target_logit = stats[:, 1].sum(dim=0)
        valid = targets != ignore_index
        n_valid = valid.sum()
        loss = torch.where(valid, lse - target_logit, 0.0).sum() / n_valid
        ctx.save_for_backward(logits, lse, local, mine, valid, n_valid)
        ctx.vocab_start, ctx.vocab_size = vocab_start, vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, local, mine, valid, n_valid = ctx.saved_tensors
        x = logits.to(compute_dtype(logits.dtype))
        columns = ctx.vocab_start + torch.arange(x.shape[1], device=x.device)
        x = x.masked_fill(columns >= ctx.vocab_size, float("-inf"))
        grad = torch.exp(x - lse.unsqueeze(1))  # softmax; 0 on pad columns
        # minus one at each row's own target column (a scatter: no nonzero(), which
        # would wait for the device to learn how many rows there are)
        column = local.clamp(0, x.shape[1] - 1).unsqueeze(1)
        grad.scatter_add_(1, column, -mine.to(grad.dtype).unsqueeze(1))
        scale = torch.where(valid, grad_loss / n_valid, 0.0)
        return (grad * scale.unsqueeze(1)).to(logits.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor,
                                 tp_group: Group, vocab_start: int, vocab_size: int,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the valid targets, from this rank's logit columns.

    logits_shard [N, V_local] holds global vocabulary ids vocab_start ..
    vocab_start + V_local - 1 (ids >= vocab_size are padding and excluded); targets [N]
    are global ids, the same on every rank. Every rank returns the same loss and gets
    the gradient of its own shard.
    """
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, tp_group, vocab_start,
                                            vocab_size, ignore_index)


def global_tensor(p: nn.Parameter, local: torch.Tensor, tp_group: Group) -> torch.Tensor:
    """The unpadded global value of `local` (p's shard, or its gradient) on every rank."""
    if p.tp_split_dim is None:
        return local
    full = comm.all_gather(local, tp_group, dim=p.tp_split_dim)
    if fused.is_fused(p):
        return fused.local_to_global_rows(p, full, tp_group.size)
    return full.narrow(p.tp_split_dim, 0, p.global_shape[p.tp_split_dim])


def local_slice(p: nn.Parameter, global_value: torch.Tensor, tp_rank: int,
                tp_size: int) -> torch.Tensor:
    """This rank's shard of `global_value` (unpadded global shape), pad rows zero."""
    if p.tp_split_dim is None:
        return global_value
    if fused.is_fused(p):
        return fused.global_to_local_rows(p, global_value, tp_rank, tp_size).contiguous()
    if p.vocab_padding:
        pad = global_value.new_zeros((p.vocab_padding, *global_value.shape[1:]))
        global_value = torch.cat([global_value, pad])
    return global_value.chunk(tp_size, dim=p.tp_split_dim)[tp_rank].contiguous()


def local_range(p: nn.Parameter, tp_rank: int, tp_size: int) -> slice:
    """The global indices along `p.tp_split_dim` this rank holds (padded index space)."""
    size = (p.global_shape[p.tp_split_dim] + p.vocab_padding) // tp_size
    return slice(tp_rank * size, (tp_rank + 1) * size)


class TensorParallelLayers:
    """The tensor-parallel layer factory: same interface as `model.DenseLayers`.

    Pass it as `Transformer(cfg, layers=TensorParallelLayers(topo.tp_group, tp_sp, pad))`.
    """

    def __init__(self, tp_group: Group, sequence_parallel: bool = False,
                 pad_to_multiple: int = 1):
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.pad_to_multiple = pad_to_multiple

    def check(self, cfg) -> None:
        check_tp_layout(cfg, self.tp_group.size)

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, bias, self.tp_group,
                                    self.sequence_parallel)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return RowParallelLinear(in_features, out_features, bias, self.tp_group,
                                 self.sequence_parallel)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, dim, self.tp_group, self.sequence_parallel,
                                      self.pad_to_multiple)

    def position_embedding(self, num_positions: int, dim: int) -> nn.Module:
        if self.sequence_parallel:
            return SequenceShardedPositions(num_positions, dim, self.tp_group)
        return nn.Embedding(num_positions, dim)

    def head(self, hidden_size: int, vocab_size: int, ops) -> nn.Module:
        return VocabParallelHead(hidden_size, vocab_size, self.tp_group, self.sequence_parallel,
                                 self.pad_to_multiple, ops)

    def annotate(self, model: nn.Module) -> None:
        mark_replicated(model, self.sequence_parallel)


def to_global(param: torch.nn.Parameter, value: torch.Tensor, topo: Topology) -> torch.Tensor:
    """A parameter-shaped tensor of this rank -> the unpadded global tensor checkpoints store."""
    if topo.tp == 1:
        return value
    return global_tensor(param, value, topo.tp_group)


def to_local(param: torch.nn.Parameter, value: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The inverse of `to_global`: this rank's shard of a global tensor."""
    if topo.tp == 1:
        return value
    return local_slice(param, value, topo.tp_rank, topo.tp)
