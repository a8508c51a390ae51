"""Plain torch versions of every fused op: the CPU path and the tests' ground truth.

Reductions (norms, softmax, the loss) run in `compute_dtype`: fp32 for half-precision
inputs, the input's own dtype for fp32 and fp64, so a float64 run stays float64 end to
end (the layout-parity tests depend on it).
"""

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate in: at least fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x, weight, eps):
    acc = compute_dtype(x.dtype)
    xa = x.to(acc)
    y = xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def layer_norm(x, weight, bias, eps):
    acc = compute_dtype(x.dtype)
    return F.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc),
                        None if bias is None else bias.to(acc), eps).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(q, k, cos, sin):
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate, up):
    return F.silu(gate) * up


def gelu(x):
    return F.gelu(x, approximate="tanh")


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets)


def attention(q, k, v):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
