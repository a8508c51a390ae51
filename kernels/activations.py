"""SwiGLU (silu(gate) * up) and tanh-approximated GELU in Triton.

Forward and backward are elementwise over [rows, cols] views that keep the row
stride, so `gate` and `up` can be the two halves of one fused projection without a
copy. The backward recomputes sigmoid / tanh from the saved inputs instead of saving
intermediate activations: the inputs are kept anyway and the recompute is free next
to the memory traffic.
"""

import torch
import triton
import triton.language as tl

from kernels._util import rows_view

_BLOCK = 1024


@triton.jit
def _gelu_inner(x):
    """sqrt(2/pi) * (x + 0.044715 x^3), the tanh argument of GELU."""
    return 0.7978845608028654 * (x + 0.044715 * x * x * x)


@triton.jit
def _tanh(z):
    # tl.math has no tanh in every Triton 3.x. exp(-2|z|) never overflows.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, t, -t)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, stride_g, stride_u, stride_dy, stride_dg, stride_du,
                       cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dsilu = sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * stride_dg + offs, (dy * u * dsilu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_fwd_kernel(X, Y, stride_x, stride_y, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(_gelu_inner(x))
    tl.store(Y + row * stride_y + offs, (0.5 * x * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(X, DY, DX, stride_x, stride_dy, stride_dx, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(_gelu_inner(x))
    dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    dx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
    tl.store(DX + row * stride_dx + offs, (dy * dx).to(DX.dtype.element_ty), mask=mask)


def _grid(rows, cols):
    return (rows, triton.cdiv(cols, _BLOCK))


def _check_same_shape(a, b, what):
    if a.shape != b.shape:
        raise ValueError(f"{what} needs inputs of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        _check_same_shape(gate, up, "swiglu")
        g2, u2 = rows_view(gate), rows_view(up)
        rows, cols = g2.shape
        y = torch.empty((rows, cols), dtype=gate.dtype, device=gate.device)
        if y.numel():
            _swiglu_fwd_kernel[_grid(rows, cols)](g2, u2, y, g2.stride(0), u2.stride(0),
                                                  y.stride(0), cols, BLOCK=_BLOCK)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dy2 = rows_view(dy)
        rows, cols = g2.shape
        dg = torch.empty((rows, cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty((rows, cols), dtype=u2.dtype, device=u2.device)
        if dg.numel():
            _swiglu_bwd_kernel[_grid(rows, cols)](
                g2, u2, dy2, dg, du, g2.stride(0), u2.stride(0), dy2.stride(0),
                dg.stride(0), du.stride(0), cols, BLOCK=_BLOCK)
        return dg.view(ctx.shape), du.view(ctx.shape)


class GeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = rows_view(x)
        rows, cols = x2.shape
        y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
        if y.numel():
            _gelu_fwd_kernel[_grid(rows, cols)](x2, y, x2.stride(0), y.stride(0), cols,
                                                BLOCK=_BLOCK)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = rows_view(dy)
        rows, cols = x2.shape
        dx = torch.empty((rows, cols), dtype=x2.dtype, device=x2.device)
        if dx.numel():
            _gelu_bwd_kernel[_grid(rows, cols)](x2, dy2, dx, x2.stride(0), dy2.stride(0),
                                                dx.stride(0), cols, BLOCK=_BLOCK)
        return dx.view(ctx.shape)
