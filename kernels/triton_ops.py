"""The op table for kind "triton": reference.py's functions on Triton kernels.

Each op is an autograd.Function defined next to its kernels (norms, rotary,
activations, cross_entropy, flash_attention); this module only gives them the
names and signatures of kernels/reference.py, plus `adamw_step` for the optimizer
and `vocab_parallel_cross_entropy` for a vocabulary split over tensor-parallel ranks.
"""

from kernels.activations import GeluTanhFunction, SwiGLUFunction
from kernels.adamw import adamw_step
from kernels.cross_entropy import vocab_parallel_cross_entropy
from kernels.flash_attention import FlashAttentionFunction
from kernels.norms import LayerNormFunction, RMSNormFunction
from kernels.rotary import RotaryFunction

__all__ = ["rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "cross_entropy",
           "attention", "adamw_step", "vocab_parallel_cross_entropy"]


def rms_norm(x, weight, eps):
    return RMSNormFunction.apply(x, weight, eps)


def layer_norm(x, weight, bias, eps):
    return LayerNormFunction.apply(x, weight, bias, eps)


def rotary(q, k, cos, sin):
    return RotaryFunction.apply(q, k, cos, sin)


def swiglu(gate, up):
    return SwiGLUFunction.apply(gate, up)


def gelu(x):
    return GeluTanhFunction.apply(x)


def cross_entropy(logits, targets, z_loss=0.0, ignore_index=-100):
    """Mean loss in fp32 over targets != ignore_index, plus z_loss * mean(lse^2)."""
    return vocab_parallel_cross_entropy(logits, targets, 0, None, z_loss, ignore_index)


def attention(q, k, v):
    return FlashAttentionFunction.apply(q, k, v)
