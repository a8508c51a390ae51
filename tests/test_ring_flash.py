"""Ring attention on the flash block kernel (kernels/flash_attention.py, block mode).

Without CUDA the kernel runs in the Triton interpreter (fp32 and fp16 only: it computes
bf16 wrongly); with CUDA the single-process cases also run on the GPU, bf16 included.
- the block kernel alone: a full (non-causal) block with more keys than queries and a
  diagonal (causal) block, MHA and GQA: forward out and lse of each against float64
  torch, their lse merge, and the backward of the merged two-block softmax fed the
  merged output and the global lse (as the ring feeds it), fresh and accumulated in
  place, against float64 autograd through the whole softmax;
- ring attention with the flash blocks over one rank (no communication) and over 2 and
  4 gloo ranks (forced on CPU with `sequence.BLOCK_KERNEL = "flash"`), against
  single-process float64 causal attention; each rank counts its kernel calls, so a
  silent fall-back to the eager blocks fails.

Tolerance, relative to the reference's largest magnitude: every result is a sum over n
keys (or queries) accumulated in fp32 by blocks and merges, whose rounding grows like
log2(n) roundings, plus a fixed few roundings of 16-bit operands (p and dS before their
matmuls, the stored output): 4 * eps(dtype) * (log2(n) + 2).
"""

import math
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first `import triton`: @triton.jit picks the interpreter when it
    # decorates a kernel (the gloo workers import this module before running a case).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels import flash_attention  # noqa: E402
from kernels.flash_attention import (attention_delta, flash_attention_backward,  # noqa: E402
                                     flash_attention_forward)
from megalite.parallel import sequence  # noqa: E402
from megalite.parallel.sequence import (ring_attention, ring_block_kernel,  # noqa: E402
                                        shard_sequence)
from megalite.parallel.topology import Group, build_topology, destroy_topology  # noqa: E402
from tests.dist_harness import run_on_ranks  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
_BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 needs a GPU; the interpreter computes bf16 wrongly"))
DTYPES = [torch.float32, torch.float16, _BF16]
HEADS = [(4, 2), (2, 2)]  # (Hq, Hkv): GQA, MHA
DIM, CHUNK = 16, 16


def tolerance(dtype, n):
    return 4 * torch.finfo(dtype).eps * (math.log2(n) + 2)


