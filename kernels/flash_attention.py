"""Flash attention (FlashAttention-2 style) in Triton, with grouped-query heads: causal
over one whole sequence, or one block of a softmax that spans several key blocks.

Two users. The model's causal attention (`FlashAttentionFunction`, the op table's
`attention`): q, k, v cover one sequence, `causal=True` (the default). Ring attention
(megalite/parallel/sequence.py), one (query chunk, key chunk) block at a time:
`causal=True` for the diagonal block (Sq == Sk), `False` for a block whose keys all
precede its queries (every query sees every key; Sq and Sk may differ). The ring merges
the blocks' (out, lse) by log-sum-exp and hands each block's backward the MERGED output
and the GLOBAL lse: p = exp(s - lse) is then the block's slice of the global softmax,
delta = rowsum(dO * O) the global Jacobian term, and the block's (dQ, dK, dV) its exact
share, which `grads=` adds in place into the ring's fp32 sums.

Forward: one program per (query block, batch * query head) streams the visible key
blocks with an online softmax (base-2 exponentials, the softmax scale 1/sqrt(D) folded
into the exponent), accumulates in fp32 and saves the row logsumexp (natural log,
[B, Hq, Sq] fp32) for the backward.

Backward, three kernels and no atomics, so the gradients are bit-identical from run
to run (an in-place sum needs none either: each element belongs to one program):
  1. delta = rowsum(dO * O), the softmax-Jacobian term of every query row;
  2. dK, dV: one program per (key block, batch * kv head) walks the visible query blocks
     for every query head of its GQA group, so the sum over the group happens in
     registers in a fixed order;
  3. dQ: one program per (query block, batch * query head) walks the key blocks.

Blocks the causal diagonal or the end of the keys cuts take the masked path; the others
skip the masks. Inputs are [B, H, S, D] with any strides; S need not be a multiple of
any block; D is a power of two from 16 to 128.
"""

import math

import torch
import triton
import triton.language as tl

from kernels._util import configs_for_device


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Block sizes keep BLOCK_M a multiple of BLOCK_N (forward, dQ) and BLOCK_N1 a
# multiple of BLOCK_M1 (dK/dV), so diagonal blocks line up with the masked path.
_FWD_CONFIGS = configs_for_device(
    [_cfg(8, 3, BLOCK_M=128, BLOCK_N=64), _cfg(4, 3, BLOCK_M=128, BLOCK_N=64),
     _cfg(4, 3, BLOCK_M=128, BLOCK_N=32), _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
     _cfg(8, 2, BLOCK_M=128, BLOCK_N=128)],
    _cfg(4, 1, BLOCK_M=32, BLOCK_N=16))
_DKDV_CONFIGS = configs_for_device(
    [_cfg(8, 2, BLOCK_M1=32, BLOCK_N1=128), _cfg(8, 2, BLOCK_M1=64, BLOCK_N1=128),
     _cfg(4, 3, BLOCK_M1=32, BLOCK_N1=64), _cfg(4, 2, BLOCK_M1=64, BLOCK_N1=64)],
    _cfg(4, 1, BLOCK_M1=16, BLOCK_N1=32))
_DQ_CONFIGS = configs_for_device(
    [_cfg(8, 2, BLOCK_M2=128, BLOCK_N2=32), _cfg(8, 2, BLOCK_M2=128, BLOCK_N2=64),
     _cfg(4, 3, BLOCK_M2=64, BLOCK_N2=32), _cfg(4, 2, BLOCK_M2=64, BLOCK_N2=64)],
    _cfg(4, 1, BLOCK_M2=32, BLOCK_N2=16))


def _fp32_tunes_smallest_tile(configs, named_args, **kwargs):
    """fp32 inputs (tests, debugging) take ieee dots: twice the shared memory of
    16-bit tiles and minutes of compile time per config, so only the smallest is used."""
    precision = kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION"))
    if precision != "ieee" or len(configs) == 1:
        return configs
    return [min(configs, key=lambda config: math.prod(config.kwargs.values()))]


_PRUNE = {"early_config_prune": _fp32_tunes_smallest_tile}


@triton.jit
def _visible(offs_m, offs_n, SK, CAUSAL: tl.constexpr):
    """[M, N]: which keys each query sees in a masked block (inside SK, causal if asked)."""
    keep = (offs_m >= 0)[:, None] & (offs_n < SK)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return keep


