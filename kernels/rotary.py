"""Rotary position embedding for q and k in one launch (Hugging Face rotate-half layout).

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

Both halves of a head are handled by the program that owns the head, so each
element is read and written once. The grid's third axis runs over the q heads and
then the k heads, which lets one launch cover q and k even when their head counts
(GQA) and strides differ. The map is linear with an orthogonal 2x2 rotation per
(j, j + D/2) pair, so the backward is the same kernel with the sine negated, with
cos and sin indexed per half exactly as in the forward.
"""

import torch
import triton
import triton.language as tl

from kernels._util import next_power_of_2


@triton.jit
def _rope_tile(X, Y, COS, SIN, b, h, s_offs, d_offs, s_mask, d_mask,
               sxb, sxh, sxs, sxd, syb, syh, sys, syd, scs, scd, HALF, BACKWARD: tl.constexpr):
    mask = s_mask[:, None] & d_mask[None, :]
    x_base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + s_offs[:, None] * sxs
    y_base = Y + b.to(tl.int64) * syb + h.to(tl.int64) * syh + s_offs[:, None] * sys
    x1 = tl.load(x_base + d_offs[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + (d_offs[None, :] + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    first = s_offs[:, None] * scs + d_offs[None, :] * scd
    second = first + HALF * scd
    c1 = tl.load(COS + first, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + second, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + first, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + second, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of [[c1, -s1], [s2, c2]] applied to (g1, g2).
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_base + d_offs[None, :] * syd, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_base + (d_offs[None, :] + HALF) * syd, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, S, HQ, HALF,
                 sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                 sqob, sqoh, sqos, sqod, skob, skoh, skos, skod, scs, scd,
                 BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr):
    s_offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1)
    h = tl.program_id(2)
    d_offs = tl.arange(0, BLOCK_HALF)
    s_mask = s_offs < S
    d_mask = d_offs < HALF
    if h < HQ:
        _rope_tile(Q, QO, COS, SIN, b, h, s_offs, d_offs, s_mask, d_mask,
                   sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod, scs, scd, HALF, BACKWARD)
    else:
        _rope_tile(K, KO, COS, SIN, b, h - HQ, s_offs, d_offs, s_mask, d_mask,
                   skb, skh, sks, skd, skob, skoh, skos, skod, scs, scd, HALF, BACKWARD)


def rope_apply(q, k, cos, sin, backward=False):
    """Rotates q [B, Hq, S, D] and k [B, Hkv, S, D] (any strides) into new tensors."""
    batch, hq, seq, dim = q.shape
    hkv = k.shape[1]
    if dim % 2 or k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != dim:
        raise ValueError(f"rotary needs q [B, Hq, S, D] and k [B, Hkv, S, D] with even D, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    cos, sin = cos.reshape(seq, dim), sin.reshape(seq, dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = dim // 2
    block_half = next_power_of_2(half)
    block_s = max(1, min(next_power_of_2(seq), 4096 // block_half))
    grid = (triton.cdiv(seq, block_s), batch, hq + hkv)
    _rope_kernel[grid](q, k, q_out, k_out, cos, sin, seq, hq, half,
                       *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
                       cos.stride(0), cos.stride(1),
                       BACKWARD=backward, BLOCK_S=block_s, BLOCK_HALF=block_half,
                       num_warps=4)
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, k.shape)
        return rope_apply(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        # An output that did not reach the loss has no gradient; rotate zeros for it.
        dq = dq if dq is not None else cos.new_zeros(q_shape)
        dk = dk if dk is not None else cos.new_zeros(k_shape)
        dq_in, dk_in = rope_apply(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None
