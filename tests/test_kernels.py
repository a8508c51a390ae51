"""Triton kernels against the torch reference: forward, backward, determinism.

Without CUDA the kernels run in the Triton interpreter (numpy on CPU), which is slow
and computes bf16 wrongly, so the CPU suite uses small odd shapes in fp32 and fp16;
with CUDA the same tests also run in bf16 and at realistic sizes.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first `import triton` / kernel module: @triton.jit picks the
    # interpreter when it decorates a kernel.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import get_ops, reference  # noqa: E402
from kernels.adamw import adamw_step_reference  # noqa: E402
from kernels.cross_entropy import shard_grad, shard_stats  # noqa: E402
from megalite.parallel import comm  # noqa: E402
from megalite.parallel.comm import Group  # noqa: E402

ops = get_ops("triton")
DEVICE = "cuda" if CUDA else "cpu"

# Kernel output vs the reference evaluated in fp32 on the same (rounded) inputs.
# fp32: same formulas in a different summation order, plus GPU exp/rsqrt that are a
# few ulps off -> a few 1e-6 relative. fp16 (10-bit mantissa, ulp 1e-3 at 1): one
# rounding of the output plus a 16-bit operand in the attention matmuls. bf16 (7-bit
# mantissa, ulp 8e-3 at 1): the same, eight times coarser.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}
# Attention sums S products of rounded probabilities and values (dV, dK): a wider
# absolute slack in the 16-bit types.
ATTENTION_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=5e-2),
}

_BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 needs a GPU; the interpreter computes bf16 wrongly"))
DTYPES = [torch.float32, torch.float16, _BF16]

# Odd sizes that are not multiples of any block; larger on a GPU.
ROWS, HIDDEN = (4099, 4096 + 96) if CUDA else (37, 48)
VOCAB = 32003 if CUDA else 100
SEQ = 1000 if CUDA else 19
HEAD_DIMS = [64, 128] if CUDA else [16]


def close(actual, expected, tol):
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_op_table_matches_reference():
    for name in ("rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "cross_entropy",
                 "attention"):
        assert callable(getattr(ops, name)), name
    assert callable(ops.adamw_step)


# ---- norms ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    # A column slice: rows are strided, the kernel must not assume contiguity.
    x = leaf(randn(ROWS, HIDDEN + 5, dtype=dtype)[:, :HIDDEN])
    w = leaf(randn(HIDDEN) + 1)
    y = ops.rms_norm(x, w, 1e-5)
    dy = randn(*y.shape, dtype=dtype)
    dx, dw = grads(y, (x, w), dy)
    xr, wr = leaf(x, torch.float32), leaf(w)
    yr = reference.rms_norm(xr, wr, 1e-5)
    dxr, dwr = grads(yr, (xr, wr), dy.float())
    close(y, yr, TOL[dtype])
    close(dx, dxr, TOL[dtype])
    close(dw, dwr, TOL[dtype])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype, with_bias):
    x = leaf(randn(3, ROWS // 3, HIDDEN, dtype=dtype, scale=2.0) + 0.5)
    w = leaf(randn(HIDDEN) + 1)
    b = leaf(randn(HIDDEN)) if with_bias else None
    inputs = (x, w, b) if with_bias else (x, w)
    y = ops.layer_norm(x, w, b, 1e-5)
    dy = randn(*y.shape, dtype=dtype)
    got = grads(y, inputs, dy)
    ref_inputs = tuple(leaf(t, torch.float32) for t in inputs)
    yr = reference.layer_norm(ref_inputs[0], ref_inputs[1],
                              ref_inputs[2] if with_bias else None, 1e-5)
    want = grads(yr, ref_inputs, dy.float())
    close(y, yr, TOL[dtype])
    for g, r in zip(got, want):
        close(g, r, TOL[dtype])


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_backward_is_deterministic(op):
    x, w, b = leaf(randn(ROWS, HIDDEN)), leaf(randn(HIDDEN)), leaf(randn(HIDDEN))
    dy = randn(ROWS, HIDDEN)

    def run():
        y = ops.rms_norm(x, w, 1e-6) if op == "rms_norm" else ops.layer_norm(x, w, b, 1e-6)
        return grads(y, (x, w) if op == "rms_norm" else (x, w, b), dy)

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


# ---- rotary -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype):
    dim = HEAD_DIMS[-1]
    # q in [B, S, H, D] memory order seen as [B, H, S, D]; k contiguous with fewer heads.
    q = leaf(randn(2, SEQ, 4, dim, dtype=dtype).transpose(1, 2))
    k = leaf(randn(2, 2, SEQ, dim, dtype=dtype))
    # Independent values in both halves so a cos/sin half mix-up would show.
    angles = randn(SEQ, dim)
    cos, sin = angles.cos(), angles.sin()
    qo, ko = ops.rotary(q, k, cos, sin)
    gq, gk = randn(*qo.shape, dtype=dtype), randn(*ko.shape, dtype=dtype)
    dq, dk = grads((qo, ko), (q, k), (gq, gk))
    qr, kr = leaf(q, torch.float32), leaf(k, torch.float32)
    qor, kor = reference.rotary(qr, kr, cos, sin)
    dqr, dkr = grads((qor, kor), (qr, kr), (gq.float(), gk.float()))
    for got, want in ((qo, qor), (ko, kor), (dq, dqr), (dk, dkr)):
        close(got, want, TOL[dtype])


def test_rotary_gradient_when_only_q_is_used():
    q, k = leaf(randn(1, 2, 5, 16)), leaf(randn(1, 1, 5, 16))
    angles = randn(5, 16)
    (dq,) = grads(ops.rotary(q, k, angles.cos(), angles.sin())[0].sum(), (q,), None)
    qr = leaf(q)
    (dqr,) = grads(reference.rotary(qr, k.detach(), angles.cos(), angles.sin())[0].sum(),
                   (qr,), None)
    close(dq, dqr, TOL[torch.float32])


# ---- activations ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    ffn = HIDDEN + 11
    # gate and up as the two halves of one fused projection output (strided rows).
    fused = leaf(randn(3, ROWS // 3, 2 * ffn, dtype=dtype, scale=3.0))
    y = ops.swiglu(fused[..., :ffn], fused[..., ffn:])
    dy = randn(*y.shape, dtype=dtype)
    (d,) = grads(y, fused, dy)
    fr = leaf(fused, torch.float32)
    yr = reference.swiglu(fr[..., :ffn], fr[..., ffn:])
    (dr,) = grads(yr, fr, dy.float())
    close(y, yr, TOL[dtype])
    close(d, dr, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype):
    x = leaf(randn(ROWS, HIDDEN + 3, dtype=dtype, scale=4.0))
    y = ops.gelu(x)
    dy = randn(*y.shape, dtype=dtype)
    (dx,) = grads(y, x, dy)
    xr = leaf(x, torch.float32)
    yr = reference.gelu(xr)
    (dxr,) = grads(yr, xr, dy.float())
    close(y, yr, TOL[dtype])
    close(dx, dxr, TOL[dtype])


# ---- cross-entropy ----------------------------------------------------------------

def ce_reference(logits, targets, z_loss=0.0):
    loss = F.cross_entropy(logits, targets)
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)[targets != -100]
        loss = loss + z_loss * lse.pow(2).mean()
    return loss


def ce_inputs(dtype, n=ROWS, v=VOCAB):
    logits = leaf(randn(n, v, dtype=dtype, scale=3.0))
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[::7] = -100
    return logits, targets


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype, z_loss):
    logits, targets = ce_inputs(dtype)
    # chunk_size below N: the rows go through in several launches.
    loss = ops.vocab_parallel_cross_entropy(logits, targets, z_loss=z_loss, chunk_size=8)
    # Upstream gradient n_valid: per-token gradients of order 1, so the tolerances bite
    # (it also checks that backward scales by grad_output).
    n_valid = (targets != -100).sum().float()
    (dlogits,) = grads(loss * n_valid, logits, None)
    lr = leaf(logits, torch.float32)
    loss_ref = ce_reference(lr, targets, z_loss)
    (dref,) = grads(loss_ref * n_valid, lr, None)
    assert loss.dtype == torch.float32 and dlogits.dtype == dtype
    close(loss, loss_ref, TOL[torch.float32])
    close(dlogits, dref, TOL[dtype])
    assert torch.all(dlogits[::7] == 0)


def test_cross_entropy_op_table_default_matches_torch():
    logits, targets = ce_inputs(torch.float32)
    close(ops.cross_entropy(logits, targets), reference.cross_entropy(logits, targets),
          TOL[torch.float32])


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_vocab_parallel_two_simulated_shards(z_loss):
    logits, targets = ce_inputs(torch.float32)
    split = VOCAB // 2 - 3
    shards = [(logits[:, :split], 0), (logits[:, split:], split)]
    # What each rank computes alone ...
    stats = [shard_stats(shard.detach(), targets, start) for shard, start in shards]
    # ... and what the two all-reduces (MAX, then SUM) would give every rank.
    global_max = torch.maximum(stats[0][0], stats[1][0])
    sum_exp = sum(s[1] * torch.exp(s[0] - global_max) for s in stats)
    target_logit = stats[0][2] + stats[1][2]
    lse = global_max + torch.log(sum_exp)
    valid = targets != -100
    n_valid = valid.sum().float()
    loss = ((lse - target_logit + z_loss * lse * lse) * valid).sum() / n_valid
    grad = torch.cat([shard_grad(shard.detach(), targets, lse, n_valid, start, z_loss)
                      for shard, start in shards], dim=1)
    lr = leaf(logits)
    loss_ref = ce_reference(lr, targets, z_loss)
    (grad_ref,) = grads(loss_ref, lr, None)
    close(lse, torch.logsumexp(logits.detach(), -1), TOL[torch.float32])
    close(loss, loss_ref, TOL[torch.float32])
    close(grad * n_valid, grad_ref * n_valid, TOL[torch.float32])  # per-token scale
    # A shard that does not hold a row's target adds 0 to that row's target logit.
    assert torch.all(stats[1][2][valid & (targets < split)] == 0)


def _vocab_parallel_worker(rank, world, init_file, logits, targets, bounds, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        lo, hi = bounds[rank], bounds[rank + 1]
        shard = logits[:, lo:hi].to(DEVICE).requires_grad_()
        group = Group("tp", (0, 1), rank, dist.group.WORLD, shard.device)
        loss = ops.vocab_parallel_cross_entropy(
            shard, targets.to(DEVICE), lo, lambda x, op: comm.all_reduce(x, group, op),
            z_loss=1e-3)
        (grad,) = grads(loss, shard, None)
        results.put((rank, loss.item(), grad.cpu().tolist()))
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_over_a_real_two_rank_group(tmp_path):
    # The all-reduce path of combine_shard_stats, on gloo with two processes.
    logits, targets = ce_inputs(torch.float32, n=13, v=70)
    logits, targets = logits.detach().cpu(), targets.cpu()
    bounds = [0, 33, 70]
    results = mp.get_context("spawn").SimpleQueue()
    workers = mp.spawn(_vocab_parallel_worker, nprocs=2, join=False,
                       args=(2, str(tmp_path / "init"), logits, targets, bounds, results))
    outputs = dict((rank, (loss, grad)) for rank, loss, grad in
                   (results.get() for _ in range(2)))
    workers.join()
    lr = leaf(logits)
    loss_ref = ce_reference(lr, targets, 1e-3)
    (grad_ref,) = grads(loss_ref, lr, None)
    n_valid = (targets != -100).sum()
    for rank in range(2):
        loss, grad = outputs[rank]
        close(torch.tensor(loss), loss_ref, TOL[torch.float32])
        close(torch.tensor(grad) * n_valid, grad_ref[:, bounds[rank]:bounds[rank + 1]] * n_valid,
              TOL[torch.float32])


def test_cross_entropy_backward_is_deterministic():
    logits, targets = ce_inputs(torch.float32)

    def run():
        return grads(ops.cross_entropy(logits, targets, z_loss=1e-4), logits, None)[0]

    assert torch.equal(run(), run())


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_cross_entropy_all_targets_ignored_is_nan_like_torch():
    logits, targets = ce_inputs(torch.float32, n=5)
    targets.fill_(-100)
    loss = ops.cross_entropy(logits, targets)
    assert torch.isnan(loss) and torch.isnan(reference.cross_entropy(logits, targets))


# ---- flash attention --------------------------------------------------------------

def attention_case(dtype, hq, hkv, seq, dim):
    q = leaf(randn(2, hq, seq, dim, dtype=dtype))
    # k in [B, S, H, D] memory order, v sliced from a wider buffer: strided inputs.
    k = leaf(randn(2, seq, hkv, dim, dtype=dtype).transpose(1, 2))
    v = leaf(randn(2, hkv, seq, dim + 16, dtype=dtype)[..., :dim])
    out = ops.attention(q, k, v)
    dout = randn(*out.shape, dtype=dtype)
    got = (out,) + grads(out, (q, k, v), dout)
    refs = [leaf(t, torch.float32) for t in (q, k, v)]
    out_ref = reference.attention(*refs)
    want = (out_ref,) + grads(out_ref, refs, dout.float())
    for g, w in zip(got, want):
        close(g, w, ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(dtype, heads, dim):
    attention_case(dtype, *heads, SEQ, dim)


@pytest.mark.parametrize("seq", [1, 40] if not CUDA else [1, 4097])
def test_attention_sequence_edges(seq):
    # One token, and several query/key blocks (unmasked blocks below the diagonal).
    attention_case(torch.float32, 4, 1, seq, 32)


def test_attention_backward_is_deterministic():
    q, k, v = (leaf(randn(1, h, SEQ, HEAD_DIMS[0])) for h in (4, 2, 2))
    dout = randn(1, 4, SEQ, HEAD_DIMS[0])

    def run():
        return grads(ops.attention(q, k, v), (q, k, v), dout)

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


# ---- AdamW ------------------------------------------------------------------------

def test_adamw_matches_torch_optim():
    n = 3000 if not CUDA else 1_000_003  # not a multiple of the block
    start = randn(n)
    param = torch.nn.Parameter(start.clone())
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer = torch.optim.AdamW([param], **hyper, foreach=False)
    fused = [start.clone(), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    ref = [start.clone(), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    for step in range(1, 4):
        grad = randn(n)
        param.grad = grad.clone()
        optimizer.step()
        ops.adamw_step(fused[0], grad, fused[1], fused[2], 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        adamw_step_reference(ref[0], grad, ref[1], ref[2], 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        state = optimizer.state[param]
        for got in (fused, ref):
            torch.testing.assert_close(got[0], param.detach(), atol=1e-6, rtol=0)
            torch.testing.assert_close(got[1], state["exp_avg"], atol=1e-6, rtol=0)
            torch.testing.assert_close(got[2], state["exp_avg_sq"], atol=1e-6, rtol=0)
