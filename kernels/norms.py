"""RMSNorm and LayerNorm in Triton: one forward kernel and one backward kernel for both.

Statistics are computed in fp32 whatever the input dtype. The forward saves the
per-row mean (LayerNorm) and 1/std; the backward recomputes the normalised row from
them. Weight and bias gradients are summed without atomics: each backward program
walks a contiguous run of rows, accumulates its own partial sum in registers and
writes it to row `pid` of a [num_programs, H] fp32 buffer, which torch then sums.
The number of programs depends only on the device and the row count, so the result
is bit-identical from run to run.
"""

import torch
import triton
import triton.language as tl

from kernels._util import next_power_of_2, persistent_programs, rows_view


def _num_warps(block_h: int) -> int:
    if block_h >= 32768:
        return 32
    if block_h >= 8192:
        return 16
    if block_h >= 2048:
        return 8
    return 4


@triton.jit
def _norm_fwd_kernel(X, Y, W, B, Mean, Rstd, stride_x, stride_y, H, eps,
                     IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    eps = tl.cast(eps, tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / H + eps)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(X, DY, DX, W, Mean, Rstd, DW_partial, DB_partial,
                     stride_x, stride_dy, stride_dx, M, H, rows_per_program,
                     IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row64)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + row64)) * rstd, 0.0)
        wdy = w * dy
        # d/dx of normalise(x): project out the components the statistics absorb.
        proj = tl.sum(xhat * wdy, axis=0) / H
        if IS_RMS:
            dx = (wdy - xhat * proj) * rstd
        else:
            dx = (wdy - xhat * proj - tl.sum(wdy, axis=0) / H) * rstd
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_partial + pid * H + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * H + cols, db_acc, mask=mask)


def norm_forward(x, weight, bias, eps, is_rms):
    """Returns (y, x2d, mean, rstd); mean is None for RMSNorm."""
    x2d = rows_view(x)
    rows, hidden = x2d.shape
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = None if is_rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    block_h = next_power_of_2(hidden)
    if rows > 0:
        _norm_fwd_kernel[(rows,)](
            x2d, y, weight, bias if bias is not None else weight,
            mean if mean is not None else rstd, rstd,
            x2d.stride(0), y.stride(0), hidden, eps,
            IS_RMS=is_rms, HAS_BIAS=bias is not None, BLOCK_H=block_h,
            num_warps=_num_warps(block_h))
    return y.view(x.shape), x2d, mean, rstd


def norm_backward(dy, x2d, weight, has_bias, mean, rstd, is_rms):
    """Returns (dx [rows, H], dweight, dbias or None)."""
    rows, hidden = x2d.shape
    dy2d = rows_view(dy)
    dx = torch.empty((rows, hidden), dtype=x2d.dtype, device=x2d.device)
    programs = persistent_programs(x2d.device, rows)
    rows_per_program = triton.cdiv(rows, programs)
    dw_partial = torch.empty((programs, hidden), dtype=torch.float32, device=x2d.device)
    db_partial = torch.empty_like(dw_partial) if has_bias else dw_partial
    block_h = next_power_of_2(hidden)
    if rows > 0:
        _norm_bwd_kernel[(programs,)](
            x2d, dy2d, dx, weight, mean if mean is not None else rstd, rstd,
            dw_partial, db_partial, x2d.stride(0), dy2d.stride(0), dx.stride(0),
            rows, hidden, rows_per_program,
            IS_RMS=is_rms, HAS_BIAS=has_bias, BLOCK_H=block_h,
            num_warps=_num_warps(block_h))
    else:
        dw_partial.zero_()
        db_partial.zero_()
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype) if has_bias else None
    return dx, dweight, dbias


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2d, _, rstd = norm_forward(x, weight, None, eps, is_rms=True)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dweight, _ = norm_backward(dy, x2d, weight, False, None, rstd, is_rms=True)
        return dx.view(ctx.x_shape), dweight, None


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, x2d, mean, rstd = norm_forward(x, weight, bias, eps, is_rms=False)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = norm_backward(dy, x2d, weight, ctx.has_bias, mean, rstd,
                                           is_rms=False)
        return dx.view(ctx.x_shape), dweight, dbias, None
