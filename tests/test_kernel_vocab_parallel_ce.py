"""The Triton vocab-parallel cross-entropy over a padded vocabulary, against float64 torch.

megalite's vocab-parallel head pads the vocabulary to a multiple of tp * pad_multiple,
so the last rank(s) hold columns whose id is >= vocab_size, and a rank may hold only
such columns. Here the shards of one padded [N, V_padded] problem run in one process:
`LockStep` is an `all_reduce(tensor, op)` over the list of shards, and every shard runs
the real `vocab_parallel_cross_entropy` (forward and backward) with it. The reference
is F.cross_entropy in float64 on the unpadded logits (the same rounded values), and the
padding columns hold NaN, so any use of them shows.

Without CUDA the kernels run in the Triton interpreter, which computes bf16 wrongly:
fp32 and fp16 only there, at small sizes.
"""

import itertools
import math
import os
import traceback
import warnings

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first `import triton` / kernel module: @triton.jit picks the
    # interpreter when it decorates a kernel.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.cross_entropy import (combine_shard_stats, shard_grad, shard_stats,  # noqa: E402
                                   vocab_parallel_cross_entropy)

DEVICE = "cuda" if CUDA else "cpu"
VOCAB, ROWS, IGNORE = (32003, 1024, -100) if CUDA else (100, 16, -100)
# (tp, pad multiple), the second with a shard of only padding. CPU: 100 -> 128 in two
# shards of 64 (the second 36 real + 28 padding), 100 -> 160 in four shards of 40 (the
# third 20 real + 20 padding, the fourth only padding). GPU: 32003 -> 32256 and 49152.
LAYOUTS = [(2, 128), (4, 12288)] if CUDA else [(2, 64), (4, 40)]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
Z_LOSS = 1e-2

EPS32 = torch.finfo(torch.float32).eps


def padded_vocab(vocab, tp, multiple):
    return -(-vocab // (tp * multiple)) * (tp * multiple)


def lse_error(real_logits):
    """A bound on the fp32 error of one log-sum-exp, so also of a row's loss and (as a
    relative error) of a softmax value: exp's argument error grows with the spread of
    the logits, the sum's rounding with log2 of the terms summed; a few ulps of each."""
    spread = 2 * real_logits.abs().max().item()
    return 8 * EPS32 * (spread + math.log2(real_logits.shape[1]))


def grad_tol(dtype, real_logits, n_valid):
    """Tolerance on n_valid * gradient (entries of order 1): the fp32 error, plus for
    16-bit types two roundings to `dtype` (forward stores the gradient, backward scales
    it in place: half an ulp each) and, times n_valid, the spacing of the subnormals
    that small softmax values / n_valid fall into (fp16: 2^-24)."""
    err = lse_error(real_logits)
    if dtype == torch.float32:
        return dict(atol=err, rtol=err)
    info = torch.finfo(dtype)
    return dict(atol=err + n_valid * info.smallest_normal * info.eps, rtol=err + info.eps)


class LockStep:
    """`for_rank(r)` gives shard r an all_reduce over all `ranks` shards of one process.

    The shards run one after the other, so a collective's result exists only once every
    shard has reached it: `run` repeats the whole computation of every shard until each
    of its collectives has been reduced (one more pass per collective). In a pass, the
    first collective without a result records this shard's input and leaves the tensor
    as it was; the later ones record nothing (their inputs would come from a wrong
    value), and what the shard computes in that pass is thrown away.
    """

    REDUCE = {"sum": lambda ts: torch.stack(ts).sum(0),
              "max": lambda ts: torch.stack(ts).amax(0)}

    def __init__(self, ranks):
        self.ranks = ranks
        self.inputs, self.results = {}, {}

    def for_rank(self, rank):
        calls = itertools.count()

        def all_reduce(x, op):
            call = next(calls)
            if call in self.results:
                return x.copy_(self.results[call])
            if self.pending_rank == rank:  # an earlier collective of this pass is waiting
                return x
            self.pending, self.pending_rank = True, rank
            contributed = self.inputs.setdefault(call, {})
            contributed[rank] = (op, x.clone())
            if len(contributed) == self.ranks:
                ops = {o for o, _ in contributed.values()}
                assert len(ops) == 1, f"collective {call}: shards disagree on the op {ops}"
                reduce = self.REDUCE[ops.pop()]
                self.results[call] = reduce([t for _, t in contributed.values()])
            return x
        return all_reduce

    def run(self, per_rank):
        """per_rank(rank, all_reduce) for every rank, until no collective is left pending."""
        for _ in range(8):
            self.pending, self.pending_rank = False, None
            # A thrown-away pass may compute with -inf (an unreduced max): its warnings
            # go with it; the last pass's are raised again.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs = [per_rank(r, self.for_rank(r)) for r in range(self.ranks)]
            if not self.pending:
                for w in caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                return outputs
        raise AssertionError("the shards never finished their collectives")


def case(dtype, tp, multiple, rows=ROWS, vocab=VOCAB):
    """Padded logits (padding NaN), targets with some ignored rows, and the shards."""
    padded = padded_vocab(vocab, tp, multiple)
    real = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    logits = torch.full((rows, padded), float("nan"), device=DEVICE, dtype=dtype)
    logits[:, :vocab] = real
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[::5] = IGNORE
    targets[1] = vocab - 1  # the last real id: on the shard where the padding starts
    width = padded // tp
    shards = [(logits[:, r * width:(r + 1) * width], r * width) for r in range(tp)]
    return real, targets, shards


def reference(real, targets, z_loss, ignore_index=IGNORE):
    """float64 loss and n_valid * d(loss)/d(real logits)."""
    x = real.detach().double().requires_grad_()
    loss = F.cross_entropy(x, targets, ignore_index=ignore_index)
    valid = targets != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1)[valid].pow(2).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad * valid.sum()