@triton.jit
def _key_range(start_m, SK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr):
    """(end of the unmasked key blocks, end of the visible keys) for a query block."""
    if CAUSAL:  # the blocks below the diagonal, then those it crosses
        full_end = start_m
        end = tl.minimum(start_m + BLOCK_M, SK)
    else:  # every block; the last one, cut by SK, is masked
        full_end = SK // BLOCK_N * BLOCK_N
        end = SK
    return full_end, end


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, SK,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k_t = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                      mask=n_ok[None, :], other=0.0)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_visible(offs_m, offs_n, SK, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["SQ", "SK", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, sm_scale,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                     svb, svh, svs, svd, sob, soh, sos, sod,
                     HQ, GROUPS, SQ, SK, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hkv = h // GROUPS
    qk_scale = tl.cast(sm_scale, tl.float32) * 1.4426950408889634
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < SQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None], other=0.0)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, end = _key_range(start_m, SK, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd,
                               offs_m, 0, full_end, SK, qk_scale, HEAD_DIM, BLOCK_N,
                               False, CAUSAL, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd,
                               offs_m, full_end, end, SK, qk_scale, HEAD_DIM, BLOCK_N,
                               True, CAUSAL, DOT_PRECISION)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * SQ + offs_m, lse, mask=m_ok)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sos, sod, sdob, sdoh, sdos, sdod, HQ, S,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < S)[:, None]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, tl.sum(o * do, axis=1), mask=offs_m < S)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sqd, sdos, sdod,
                offs_n, lo, hi, SQ, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M1):
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        m_ok = offs_m < SQ
        q_t = tl.load(q_base + offs_m[None, :] * sqs + offs_d[:, None] * sqd,
                      mask=m_ok[None, :], other=0.0)
        # Padded query rows get lse = +inf, hence probability 0: no bounds mask needed.
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
                           - lse2[None, :])
        if MASKED:  # the causal diagonal
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_base + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                     mask=m_ok[:, None], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["SQ", "SK", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"],
                 prune_configs_by=_PRUNE, restore_value=["DK", "DV"])
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale,
                          sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                          sdob, sdoh, sdos, sdod, sdkb, sdkh, sdks, sdkd,
                          sdvb, sdvh, sdvs, sdvd, HQ, HKV, GROUPS, SQ, SK,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                          ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N1
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hkv = (bh % HKV).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = (offs_n < SK)[:, None]
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=n_ok, other=0.0)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
                mask=n_ok, other=0.0)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:  # query blocks the diagonal crosses (masked), then those wholly below it
        diag_end = tl.minimum(start_n + BLOCK_N1, SQ)
        full_start = start_n + BLOCK_N1
    else:  # every query block, none masked
        diag_end = 0
        full_start = 0
    for g in range(GROUPS):
        h = hkv * GROUPS + g
        row = (b * HQ + h) * SQ
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        if CAUSAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row,
                                 sqs, sqd, sdos, sdod, offs_n, start_n, diag_end, SQ,
                                 qk_scale, HEAD_DIM, BLOCK_M1, True, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row,
                             sqs, sqd, sdos, sdod, offs_n, full_start, SQ, SQ,
                             qk_scale, HEAD_DIM, BLOCK_M1, False, DOT_PRECISION)
    dk_ptrs = DK + b * sdkb + hkv * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd
    dv_ptrs = DV + b * sdvb + hkv * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd
    dk = dk * sm_scale
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, SK,
              qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N2: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N2):
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        n_ok = offs_n < SK
        k_t = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                      mask=n_ok[None, :], other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * svs + offs_d[:, None] * svd,
                      mask=n_ok[None, :], other=0.0)
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
                         - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, SK, CAUSAL), p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["SQ", "SK", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"],
                 prune_configs_by=_PRUNE, restore_value=["DQ"])
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale,
                        sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                        sdob, sdoh, sdos, sdod, sdqb, sdqh, sdqs, sdqd, HQ, GROUPS, SQ, SK,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M2: tl.constexpr,
                        BLOCK_N2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M2
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hkv = h // GROUPS
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < SQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=m_ok[:, None], other=0.0)
    row = bh.to(tl.int64) * SQ
    lse2 = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    full_end, end = _key_range(start_m, SK, BLOCK_M2, BLOCK_N2, CAUSAL)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m,
                   0, full_end, SK, qk_scale, HEAD_DIM, BLOCK_N2, False, CAUSAL, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m,
                   full_end, end, SK, qk_scale, HEAD_DIM, BLOCK_N2, True, CAUSAL,
                   DOT_PRECISION)
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd
    dq = dq * sm_scale
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


def _head_dim_ok(dim):
    return 16 <= dim <= 128 and not dim & (dim - 1)


def supports(q: torch.Tensor) -> bool:
    """Whether these kernels take q's dtype (fp16, bf16, fp32) and head dim (16..128,
    a power of two); callers with a fallback (ring attention) ask first."""
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and _head_dim_ok(q.shape[-1])


