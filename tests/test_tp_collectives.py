"""Tensor parallelism moves Megatron's volume: the calls and bytes of one training step
through the tensor-parallel group, counted by comm.py, against the formula.

Per transformer block and micro-batch (Korthikanti et al. 2022, section 4.2.2; each
call moves one full activation, B x S x H elements, as comm.py counts bytes):

                   forward               backward
    tp             2 all-reduce          2 all-reduce
    tp + tp_sp     2 all-gather + 2 RS   4 all-gather + 2 RS

Full recomputation repeats the forward's collectives in backward, all but the block's
last reduction (the MLP output's): torch.utils.checkpoint stops recomputing once the
tensors backward needs are rebuilt, and nothing needs the block's output; selective
recomputation (the attention core) repeats none. Outside the blocks, per micro-batch:
the embedding (forward: an all-reduce, or under tp_sp a reduce-scatter whose backward
is an all-gather), the head's input mapping (a column layer like the others: backward
all-reduce; under tp_sp a forward all-gather, a backward all-gather again and a
reduce-scatter, each a full activation), and the
vocab-parallel cross-entropy's one all-gather of every shard's log-sum-exp and target
logit (2 x B x S values per shard); per step, under tp_sp, one all-reduce of the replicated
parameters' gradients that saw a sequence shard (norm weights).
"""

import pytest

from dist_harness import run_on_ranks
from parity import config_args, prepared_cache, trainer_on_layout
from megalite.parallel.topology import destroy_topology

B, S, H, LAYERS = 2, 32, 64, 2  # config_args' micro-batch, sequence, hidden, layers
MICRO = 2  # global batch 8 / (micro-batch 2 x dp 2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory, "tp_counts")


def one_step(args):
    topo, trainer = trainer_on_layout(args)
    if topo is None:
        return None
    trainer.train_step()  # the first step: compiles nothing, but warms every code path
    topo.reset_bytes()
    trainer.train_step()
    counts, nbytes = dict(topo.tp_group.ops), dict(topo.tp_group.bytes)
    elem = trainer.optimizer.model_dtype.itemsize
    norm_params = sum(p.numel() for p in trainer.optimizer.layout.params
                      if getattr(p, "sequence_parallel_grad", False))
    destroy_topology(topo)
    return counts, nbytes, elem, norm_params


def expected(tp: int, tp_sp: bool, recompute: str, elem: int, norm_params: int):
    """(calls, bytes) per collective kind of one step on the tp group."""
    act = B * S * H * elem  # one full activation
    full = recompute == "full"  # the forward's collectives again, but the last reduction
    if tp_sp:
        per_block = {"all_gather": 2 + 4 + 2 * full, "reduce_scatter": 2 + 2 + full}
        outside = {"all_gather": 1 + 2, "reduce_scatter": 1 + 1}  # embedding, head
    else:
        per_block, outside = {"all_reduce": 2 + 2 + full}, {"all_reduce": 1 + 1}
    calls = {k: MICRO * (LAYERS * n + outside[k]) for k, n in per_block.items()}
    nbytes = {k: n * act for k, n in calls.items()}
    # the cross-entropy: one all-gather of every shard's (log-sum-exp, target logit)
    calls["all_gather"] = calls.get("all_gather", 0) + MICRO
    nbytes["all_gather"] = nbytes.get("all_gather", 0) + MICRO * 2 * B * S * elem * tp
    if tp_sp:  # the norms' gradients, partial sums over the sequence shards
        calls["all_reduce"], nbytes["all_reduce"] = 1, norm_params * elem
    return calls, nbytes


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("tp_sp", [False, True])
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_one_step_moves_megatrons_tp_volume(cache, tmp_path, tp, tp_sp, recompute):
    args = config_args(cache, tmp_path / "run", "llama",
                       [f"--parallel.tp={tp}", "--parallel.dp=2", f"--parallel.tp_sp={tp_sp}",
                        f"--train.recompute={recompute}"])
    results = [r for r in run_on_ranks(one_step, args) if r is not None]
    for counts, nbytes, elem, norm_params in results:
        want_calls, want_bytes = expected(tp, tp_sp, recompute, elem, norm_params)
        assert counts == want_calls
        assert nbytes == want_bytes