def assert_close(got, want, tol, what):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3f}"


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def reference(q, k, v, visible):
    """float64 (out, lse) of q to k/v where visible[i, j] says query i sees key j."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~visible, float("-inf"))
    lse = s.logsumexp(-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v, lse


# ---- the block kernel alone -------------------------------------------------------------

@pytest.mark.parametrize("heads", HEADS, ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_kernel_forward_and_merged_backward(dtype, heads):
    hq, hkv = heads
    c, past = 24, 40  # queries = diagonal keys; a full block of 40 earlier keys
    q = randn(1, hq, c, DIM, dtype=dtype, seed=1)
    k_full = randn(1, past, hkv, DIM, dtype=dtype, seed=2).transpose(1, 2)  # strided
    v_full = randn(1, hkv, past, DIM, dtype=dtype, seed=3)
    k_diag, v_diag = (randn(1, hkv, c, DIM, dtype=dtype, seed=s) for s in (4, 5))
    do = randn(1, hq, c, DIM, dtype=dtype, seed=6)
    causal_mask = torch.ones(c, c, dtype=torch.bool, device=DEVICE).tril()
    full_mask = torch.ones(c, past, dtype=torch.bool, device=DEVICE)

    blocks = []
    for k, v, causal, mask in ((k_full, v_full, False, full_mask),
                               (k_diag, v_diag, True, causal_mask)):
        out, lse = flash_attention_forward(q, k, v, causal=causal)
        assert out.dtype == dtype and lse.dtype == torch.float32
        want_out, want_lse = reference(q, k, v, mask)
        tol = tolerance(dtype, k.shape[2])
        assert_close(out, want_out, tol, f"causal={causal} out")
        assert_close(lse, want_lse, tolerance(torch.float32, k.shape[2]), f"causal={causal} lse")
        blocks.append((out.double(), lse.double()))

    n = past + c
    tol = tolerance(dtype, n)
    keys, values = (torch.cat(t, dim=2).double().requires_grad_()
                    for t in ((k_full, k_diag), (v_full, v_diag)))
    q64 = q.double().requires_grad_()
    merged_out, merged_lse = reference(q64, keys, values, torch.cat([full_mask, causal_mask], 1))
    merged_out.backward(do.double())
    (out_a, lse_a), (out_b, lse_b) = blocks
    lse = torch.logaddexp(lse_a, lse_b)
    merged = sum(out * torch.exp(part - lse).unsqueeze(-1)
                 for out, part in ((out_a, lse_a), (out_b, lse_b)))
    assert_close(merged, merged_out.detach(), tol, "merged out")

    out_m, lse_m = merged_out.detach().to(dtype), merged_lse.detach().float()
    fresh = [flash_attention_backward(do, q, k, v, out_m, lse_m, causal=causal)
             for k, v, causal in ((k_full, v_full, False), (k_diag, v_diag, True))]
    assert all(g.dtype == dtype for grads in fresh for g in grads)
    assert_close(fresh[0][0].double() + fresh[1][0].double(), q64.grad, tol, "dq (fresh)")
    assert_close(torch.cat([fresh[0][1], fresh[1][1]], 2), keys.grad, tol, "dk (fresh)")
    assert_close(torch.cat([fresh[0][2], fresh[1][2]], 2), values.grad, tol, "dv (fresh)")

    # The ring's way: delta once, every block adding into the same fp32 sums, in place
    # (the dk/dv targets are strided views of one buffer).
    delta = attention_delta(do, out_m)
    dq = torch.zeros(q.shape, device=DEVICE)
    dk, dv = (torch.zeros(keys.shape, device=DEVICE) for _ in range(2))
    for k, v, causal, part in ((k_full, v_full, False, 0), (k_diag, v_diag, True, 1)):
        dk_part, dv_part = (t.split([past, c], dim=2)[part] for t in (dk, dv))
        got = flash_attention_backward(do, q, k, v, None, lse_m, causal=causal, delta=delta,
                                       grads=(dq, dk_part, dv_part))
        assert got[0] is dq and got[1] is dk_part
    assert_close(dq, q64.grad, tol, "dq (accumulated)")
    assert_close(dk, keys.grad, tol, "dk (accumulated)")
    assert_close(dv, values.grad, tol, "dv (accumulated)")


def test_block_kernel_rejects_a_causal_block_that_is_not_square():
    q, k = randn(1, 2, 16, DIM), randn(1, 2, 24, DIM)
    with pytest.raises(ValueError, match="as many keys as queries"):
        flash_attention_forward(q, k, k, causal=True)


# ---- ring attention on the flash blocks ---------------------------------------------------

def _full_inputs(hq, hkv, seq_len, dtype, seed):
    q = randn(1, hq, seq_len, DIM, dtype=dtype, seed=seed)
    k, v = (randn(1, hkv, seq_len, DIM, dtype=dtype, seed=seed + i) for i in (1, 2))
    return q, k, v, randn(1, hq, seq_len, DIM, dtype=dtype, seed=seed + 3)


def _ring_errors(group, hq, hkv, dtype, seed):
    """Relative errors and kernel calls of this rank's flash ring against float64."""
    sp, seq_len = group.size, 2 * group.size * CHUNK
    q, k, v, grad_out = _full_inputs(hq, hkv, seq_len, dtype, seed)
    full = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference(*full, torch.ones(seq_len, seq_len, dtype=torch.bool,
                                       device=DEVICE).tril())[0]
    want.backward(grad_out.double())

    def shard(t):
        return shard_sequence(t, sp, group.rank, "ring", dim=2)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    calls = {"forward": [], "backward": []}
    originals = (flash_attention.flash_attention_forward, flash_attention.flash_attention_backward)

    def counted(name, fn):
        def wrapper(*args, causal, **kwargs):
            calls[name].append(causal)
            return fn(*args, causal=causal, **kwargs)
        return wrapper

    flash_attention.flash_attention_forward = counted("forward", originals[0])
    flash_attention.flash_attention_backward = counted("backward", originals[1])
    sequence.BLOCK_KERNEL = "flash"
    try:
        kind = ring_block_kernel(local[0])
        out = ring_attention(*local, group)
        out.backward(shard(grad_out))
    finally:
        sequence.BLOCK_KERNEL = "auto"
        (flash_attention.flash_attention_forward,
         flash_attention.flash_attention_backward) = originals
    errors = {"out": (out, shard(want.detach()))}
    errors.update({"d" + name: (loc.grad, shard(ref.grad))
                   for name, loc, ref in zip("qkv", local, full)})
    errors = {name: ((got.double() - ref).abs().max() / ref.abs().max()).item()
              for name, (got, ref) in errors.items()}
    return {"kind": kind, "errors": errors, "calls": calls, "dtype": out.dtype}


