"""Fused kernels for megalite, each with a plain torch reference.

`get_ops(kind)` returns a namespace with the same functions for both kinds:

    rms_norm(x, weight, eps)              x [..., H], weight [H]
    layer_norm(x, weight, bias, eps)      x [..., H]
    rotary(q, k, cos, sin) -> (q, k)      q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [S, D]
                                          (Hugging Face rotate-half layout)
    swiglu(gate, up)                      silu(gate) * up
    gelu(x)                               tanh-approximated GELU (gpt2)
    cross_entropy(logits, targets)        logits [N, V], targets [N] -> mean loss (fp32)
    attention(q, k, v)                    causal; q [B, Hq, S, D], k/v [B, Hkv, S, D]

"torch" is the reference used on CPU and in tests; "triton" runs the Triton kernels
(CUDA, or the interpreter under TRITON_INTERPRET=1).

Outside the table, ring attention (megalite/parallel/sequence.py) calls the flash
kernel's block mode directly: `flash_attention.flash_attention_forward(q, k, v, causal,
out_dtype) -> (out, lse)` for one (query chunk, key chunk) block, diagonal (causal) or
full, and `flash_attention_backward(do, q, k, v, out, lse, causal, delta, grads)` fed the
merged output and global lse, adding the block's gradients into `grads` in place.
"""

from types import ModuleType


def get_ops(kind: str) -> ModuleType:
    if kind == "torch":
        from kernels import reference
        return reference
    if kind == "triton":
        from kernels import triton_ops
        return triton_ops
    raise ValueError(f"unknown kernel kind {kind!r}: use 'torch' or 'triton'")
