"""Fused AdamW step over flat fp32 buffers, plus the torch reference it must match.

The optimizer keeps parameters, gradients and both moments as flat buffers (one per
shard), so one launch updates a whole buffer in place: read param, grad, exp_avg,
exp_avg_sq, write three of them back. The arithmetic follows
torch.optim.AdamW(foreach=False): decoupled weight decay applied to the parameter
first, moments updated with lerp / addcmul, bias corrections as scalars computed on
the host in float64.
"""

import math

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _adamw_kernel(P, G, M, V, n, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    beta1 = tl.cast(beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    decay = tl.cast(decay, tl.float32)
    step_size = tl.cast(step_size, tl.float32)
    bc2_sqrt = tl.cast(bc2_sqrt, tl.float32)
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    # Correctly rounded sqrt and division: the approximate GPU defaults drift from
    # torch by a few ulps per step.
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.math.div_rn(m, denom)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)


def _coefficients(lr, beta1, beta2, weight_decay, step):
    if step < 1:
        raise ValueError(f"adamw_step counts steps from 1, got step={step}")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return 1.0 - lr * weight_decay, lr / bias_correction1, math.sqrt(bias_correction2)


def _check_flat(param, grad, exp_avg, exp_avg_sq):
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != param.numel():
            raise ValueError(f"adamw_step needs contiguous fp32 buffers of one size; {name} "
                             f"is {t.dtype} {tuple(t.shape)}")
    if not grad.is_contiguous() or grad.numel() != param.numel():
        raise ValueError(f"adamw_step needs a contiguous grad of {param.numel()} elements, "
                         f"got {tuple(grad.shape)}")


def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW update in place; `step` counts from 1 (after this update)."""
    _check_flat(param, grad, exp_avg, exp_avg_sq)
    decay, step_size, bc2_sqrt = _coefficients(float(lr), beta1, beta2, weight_decay, int(step))
    n = param.numel()
    if n:
        _adamw_kernel[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, n, float(lr), float(beta1), float(beta2),
            float(eps), decay, step_size, bc2_sqrt, BLOCK=_BLOCK)


def adamw_step_reference(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
                         weight_decay, step):
    """The same update with torch ops, as torch.optim.AdamW's single-tensor path does it."""
    decay, step_size, bc2_sqrt = _coefficients(float(lr), beta1, beta2, weight_decay, int(step))
    grad = grad.to(param.dtype)
    param.mul_(decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