def _check_ring(result, sp, dtype):
    assert result["kind"] == "flash"
    assert result["dtype"] == dtype
    # step 0: the two diagonal blocks and one full block; every later step: two full
    # blocks, in forward and again in backward
    for name in ("forward", "backward"):
        assert sorted(result["calls"][name]) == [False] * (2 * sp - 1) + [True] * 2, result
    tol = tolerance(dtype, 2 * sp * CHUNK)
    for name, err in result["errors"].items():
        assert err <= tol, f"sp={sp} {dtype}: {name} differs by {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_rank_ring_on_flash_blocks_matches_float64(dtype):
    """The ring's block loop, merge and backward without communication; on a GPU this
    is the real kernel (bf16 included)."""
    solo = Group("sp", (0,), 0)
    _check_ring(_ring_errors(solo, 4, 2, dtype, seed=10), 1, dtype)
    assert solo.bytes["p2p"] == 0


def test_ring_block_kernel_choice():
    q = torch.zeros(1, 2, 32, DIM)
    assert ring_block_kernel(q) == "eager"  # the CPU default: the fp32 reference
    if CUDA:
        assert ring_block_kernel(q.cuda()) == "flash"
    try:
        sequence.BLOCK_KERNEL = "flash"
        assert ring_block_kernel(q) == "flash"
        assert ring_block_kernel(q.double()) == "eager"  # no fp64 kernel
        assert ring_block_kernel(torch.zeros(1, 2, 32, 96)) == "eager"  # head dim 96
        sequence.BLOCK_KERNEL = "eager"
        assert ring_block_kernel(q.to(DEVICE)) == "eager"
        sequence.BLOCK_KERNEL = "fast"
        with pytest.raises(ValueError, match="auto, flash or eager"):
            ring_block_kernel(q)
    finally:
        sequence.BLOCK_KERNEL = "auto"


def _ring_on_ranks(sp):
    topo = build_topology(sp=sp, timeout_s=60)
    if topo is None:
        return None
    try:
        return _ring_errors(topo.sp_group, 4, 2, torch.float32, seed=20 + sp)
    finally:
        destroy_topology(topo)


@pytest.mark.skipif(CUDA, reason="gloo ranks run on CPU tensors, which need the interpreter; "
                                 "on a GPU the one-rank case runs the kernel")
@pytest.mark.parametrize("sp", [2, 4])
def test_ring_on_flash_blocks_over_ranks_matches_float64(sp):
    results = [r for r in run_on_ranks(_ring_on_ranks, sp) if r is not None]
    assert len(results) == sp
    for result in results:
        _check_ring(result, sp, torch.float32)
