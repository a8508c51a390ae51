"""The `sp` dimension: each sample's sequence is split across the SP group and attention
is computed exactly over the whole of it (context parallelism).

This is not Megatron's `tp_sp` (sequence-sharded norm/dropout regions inside the TP
group, see comm.py); it is its own group, and the only layer that needs to see other
ranks' tokens is attention. Two ways to do that:

- `ring`: k/v chunks travel around the ring in `sp` steps while each rank attends its
  queries to the visiting keys, merging partial results with the log-sum-exp rule.
  Causal attention makes late tokens cost more than early ones, so the sequence is cut
  into 2*sp chunks and rank i holds chunks i and 2*sp-1-i: every rank then does the
  same amount of work at every step (causal load balancing). Works for any head count.
  Each (query chunk, key chunk) block runs in the Triton flash kernel on CUDA (memory
  O(S/sp) per block) and in fp32 torch on CPU (the reference: O((S/sp)^2) scores).
- `all_to_all` (Ulysses): an all-to-all trades the sequence split for a head split, each
  rank runs ordinary causal attention on sp-th of the heads over the full sequence,
  and a second all-to-all trades back. Uses a contiguous sequence split and needs the
  (per-TP-rank) head counts to be divisible by sp.

The data path shards token ids with `shard_sequence` (`shard_batch` does a whole batch
of token rows for a rank) and the model passes `shard_positions` as position_ids, so
RoPE / learned positions see global positions.
"""

from __future__ import annotations

import math

import torch

from kernels.reference import compute_dtype
from megalite.errors import ConfigError
from megalite.parallel import comm, regions
from megalite.parallel.topology import Group, Topology



# ---------------------------------------------------------------- layout and sharding