def run_shards(shards, targets, vocab, z_loss, ignore_index=IGNORE, chunk_size=8):
    """Every shard's (loss, gradient) from the autograd function, in lock-step."""
    def per_rank(rank, all_reduce):
        shard, start = shards[rank]
        leaf = shard.detach().requires_grad_()
        loss = vocab_parallel_cross_entropy(leaf, targets, start, all_reduce, z_loss,
                                            ignore_index, chunk_size, vocab_size=vocab)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss, grad
    return LockStep(len(shards)).run(per_rank)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("z_loss", [0.0, Z_LOSS])
@pytest.mark.parametrize("tp,multiple", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).split(".")[-1])
def test_padded_shards_match_torch_on_the_unpadded_vocabulary(dtype, tp, multiple, z_loss):
    real, targets, shards = case(dtype, tp, multiple)
    outputs = run_shards(shards, targets, VOCAB, z_loss)
    loss_ref, grad_ref = reference(real, targets, z_loss)
    n_valid = (targets != IGNORE).sum().item()
    grad = torch.cat([g for _, g in outputs], dim=1)
    err = lse_error(real)
    for loss, _ in outputs:  # every rank gets the same, global loss
        assert loss.dtype == torch.float32
        # Each row's lse, then the mean's sum of N row losses.
        torch.testing.assert_close(loss.double(), loss_ref, atol=2 * err, rtol=0)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad[:, :VOCAB].double() * n_valid, grad_ref,
                               **grad_tol(dtype, real, n_valid))
    assert torch.all(grad[:, VOCAB:] == 0), "padding columns must get exactly 0"
    assert torch.all(grad[targets == IGNORE] == 0), "ignored rows must get exactly 0"


def test_a_shard_of_only_padding_gives_neutral_stats_and_combines():
    # CPU: four shards of 40 over 100 real ids; the last holds ids 120..159, all padding.
    real, targets, shards = case(torch.float32, *LAYOUTS[1])
    assert shards[-1][1] >= VOCAB
    stats = [shard_stats(s, targets, start, vocab_size=VOCAB) for s, start in shards]
    pad_max, pad_sum, pad_target = stats[-1]
    assert torch.all(pad_max == float("-inf"))
    assert torch.all(pad_sum == 0) and torch.all(pad_target == 0)
    # combine_shard_stats with the all-reduce of the four shards, in lock-step.
    combined = LockStep(4).run(lambda r, all_reduce: combine_shard_stats(*stats[r], all_reduce))
    lse_ref = torch.logsumexp(real.double(), -1)
    valid = targets != IGNORE
    target_ref = real.double().gather(1, targets.clamp(min=0)[:, None])[:, 0] * valid
    for lse, target_logit in combined:
        assert not torch.isnan(lse).any()
        torch.testing.assert_close(lse.double(), lse_ref, atol=lse_error(real), rtol=0)
        torch.testing.assert_close(torch.where(valid, target_logit, 0).double(), target_ref)
    lse = combined[0][0]
    n_valid = valid.sum().float()
    grad = shard_grad(shards[-1][0], targets, lse, n_valid, shards[-1][1], Z_LOSS,
                      vocab_size=VOCAB)
    assert torch.all(grad == 0)


def test_a_row_whose_every_shard_is_padding_gives_no_nan_in_the_combine():
    # Not a real layout (vocab_size <= vocab_start everywhere), but it is the -inf - -inf
    # that the combine must not turn into NaN: the row's sum-exp is 0, its lse -inf.
    shards = [torch.randn(3, 8, device=DEVICE) for _ in range(2)]
    targets = torch.full((3,), IGNORE, device=DEVICE)
    stats = [shard_stats(s, targets, 100 + 8 * r, vocab_size=50) for r, s in enumerate(shards)]
    combined = LockStep(2).run(lambda r, all_reduce: combine_shard_stats(*stats[r], all_reduce))
    for lse, target_logit in combined:
        assert torch.all(lse == float("-inf")) and torch.all(target_logit == 0)


