"""Cross-entropy over [N, V] logits in Triton, written for a vocab-parallel head.

The loss of a row is  lse - logit[target] (+ z_loss * lse^2),  lse = log sum_v exp(logit_v).
It is computed from three per-row pieces that each vocab shard can produce alone:

    shard_stats(logits_shard, targets, vocab_start, vocab_size=V)
        -> (max, sum_exp, target_logit)

max is the shard's largest logit, sum_exp = sum exp(logit - max) over the shard, and
target_logit is the target's logit when the target falls in this shard, else 0.
Shards combine them with two all-reduces over the tensor-parallel group (a MAX,
then a SUM of the rescaled sum_exp stacked with target_logit); see
`combine_shard_stats`. The caller hands in the all-reduce, `all_reduce(tensor, op)`
with op "max" or "sum", in place (megalite's `comm.all_reduce` bound to a group), so
kernels stay standalone ops that call no collective library themselves. Each shard
then writes its own slice of the gradient with `shard_grad`, which needs only the
global lse.

Padding: megalite's vocab-parallel head pads the vocabulary to a multiple of
tp * pad_multiple, so the last rank(s) hold columns whose global id is >= the real
vocabulary size. `vocab_size` (keyword, global; None = no padding) names that size:
columns with vocab_start + j >= vocab_size are never read, so they are out of the max
and the sum-exp whatever they hold, and their gradient is exactly 0. A shard made only
of padding gives max = -inf, sum_exp = 0 and target_logit = 0, which add nothing when
combined. A target that is itself a padding id gets target_logit -inf (an infinite loss,
as in the torch path) rather than a silently wrong finite one.

The forward pass writes the gradient (logits dtype) and the backward only scales it
by grad_output, so the logits are read twice and the gradient written once, and
nothing of size [N, V] in fp32 ever exists: the kernels stream each row through
registers in blocks of the vocabulary with an online max / sum-exp. Rows go through
in chunks of `chunk_size` tokens, which keeps every in-kernel offset small (a
16k x 128k logits tensor has 2^31 elements) and bounds one launch. The count of valid
tokens stays a device tensor: nothing here waits for the device.

Targets equal to `ignore_index` add nothing to the loss or the gradient, and the mean
is over the remaining tokens, as in torch.nn.functional.cross_entropy.
"""

import torch
import triton
import triton.language as tl

from kernels._util import configs_for_device

DEFAULT_CHUNK_SIZE = 8192

_CONFIGS = configs_for_device(
    [triton.Config({"BLOCK_V": 2048}, num_warps=8),
     triton.Config({"BLOCK_V": 4096}, num_warps=8),
     triton.Config({"BLOCK_V": 8192}, num_warps=16)],
    # Small blocks in the interpreter so the tests walk several vocabulary blocks.
    triton.Config({"BLOCK_V": 32}, num_warps=4))