def check_sp_layout(seq_len: int, num_heads: int, num_kv_heads: int, sp: int, mode: str,
                    tp: int = 1) -> None:
    """Raise ConfigError when the sequence / heads cannot be split the way `mode` needs
    (`mode` itself, ring | all_to_all, is checked once, with the config)."""
    if sp == 1:
        return
    if mode == "ring":
        if seq_len % (2 * sp):
            raise ConfigError(
                f"train.seq_len={seq_len} is not divisible by 2*parallel.sp={2 * sp}: ring "
                f"attention cuts each sequence into 2*sp chunks for causal load balancing. "
                f"Set train.seq_len to a multiple of {2 * sp} or change parallel.sp.")
        return
    if seq_len % sp:
        raise ConfigError(f"train.seq_len={seq_len} is not divisible by parallel.sp={sp}; set "
                          f"train.seq_len to a multiple of {sp} or change parallel.sp.")
    for key, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if heads % tp or (heads // tp) % sp:
            raise ConfigError(
                f"parallel.sp_mode=all_to_all splits each TP rank's heads over sp, but "
                f"model.{key}/tp = {heads}/{tp} is not divisible by parallel.sp={sp}. "
                f"Choose sp (and tp) dividing the head counts, or use parallel.sp_mode=ring.")


def _chunk_order(sp_size: int, sp_rank: int, mode: str) -> tuple[int, ...]:
    """Indices of this rank's chunks of the sequence, in local order."""
    return (sp_rank, 2 * sp_size - 1 - sp_rank) if mode == "ring" else (sp_rank,)


def shard_sequence(x: torch.Tensor, sp_size: int, sp_rank: int, mode: str,
                   dim: int = 1) -> torch.Tensor:
    """This rank's tokens of `x` along `dim` (ring: chunks i and 2sp-1-i; else contiguous)."""
    order = _chunk_order(sp_size, sp_rank, mode)
    if sp_size == 1:
        return x
    n_chunks = len(order) * sp_size
    if x.shape[dim] % n_chunks:
        raise ConfigError(
            f"a sequence of {x.shape[dim]} tokens cannot be split into {n_chunks} equal chunks "
            f"for sp={sp_size}, sp_mode={mode}; make train.seq_len a multiple of {n_chunks}.")
    chunks = x.chunk(n_chunks, dim=dim)
    return torch.cat([chunks[i] for i in order], dim=dim)


def shard_positions(seq_len: int, sp_size: int, sp_rank: int, mode: str) -> torch.Tensor:
    """Global positions (LongTensor [seq_len / sp]) of this rank's tokens."""
    return shard_sequence(torch.arange(seq_len), sp_size, sp_rank, mode, dim=0)


def shard_batch(tokens: torch.Tensor, topo: Topology, cfg):
    """[B, S+1] token rows -> this rank's (inputs, targets, position_ids or None)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if topo.sp == 1:
        return inputs, targets, None
    mode, seq_len = cfg.parallel.sp_mode, inputs.shape[1]
    return (shard_sequence(inputs, topo.sp, topo.sp_rank, mode),
            shard_sequence(targets, topo.sp, topo.sp_rank, mode),
            shard_positions(seq_len, topo.sp, topo.sp_rank, mode).to(tokens.device))


def unshard_sequence(parts: list[torch.Tensor], mode: str, dim: int = 1) -> torch.Tensor:
    """Rebuild the full sequence from every SP rank's piece, `parts[r]` from rank r."""
    if mode == "all_to_all" or len(parts) == 1:
        return torch.cat(parts, dim=dim)
    halves = [p.chunk(2, dim=dim) for p in parts]
    # first halves are chunks 0..sp-1, second halves chunks 2sp-1 down to sp
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


# ---------------------------------------------------------------- ring exchange


class _RingExchange:
    """One asynchronous hop: send `buf` to the next rank, receive the previous rank's."""

    def __init__(self, buf: torch.Tensor, group: Group):
        self.group = group
        self.recv = torch.empty_like(buf)
        nxt = group.ranks[(group.rank + 1) % group.size]
        prev = group.ranks[(group.rank - 1) % group.size]
        self.send = buf  # keep the send buffer alive until the hop completes
        self.works = comm.p2p(group, [(buf, nxt)], [(self.recv, prev)])

    def wait(self) -> torch.Tensor:
        # waiting goes through comm.run as well so a dead peer raises CollectiveError; the
        # bytes were counted when the hop started
        comm.run(self.group, "p2p", 0, lambda: [w.wait() for w in self.works])
        return self.recv


# No tags (NCCL has none): every rank posts the same sequence of hops. The forward posts
# one k/v hop per step; the backward posts, per step, the k/v hop and then the dk/dv hop,
# so the k-th message from a rank to its successor is the same hop on both sides, and
# each hop is one batch {send to next, receive from previous} that the neighbours post
# as their own k-th batch: under NCCL's in-order rules every hop completes.


# ---------------------------------------------------------------- blockwise attention
#
# The ring works on [B, Hq, S, D] tensors and hands each block (one query chunk, one key
# chunk) to a block kernel: the Triton flash kernel on CUDA, memory O(c) per block, or
# the eager fp32 blocks below, the CPU path and reference, which materialise the
# [B, Hkv, g, c, c] scores. Both take causal=True for the diagonal block.

# Which block kernel the ring runs: "auto" (flash on CUDA, eager on CPU), "flash" (the
# kernel on any device: tests run it on CPU in the Triton interpreter, which needs
# TRITON_INTERPRET=1 set before triton is first imported) or "eager" (the reference, on
# any device: benchmarks compare the two on CUDA). Where the kernel does not take the
# inputs (no Triton, fp64, head dims other than 16..128 powers of two) the ring is eager.
BLOCK_KERNEL = "auto"


def _flash_kernels():
    """kernels.flash_attention, or None where Triton cannot be imported."""
    try:
        from kernels import flash_attention
    except ImportError:
        return None
    return flash_attention


def ring_block_kernel(q: torch.Tensor) -> str:
    """'flash' or 'eager': how ring attention computes its blocks for this q (see
    BLOCK_KERNEL)."""
    if BLOCK_KERNEL not in ("auto", "flash", "eager"):
        raise ValueError(f"sequence.BLOCK_KERNEL={BLOCK_KERNEL!r}: use auto, flash or eager")
    if BLOCK_KERNEL == "eager" or (BLOCK_KERNEL == "auto" and not q.is_cuda):
        return "eager"
    flash = _flash_kernels()
    return "flash" if flash is not None and flash.supports(q) else "eager"


def _visibility(q_chunk: int, k_chunk: int) -> str | None:
    if k_chunk < q_chunk:
        return "full"
    if k_chunk == q_chunk:
        return "diagonal"
    return None


def _visible_blocks(sp_size: int, sp_rank: int, owner: int):
    """(query part, key part, diagonal?) for each pair of this rank's two query chunks
    and the owner's two key chunks in which some key is visible to some query."""
    for qi, q_chunk in enumerate(_chunk_order(sp_size, sp_rank, "ring")):
        for ki, k_chunk in enumerate(_chunk_order(sp_size, owner, "ring")):
            seen = _visibility(q_chunk, k_chunk)
            if seen is not None:
                yield qi, ki, seen == "diagonal"


def _grouped(x, num_kv_heads):
    """[B, Hq, ...] as [B, Hkv, g, ...] (g = Hq/Hkv, GQA's repeat_interleave order), a
    view: a k/v block [B, Hkv, c, D] broadcasts over g and its gradient sums over g."""
    return x.view(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    acc = compute_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        n = s.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s


def _eager_block_forward(q, k, v, causal, scale):
    """(out, lse) of q [B, Hq, c, D] attending to one k/v block, in fp32 (fp64) torch."""
    s = _scores(_grouped(q, k.shape[1]), k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(s.dtype).unsqueeze(2))
    return out.flatten(1, 2), lse.flatten(1, 2)


def _flash_block_forward(q, k, v, causal, scale):
    # fp32 block output: the merge rounds once, at the end, as the eager path does
    return _flash_kernels().flash_attention_forward(q, k, v, causal=causal,
                                                    out_dtype=compute_dtype(q.dtype))


def _merge(out, lse, block_out, block_lse):
    """Fold one block's (out, lse) into the running (out, lse), in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


def _eager_block_backward(q, k, v, dout, lse, delta, causal, scale, dq, dk, dv):
    """Add one block's contributions to dq [B, Hq, c, D] and dk/dv [B, Hkv, c, D]."""
    hkv = k.shape[1]
    q, dout, dq, lse, delta = (_grouped(t, hkv) for t in (q, dout, dq, lse, delta))
    p = torch.exp(_scores(q, k, causal, scale) - lse.unsqueeze(-1))
    dv.add_(torch.matmul(p.transpose(-1, -2), dout).sum(2))
    dp = torch.matmul(dout, v.to(p.dtype).unsqueeze(2).transpose(-1, -2))
    ds = p * (dp - delta.unsqueeze(-1))
    dq.add_(torch.matmul(ds, k.to(p.dtype).unsqueeze(2)), alpha=scale)
    dk.add_(torch.matmul(ds.transpose(-1, -2), q.to(p.dtype)).sum(2), alpha=scale)


def _flash_block_backward(q, k, v, dout, lse, delta, causal, scale, dq, dk, dv):
    # lse and delta are the merged softmax's: the kernel adds this block's exact share
    _flash_kernels().flash_attention_backward(dout, q, k, v, None, lse, causal=causal,
                                              delta=delta, grads=(dq, dk, dv))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scale = 1.0 / math.sqrt(q.shape[-1])
        flash = ring_block_kernel(q) == "flash"
        block_forward = _flash_block_forward if flash else _eager_block_forward
        acc = compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        out_parts, lse_parts = out.chunk(2, dim=2), lse.chunk(2, dim=2)  # views, merged in place
        q_parts = q.chunk(2, dim=2)
        kv = torch.stack([k, v])
        for step in range(group.size):
            hop = _RingExchange(kv, group) if step < group.size - 1 else None
            owner = (group.rank - step) % group.size
            for qi, ki, diagonal in _visible_blocks(group.size, group.rank, owner):
                k_blk, v_blk = (t.chunk(2, dim=2)[ki] for t in kv)
                _merge(out_parts[qi], lse_parts[qi],
                       *block_forward(q_parts[qi], k_blk, v_blk, diagonal, scale))
            if hop is not None:
                kv = hop.wait()
        out = out.to(q.dtype)
        ctx.group, ctx.flash = group, flash
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        scale = 1.0 / math.sqrt(q.shape[-1])
        acc = compute_dtype(q.dtype)
        dout = dout.contiguous()
        # delta_i = sum_j P_ij dP_ij = rowsum(dO * O) of the merged output: the
        # softmax-backward correction, the same for every block of a query row
        if ctx.flash:
            block_backward = _flash_block_backward
            delta = _flash_kernels().attention_delta(dout, out)
        else:
            block_backward = _eager_block_backward
            dout = dout.to(acc)
            delta = (dout * out.to(acc)).sum(-1)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        q_parts, dq_parts = q.chunk(2, dim=2), dq.chunk(2, dim=2)
        dout_parts, lse_parts, delta_parts = (t.chunk(2, dim=2) for t in (dout, lse, delta))
        kv = torch.stack([k, v])
        dkv_hop = None
        for step in range(group.size):
            kv_hop = _RingExchange(kv, group) if step < group.size - 1 else None
            owner = (group.rank - step) % group.size
            # this block's dk/dv; the owner's running sum (fp32: it collects sp partial
            # sums, which half precision would round away) arrives meanwhile
            dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
            for qi, ki, diagonal in _visible_blocks(group.size, group.rank, owner):
                k_blk, v_blk = (t.chunk(2, dim=2)[ki] for t in kv)
                dk_blk, dv_blk = (t.chunk(2, dim=2)[ki] for t in dkv)
                block_backward(q_parts[qi], k_blk, v_blk, dout_parts[qi], lse_parts[qi],
                               delta_parts[qi], diagonal, scale, dq_parts[qi], dk_blk, dv_blk)
            if dkv_hop is not None:
                dkv += dkv_hop.wait()
            if group.size > 1:
                # after sp hops the running sum is back with the rank that owns k/v
                dkv_hop = _RingExchange(dkv, group)
            if kv_hop is not None:
                kv = kv_hop.wait()
        if dkv_hop is not None:
            dkv = dkv_hop.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp_group: Group):
    """Exact causal attention over the sequence split across `sp_group` (ring layout).

    q [B, Hq, S_local, D], k/v [B, Hkv, S_local, D]: this rank's two load-balanced
    chunks as `shard_sequence(..., mode="ring")` lays them out. Hq must be a multiple
    of Hkv. The softmax is computed in fp32 (fp64 for fp64); the output has q's dtype.
    `ring_block_kernel(q)` says which block kernel runs; the hops are the same for both.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"ring attention: {q.shape[1]} query heads is not a multiple of "
                         f"{k.shape[1]} kv heads")
    if q.shape[2] % 2:
        raise ValueError(f"ring attention: the local sequence ({q.shape[2]} tokens) must hold "
                         f"two equal chunks; shard it with shard_sequence(mode='ring')")
    return _RingAttention.apply(q, k, v, sp_group)


def all_to_all_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp_group: Group,
                         attention_fn):
    """Ulysses attention: trade the sequence split for a head split and back.

    Inputs hold a contiguous slice of the sequence (`mode="all_to_all"`). Rank r gets
    heads r*H/sp .. (r+1)*H/sp - 1 of q and of k/v, which keeps GQA's query-to-kv head
    mapping intact because Hq/sp = (Hq/Hkv) * (Hkv/sp).
    """
    sp = sp_group.size
    if q.shape[1] % sp or k.shape[1] % sp:
        raise ConfigError(f"all-to-all attention needs the head counts on this rank "
                          f"(q {q.shape[1]}, kv {k.shape[1]}) divisible by sp={sp}; use "
                          f"parallel.sp_mode=ring or another sp.")
    q, k, v = (regions.all_to_all(t, sp_group, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    out = attention_fn(q, k, v)
    return regions.all_to_all(out, sp_group, scatter_dim=2, gather_dim=1)


def sequence_attention(mode: str, sp_group: Group, attention_fn):
    """The attention callable (q, k, v) -> out for this SP layout.

    With one SP rank it is `attention_fn` itself. Ring mode computes its blocks with
    its own block kernels (it needs per-block log-sum-exp: the Triton flash block
    kernel on CUDA, fp32 torch elsewhere), so `attention_fn` is unused there.
    """
    if sp_group.size == 1:
        return attention_fn
    if mode == "ring":
        return lambda q, k, v: ring_attention(q, k, v, sp_group)
    return lambda q, k, v: all_to_all_attention(q, k, v, sp_group, attention_fn)