def _check_inputs(q, k, v, causal):
    batch, hq, seq_q, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"attention needs q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and k.shape[2] != seq_q:
        raise ValueError(f"causal attention (a sequence, or a ring's diagonal block) needs as "
                         f"many keys as queries, got Sq={seq_q}, Sk={k.shape[2]}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if not _head_dim_ok(dim):
        raise ValueError(f"the Triton attention supports head dims 16, 32, 64, 128; got {dim}")


def _dot_precision(dtype):
    # fp32 inputs: full-precision products (tf32 would cost ~3 digits); ignored for 16-bit.
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention_forward(q, k, v, causal=True, out_dtype=None):
    """Attention of q [B, Hq, Sq, D] to k, v [B, Hkv, Sk, D] (Hq a multiple of Hkv).

    causal=True: query i sees keys 0..i (Sq == Sk): a whole sequence, or a ring's
    diagonal block. causal=False: every query sees every key (a block of keys that all
    precede the queries). Returns (out [B, Hq, Sq, D] in `out_dtype`, default q's;
    lse [B, Hq, Sq] fp32, natural log): this block's own softmax, which a caller that
    spans several blocks merges by lse (fp32 `out_dtype` keeps that merge unrounded).
    """
    _check_inputs(q, k, v, causal)
    batch, hq, seq_q, dim = q.shape
    hkv, seq_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((batch, hq, seq_q), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * hq)
    _attn_fwd_kernel[grid](q, k, v, out, lse, 1.0 / math.sqrt(dim),
                           *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                           hq, hq // hkv, seq_q, seq_k, HEAD_DIM=dim, CAUSAL=bool(causal),
                           DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse


def attention_delta(do, out):
    """rowsum(do * out) in fp32 [B, H, S]: the softmax-Jacobian term of every query row
    (for a merged softmax: of the merged output, once for all its blocks)."""
    batch, heads, seq, dim = out.shape
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=out.device)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(seq, block), batch * heads)](
        out, do, delta, *out.stride(), *do.stride(), heads, seq, HEAD_DIM=dim, BLOCK_M=block)
    return delta


def flash_attention_backward(do, q, k, v, out, lse, causal=True, delta=None, grads=None):
    """(dq, dk, dv) of attention of q to k/v whose softmax is normalised by `lse`.

    For one attention, `out`/`lse` are its forward's. For one block of a softmax over
    several key blocks (ring attention), pass the MERGED output and the GLOBAL lse
    [B, Hq, Sq] (fp32): p = exp(s - lse) is then the block's slice of the global
    probabilities, and the result the block's exact share: dq summed over the blocks
    is q's gradient; dk, dv are this block's keys' gradients from these queries.
    `delta = attention_delta(do, merged_out)`, computed once for all blocks, may stand
    in for `out` (then unused, may be None).

    grads=None: new tensors in the dtypes of q, k, v. grads=(dq, dk, dv), tensors of
    their shapes with any strides (fp32 for a sum over blocks): the block's gradients
    are ADDED into them in place (every element has one program: no atomics, the same
    bits every run) and they are returned, so the caller accumulates nothing itself.
    """
    _check_inputs(q, k, v, causal)
    batch, hq, seq_q, dim = q.shape
    hkv, seq_k = k.shape[1], k.shape[2]
    groups, sm_scale, precision = hq // hkv, 1.0 / math.sqrt(dim), _dot_precision(q.dtype)
    lse = lse.contiguous()  # the kernels index lse and delta rows as [B * Hq, Sq]
    delta = attention_delta(do, out) if delta is None else delta.contiguous()
    accumulate = grads is not None
    if accumulate:
        dq, dk, dv = grads
        if (dq.shape, dk.shape, dv.shape) != (q.shape, k.shape, v.shape):
            raise ValueError(f"grads must have the shapes of q, k, v, got {tuple(dq.shape)}, "
                             f"{tuple(dk.shape)}, {tuple(dv.shape)}")
    else:
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    flags = dict(HEAD_DIM=dim, CAUSAL=bool(causal), ACCUMULATE=accumulate, DOT_PRECISION=precision)
    grid_kv = lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N1"]), batch * hkv)
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta, sm_scale, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dk.stride(), *dv.stride(), hq, hkv, groups, seq_q, seq_k, **flags)
    grid_q = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M2"]), batch * hq)
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, dq, lse, delta, sm_scale, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dq.stride(), hq, groups, seq_q, seq_k, **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Causal attention over one whole sequence: the model's attention op."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = flash_attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        return flash_attention_backward(do, q, k, v, out, lse)
