"""Causal flash attention (FlashAttention-2 style) in Triton, with grouped-query heads.

Forward: one program per (query block, batch * query head) streams the key blocks
up to the diagonal with an online softmax (base-2 exponentials, the softmax scale
1/sqrt(D) folded into the exponent), accumulates in fp32 and saves the row
logsumexp (natural log, [B, Hq, S] fp32) for the backward.

Backward, three kernels and no atomics, so the gradients are bit-identical from run
to run:
  1. delta = rowsum(dO * O), the softmax-Jacobian term of every query row;
  2. dK, dV: one program per (key block, batch * kv head) walks the query blocks at
     and below the diagonal for every query head of its GQA group, so the sum over
     the group happens in registers in a fixed order;
  3. dQ: one program per (query block, batch * query head) walks the key blocks.

Key/query blocks that straddle the diagonal take the masked path; the others skip
the masks. Inputs are [B, H, S, D] with any strides; S need not be a multiple of
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
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, S,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        k_t = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                      mask=n_ok[None, :], other=0.0)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            causal = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
            qk = tl.where(causal, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["S", "HEAD_DIM", "DOT_PRECISION"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, sm_scale,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                     svb, svh, svs, svd, sob, soh, sos, sod,
                     HQ, GROUPS, S, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hkv = h // GROUPS
    qk_scale = tl.cast(sm_scale, tl.float32) * 1.4426950408889634
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None], other=0.0)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key blocks wholly below the diagonal, then the ones the diagonal crosses.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd,
                               offs_m, 0, start_m, S, qk_scale, HEAD_DIM, BLOCK_N,
                               False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd,
                               offs_m, start_m, tl.minimum(start_m + BLOCK_M, S), S,
                               qk_scale, HEAD_DIM, BLOCK_N, True, DOT_PRECISION)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, lse, mask=m_ok)
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
                offs_n, lo, hi, S, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M1):
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        m_ok = offs_m < S
        q_t = tl.load(q_base + offs_m[None, :] * sqs + offs_d[:, None] * sqd,
                      mask=m_ok[None, :], other=0.0)
        # Padded rows get lse = +inf, hence probability 0.
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
                           - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_base + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                     mask=m_ok[:, None], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["S", "HEAD_DIM", "DOT_PRECISION"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale,
                          sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                          sdob, sdoh, sdos, sdod, sdkb, sdkh, sdks, sdkd,
                          sdvb, sdvh, sdvs, sdvd, HQ, HKV, GROUPS, S,
                          HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N1
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hkv = (bh % HKV).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = (offs_n < S)[:, None]
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
                mask=n_ok, other=0.0)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
                mask=n_ok, other=0.0)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N1, S)
    for g in range(GROUPS):
        h = hkv * GROUPS + g
        row = (b * HQ + h) * S
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row,
                             sqs, sqd, sdos, sdod, offs_n, start_n, diag_end, S, qk_scale,
                             HEAD_DIM, BLOCK_M1, True, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row,
                             sqs, sqd, sdos, sdod, offs_n, start_n + BLOCK_N1, S, S,
                             qk_scale, HEAD_DIM, BLOCK_M1, False, DOT_PRECISION)
    tl.store(DK + b * sdkb + hkv * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + b * sdvb + hkv * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, S,
              qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N2: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N2):
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        n_ok = offs_n < S
        k_t = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                      mask=n_ok[None, :], other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * svs + offs_d[:, None] * svd,
                      mask=n_ok[None, :], other=0.0)
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
                         - lse2[:, None])
        if MASKED:
            p = tl.where((offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["S", "HEAD_DIM", "DOT_PRECISION"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale,
                        sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                        sdob, sdoh, sdos, sdod, sdqb, sdqh, sdqs, sdqd, HQ, GROUPS, S,
                        HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M2
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hkv = h // GROUPS
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=m_ok[:, None], other=0.0)
    row = bh.to(tl.int64) * S
    lse2 = tl.load(LSE + row + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m,
                   0, start_m, S, qk_scale, HEAD_DIM, BLOCK_N2, False, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m,
                   start_m, tl.minimum(start_m + BLOCK_M2, S), S, qk_scale, HEAD_DIM,
                   BLOCK_N2, True, DOT_PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


def _check_inputs(q, k, v):
    batch, hq, seq, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"attention needs q [B, Hq, S, D] and k, v [B, Hkv, S, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if dim < 16 or dim > 128 or dim & (dim - 1):
        raise ValueError(f"the Triton attention supports head dims 16, 32, 64, 128; got {dim}")


def _dot_precision(dtype):
    # fp32 inputs: full-precision products (tf32 would cost ~3 digits); ignored for 16-bit.
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention_forward(q, k, v):
    """Returns (out [B, Hq, S, D], lse [B, Hq, S] fp32)."""
    _check_inputs(q, k, v)
    batch, hq, seq, dim = q.shape
    hkv = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq, seq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * hq)
    _attn_fwd_kernel[grid](q, k, v, out, lse, 1.0 / math.sqrt(dim),
                           *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                           hq, hq // hkv, seq, HEAD_DIM=dim,
                           DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse


def flash_attention_backward(do, q, k, v, out, lse):
    """Returns (dq, dk, dv) in the dtypes and shapes of q, k, v."""
    batch, hq, seq, dim = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    sm_scale = 1.0 / math.sqrt(dim)
    precision = _dot_precision(q.dtype)
    delta = torch.empty_like(lse)
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(seq, delta_block), batch * hq)](
        out, do, delta, *out.stride(), *do.stride(), hq, seq,
        HEAD_DIM=dim, BLOCK_M=delta_block)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grid_kv = lambda meta: (triton.cdiv(seq, meta["BLOCK_N1"]), batch * hkv)
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta, sm_scale, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dk.stride(), *dv.stride(), hq, hkv, groups, seq,
        HEAD_DIM=dim, DOT_PRECISION=precision)
    grid_q = lambda meta: (triton.cdiv(seq, meta["BLOCK_M2"]), batch * hq)
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, dq, lse, delta, sm_scale, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dq.stride(), hq, groups, seq,
        HEAD_DIM=dim, DOT_PRECISION=precision)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = flash_attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        return flash_attention_backward(do, q, k, v, out, lse)