@triton.autotune(configs=_CONFIGS, key=["V"])
@triton.jit
def _shard_stats_kernel(LOGITS, TARGETS, MAX, SUM_EXP, TARGET_LOGIT, stride_row, V,
                        V_REAL, vocab_start, BLOCK_V: tl.constexpr):
    # V_REAL <= V columns of the shard are real vocabulary; the rest are padding and
    # are not even loaded. With V_REAL = 0 the loop is empty: max -inf, sum_exp 0.
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m = float("-inf")
    s = 0.0
    for start in range(0, V_REAL, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V_REAL, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    local = tl.load(TARGETS + row) - vocab_start
    in_shard = (local >= 0) & (local < V)
    target_logit = tl.load(base + local, mask=in_shard & (local < V_REAL),
                           other=0.0).to(tl.float32)
    target_logit = tl.where(in_shard & (local >= V_REAL), float("-inf"), target_logit)
    tl.store(MAX + row, m)
    tl.store(SUM_EXP + row, s)
    tl.store(TARGET_LOGIT + row, target_logit)


@triton.autotune(configs=_CONFIGS, key=["V"])
@triton.jit
def _shard_grad_kernel(LOGITS, GRAD, TARGETS, LSE, N_VALID, stride_row, stride_grad, V,
                       V_REAL, vocab_start, ignore_index, z_loss, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    z_loss = tl.cast(z_loss, tl.float32)
    # The mean over valid tokens is folded in here; backward scales by grad_output.
    scale = tl.where(target != ignore_index, 1.0 / tl.load(N_VALID), 0.0)
    # d(lse)/dlogit = softmax, so z_loss * lse^2 adds 2 * z_loss * lse * softmax.
    softmax_scale = scale * (1.0 + 2.0 * z_loss * lse)
    local = target - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        real = cols < V_REAL
        x = tl.load(LOGITS + row * stride_row + cols, mask=real, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * softmax_scale - tl.where(cols == local, scale, 0.0)
        # Padding columns are outside the softmax: exactly 0, not exp(pad - lse).
        g = tl.where(real, g, 0.0)
        tl.store(GRAD + row * stride_grad + cols, g.to(GRAD.dtype.element_ty),
                 mask=cols < V)


def _chunks(n, chunk_size):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _unit_stride_rows(logits):
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _real_columns(v_shard, vocab_start, vocab_size):
    """How many leading columns of a shard are real vocabulary (the rest is padding)."""
    if vocab_size is None:
        return v_shard
    if vocab_size < 1 or vocab_start < 0:
        raise ValueError(f"cross_entropy needs vocab_size >= 1 and vocab_start >= 0, got "
                         f"vocab_size={vocab_size}, vocab_start={vocab_start}")
    return min(v_shard, max(vocab_size - vocab_start, 0))


def shard_stats(logits_shard, targets, vocab_start=0, chunk_size=DEFAULT_CHUNK_SIZE, *,
                vocab_size=None):
    """Per-row (max, sum_exp relative to max, target logit or 0), each [N] fp32.

    Columns whose global id vocab_start + j is >= vocab_size are padding and left out.
    """
    logits_shard, targets = _unit_stride_rows(logits_shard), targets.contiguous()
    n, v = logits_shard.shape
    v_real = _real_columns(v, vocab_start, vocab_size)
    stats = torch.empty((3, n), dtype=torch.float32, device=logits_shard.device)
    for lo, hi in _chunks(n, chunk_size):
        _shard_stats_kernel[(hi - lo,)](
            logits_shard[lo:hi], targets[lo:hi], stats[0, lo:hi], stats[1, lo:hi],
            stats[2, lo:hi], logits_shard.stride(0), v, v_real, vocab_start)
    return stats[0], stats[1], stats[2]


def combine_shard_stats(shard_max, shard_sum_exp, target_logit, all_reduce=None):
    """Global (lse, target logit) per row: the two all-reduces of a vocab-parallel loss.

    With all_reduce=None the tensors already cover the whole vocabulary.
    """
    if all_reduce is None:
        return shard_max + torch.log(shard_sum_exp), target_logit
    global_max = shard_max.clone()
    all_reduce(global_max, "max")
    # A shard of only padding (max -inf, sum 0) adds 0. Said explicitly, because where
    # every shard of a row is -inf, exp(-inf - -inf) is NaN and 0 * NaN stays NaN.
    rescaled = torch.where(shard_max == float("-inf"), 0.0,
                           shard_sum_exp * torch.exp(shard_max - global_max))
    sums = torch.stack([rescaled, target_logit])
    all_reduce(sums, "sum")
    return global_max + torch.log(sums[0]), sums[1]


def shard_grad(logits_shard, targets, lse, n_valid, vocab_start=0, z_loss=0.0,
               ignore_index=-100, chunk_size=DEFAULT_CHUNK_SIZE, *, vocab_size=None):
    """d(mean loss)/d(logits_shard) given the global lse; n_valid is a 1-element tensor.

    Padding columns (global id >= vocab_size) get exactly 0.
    """
    logits_shard, targets = _unit_stride_rows(logits_shard), targets.contiguous()
    lse = lse.contiguous()
    n, v = logits_shard.shape
    v_real = _real_columns(v, vocab_start, vocab_size)
    grad = torch.empty((n, v), dtype=logits_shard.dtype, device=logits_shard.device)
    n_valid = n_valid.reshape(1).to(torch.float32)
    for lo, hi in _chunks(n, chunk_size):
        _shard_grad_kernel[(hi - lo,)](
            logits_shard[lo:hi], grad[lo:hi], targets[lo:hi], lse[lo:hi], n_valid,
            logits_shard.stride(0), grad.stride(0), v, v_real, vocab_start, ignore_index,
            float(z_loss))
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, all_reduce, z_loss,
                ignore_index, chunk_size):
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"cross_entropy needs logits [N, V] and targets [N], got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        valid = targets != ignore_index
        n_valid = valid.sum().to(torch.float32)
        shard_max, sum_exp, target_logit = shard_stats(
            logits, targets, vocab_start, chunk_size, vocab_size=vocab_size)
        lse, target_logit = combine_shard_stats(shard_max, sum_exp, target_logit, all_reduce)
        row_loss = lse - target_logit
        if z_loss:
            row_loss = row_loss + z_loss * lse * lse
        loss = torch.where(valid, row_loss, 0.0).sum() / n_valid
        grad = shard_grad(logits, targets, lse, n_valid, vocab_start, z_loss, ignore_index,
                          chunk_size, vocab_size=vocab_size)
        ctx.save_for_backward(grad)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("the Triton cross_entropy scales its saved gradient in "
                               "place, so its backward can run once per forward; run the "
                               "forward again instead of backward(retain_graph=True)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        # In place: a second [N, V] buffer would raise the peak memory of the head.
        return grad.mul_(grad_loss), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, targets, vocab_start=0, all_reduce=None,
                                 z_loss=0.0, ignore_index=-100,
                                 chunk_size=DEFAULT_CHUNK_SIZE, *, vocab_size=None):
    """Mean cross-entropy (fp32) of logits split along the vocabulary over the ranks
    that `all_reduce(tensor, op)` sums over (see the module docstring).

    logits_shard [N, V_shard] holds global vocabulary ids vocab_start ..
    vocab_start + V_shard - 1; ids >= vocab_size (the global count of real ids; None:
    every column is real) are padding, left out of the softmax, gradient 0. targets [N]
    are global ids. Every rank of the group returns the same loss and the gradient of
    its own shard.
    """
    vocab_size = None if vocab_size is None else int(vocab_size)
    return CrossEntropyFunction.apply(logits_shard, targets, int(vocab_start), vocab_size,
                                      all_reduce, float(z_loss), int(ignore_index),
                                      int(chunk_size))