def test_ignore_index_that_is_a_real_id():
    # A pad token of the corpus (id 0) as ignore_index: its rows drop out, on shard 0.
    real, targets, shards = case(torch.float32, *LAYOUTS[0])
    targets = targets.masked_fill(targets == IGNORE, 1)
    targets[::3] = 0
    outputs = run_shards(shards, targets, VOCAB, Z_LOSS, ignore_index=0)
    loss_ref, grad_ref = reference(real, targets, Z_LOSS, ignore_index=0)
    n_valid = (targets != 0).sum().item()
    grad = torch.cat([g for _, g in outputs], dim=1)
    torch.testing.assert_close(outputs[1][0].double(), loss_ref, atol=2 * lse_error(real),
                               rtol=0)
    torch.testing.assert_close(grad[:, :VOCAB].double() * n_valid, grad_ref,
                               **grad_tol(torch.float32, real, n_valid))
    assert torch.all(grad[targets == 0] == 0) and torch.all(grad[:, VOCAB:] == 0)


def test_a_padding_target_gives_an_infinite_loss_like_the_torch_path():
    # A target id >= vocab_size is a data bug; an infinite loss shows it, a finite one
    # (target logit 0) would not.
    real, targets, shards = case(torch.float32, *LAYOUTS[0])
    targets[2] = VOCAB + 3
    outputs = run_shards(shards, targets, VOCAB, 0.0)
    assert all(torch.isinf(loss) and loss > 0 for loss, _ in outputs)
    last_start = shards[-1][1]
    assert torch.all(outputs[-1][1][:, VOCAB - last_start:] == 0), "padding gradient stays 0"


def test_without_vocab_size_every_column_counts():
    # vocab_size=None is the unpadded case of the existing API: finite logits only.
    real, targets, _ = case(torch.float32, *LAYOUTS[0])
    split = VOCAB // 2 - 3
    shards = [(real[:, :split], 0), (real[:, split:], split)]
    outputs = run_shards(shards, targets, None, 0.0)
    loss_ref, _ = reference(real, targets, 0.0)
    torch.testing.assert_close(outputs[0][0].double(), loss_ref, atol=2 * lse_error(real),
                               rtol=0)


def test_forward_and_backward_read_no_tensor_value_on_the_host():
    # On a GPU every read of a tensor's value stalls the host; n_valid and the stats
    # stay on the device. Only reads made from kernels/cross_entropy.py itself count:
    # the Triton interpreter reads its tensors through numpy by design.
    real, targets, shards = case(torch.float32, *LAYOUTS[0])
    reads = []
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name, original):
        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.endswith(os.path.join("kernels", "cross_entropy.py")):
                reads.append(f"{name} at line {caller.lineno}")
            return original(tensor, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        run_shards(shards, targets, VOCAB, Z_LOSS)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    assert not reads, reads


@pytest.mark.skipif(not CUDA, reason="CUDA's sync-debug mode needs a GPU")
def test_no_device_sync_under_cuda_sync_debug_mode():
    # Catches what the read counting cannot: syncs inside torch's C++ (a nonzero).
    real, targets, shards = case(torch.bfloat16, *LAYOUTS[0])
    run_shards(shards, targets, VOCAB, Z_LOSS)  # autotuning synchronizes: before
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # One pass with a no-op all-reduce: what a rank computes between its collectives.
        shard, start = shards[1]
        leaf = shard.detach().requires_grad_()
        loss = vocab_parallel_cross_entropy(leaf, targets, start, lambda x, op: x, Z_LOSS,
                                            vocab_size=VOCAB)
        torch.autograd.grad(loss, leaf)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_vocab_parallel_head_takes_the_kernel_under_the_triton_op_table():
    """megalite's head on a padded vocabulary (here tp 1, padded 61 -> 64) uses the
    Triton kernel when the op table is Triton's and gives the torch path's loss and
    gradients (both fp32, the kernel's blocked sums: lse_error's bound)."""
    from kernels import get_ops
    from megalite.parallel.tensor import VocabParallelHead
    from megalite.parallel.topology import Group

    vocab, hidden, n = 61, 16, 12
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, hidden, generator=gen)
    weight[vocab:] = 0  # pad rows are zero, as the init leaves them
    x = torch.randn(n, hidden, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    results = {}
    for kind in ("torch", "triton"):
        head = VocabParallelHead(hidden, vocab, Group("tp", (0,), 0), False, 16, get_ops(kind))
        assert not head.whole_vocab and (head.fused_vocab_parallel is not None) == (kind == "triton")
        with torch.no_grad():
            head.weight.copy_(weight)
        head.to(DEVICE)
        inputs = x.to(DEVICE).requires_grad_()
        loss = head.loss(head(inputs.unsqueeze(0)).squeeze(0), targets.to(DEVICE))
        loss.backward()
        results[kind] = (loss.detach().cpu(), inputs.grad.cpu(), head.weight.grad.cpu())
    tol = lse_error(x @ weight[:vocab].T)
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
