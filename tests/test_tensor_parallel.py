"""Tensor parallelism on real gloo ranks against a single-process reference.

Every rank computes the reference itself (same seeds, tiny sizes) and compares its
shard: outputs, input gradients, and parameter gradients gathered with global_tensor.
fp32 throughout. Tolerance: rtol 1e-5, and atol 1e-5 times the largest magnitude in
the expected tensor (at least 1e-7). A split layer computes the same sums in another
order (partial matmuls, then an all-reduce), so results differ only by fp32 rounding,
whose size follows the terms of a sum rather than its result: an element that sums to
near zero from O(1) terms can be off by ~1e-6 absolute, hence an absolute part scaled
to the tensor. A wrong shard, scale or missing reduction is off by O(1) relative.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_harness import run_on_ranks
from megalite.config import Config, ModelConfig, resolve
from megalite.errors import ConfigError
from megalite.model.init import init_parameters
from megalite.model.transformer import Transformer
from megalite.parallel import comm
from megalite.parallel.tensor import (ColumnParallelLinear, RowParallelLinear,
                                      TensorParallelLayers, VocabParallelEmbedding,
                                      check_tp_layout, global_tensor, local_range, local_slice,
                                      padded_vocab_size, vocab_parallel_cross_entropy)
from megalite.parallel.topology import Group, build_topology, destroy_topology

RTOL, ATOL_SCALE, ATOL_MIN = 1e-5, 1e-5, 1e-7
B, S, H, FFN, VOCAB = 2, 8, 16, 32, 37  # VOCAB is divisible by neither 2 nor 4


def close(actual, expected, what):
    atol = max(ATOL_MIN, ATOL_SCALE * expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class MLP(nn.Module):
    """Column -> gelu -> Row, the pair every block uses."""

    def __init__(self, group, sequence_parallel):
        super().__init__()
        self.fc = ColumnParallelLinear(H, FFN, True, group, sequence_parallel)
        self.proj = RowParallelLinear(FFN, H, True, group, sequence_parallel)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def reference_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)


def check_layer(layer, weights, reference, x, shard_in, shard_out, group, what):
    """`layer` holding this rank's slices of `weights` against reference(x, **weights)."""
    for name, value in weights.items():
        p = layer.get_parameter(name)
        p.data.copy_(local_slice(p, value, group.rank, group.size))
    ref_params = {n.replace(".", "_"): v.clone().requires_grad_() for n, v in weights.items()}
    differentiable = x.is_floating_point()
    x_ref = x.clone().requires_grad_(differentiable)
    y_ref = reference(x_ref, **ref_params)
    grad_out = randn(*y_ref.shape, seed=99)
    (y_ref * grad_out).sum().backward()

    x_local = shard_in(x).clone().requires_grad_(differentiable)
    y = layer(x_local)
    close(y, shard_out(y_ref.detach()), f"{what} output")
    (y * shard_out(grad_out)).sum().backward()
    if differentiable:
        close(x_local.grad, shard_in(x_ref.grad), f"{what} input grad")
    for name in weights:
        p = layer.get_parameter(name)
        grad = comm.all_reduce(p.grad.clone(), group) if p.sequence_parallel_grad else p.grad
        close(global_tensor(p, grad, group), ref_params[name.replace(".", "_")].grad,
              f"{what} {name} grad")


def check_cross_entropy(group, pad_to_multiple):
    padded = padded_vocab_size(VOCAB, group.size, pad_to_multiple)
    per_rank = padded // group.size
    start = group.rank * per_rank
    n = 12
    logits = randn(n, VOCAB, seed=5) * 3
    targets = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(6))
    targets[::4] = -100
    logits_ref = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(logits_ref, targets)
    (2.5 * loss_ref).backward()
    # Large pad logits: they would dominate the softmax if they were not masked out.
    padded_logits = torch.cat([logits, torch.full((n, padded - VOCAB), 30.0)], dim=1)
    shard = padded_logits[:, start:start + per_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, group, start, VOCAB)
    close(loss, loss_ref.detach(), f"cross-entropy pad {pad_to_multiple}")
    (2.5 * loss).backward()
    expected = torch.cat([logits_ref.grad, torch.zeros(n, padded - VOCAB)], dim=1)
    close(shard.grad, expected[:, start:start + per_rank], f"cross-entropy grad {pad_to_multiple}")


def check_mlp_bytes(group, sequence_parallel):
    """Bytes through the TP group for one MLP forward + backward (comm.py's convention).

    One activation [B, S, H] in fp32 is A = B*S*H*4 bytes. Without tp_sp: forward, the
    row layer all-reduces its [B, S, H] output (A); backward, the column layer
    all-reduces the input gradient (A): all_reduce 2A. With tp_sp: forward, the column
    layer all-gathers [B, S/tp, H] into [B, S, H] (counted as the gathered size, A) and
    the row layer reduce-scatters its unreduced [B, S, H] (A); backward mirrors them,
    all-gather of the output gradient (A) and reduce-scatter of the input gradient (A),
    and the column layer gathers its input again for the weight gradient (A; it saved
    only its sequence shard): all_gather 3A, reduce_scatter 2A.
    """
    mlp = MLP(group, sequence_parallel)
    local_seq = S // group.size if sequence_parallel else S
    x = randn(B, local_seq, H, seed=7).requires_grad_()
    group.bytes.clear()
    mlp(x).sum().backward()
    activation = B * S * H * 4
    expected = ({"all_gather": 3 * activation, "reduce_scatter": 2 * activation}
                if sequence_parallel else {"all_reduce": 2 * activation})
    assert dict(group.bytes) == expected, (sequence_parallel, dict(group.bytes))


def layer_cases(tp):
    topo = build_topology(tp=tp)
    if topo is None:
        return None
    group, rank = topo.tp_group, topo.tp_rank
    last_dim = lambda t: t.chunk(tp, dim=-1)[rank]  # noqa: E731
    x = randn(B, S, H, seed=1)
    fc_w, fc_b = randn(FFN, H, seed=2), randn(FFN, seed=3)
    proj_w, proj_b = randn(H, FFN, seed=4), randn(H, seed=5)
    tokens = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(8))
    for sp in (False, True):
        seq = (lambda t: t.chunk(tp, dim=1)[rank]) if sp else (lambda t: t)
        check_layer(ColumnParallelLinear(H, FFN, True, group, sp), {"weight": fc_w, "bias": fc_b},
                    F.linear, x, seq, last_dim, group, f"column sp={sp}")
        row_in = randn(B, S, FFN, seed=6)
        check_layer(RowParallelLinear(FFN, H, True, group, sp),
                    {"weight": proj_w, "bias": proj_b}, F.linear, row_in, last_dim, seq, group,
                    f"row sp={sp}")
        check_layer(MLP(group, sp), {"fc.weight": fc_w, "fc.bias": fc_b, "proj.weight": proj_w,
                                     "proj.bias": proj_b},
                    reference_mlp, x, seq, seq, group, f"column->row sp={sp}")
        for pad in (1, 16):
            embedding = VocabParallelEmbedding(VOCAB, H, group, sp, pad)
            check_layer(embedding, {"weight": randn(VOCAB, H, seed=9)}, F.embedding, tokens,
                        lambda t: t, seq, group, f"embedding sp={sp} pad={pad}")
        check_mlp_bytes(group, sp)
    for pad in (1, 16):  # with 16, tp=4: the last rank holds only padding
        check_cross_entropy(group, pad)
    destroy_topology(topo)
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_layers_match_single_process(tp):
    assert run_on_ranks(layer_cases, tp)[:tp] == [True] * tp


def model_cfg(preset, tp):
    fields = dict(num_kv_heads=tp) if preset == "llama" else dict(tie_embeddings=True)
    model = dict(preset=preset, hidden_size=64, num_layers=2, num_heads=8, vocab_size=50,
                 max_seq_len=16, attention="sdpa", kernels="torch", **fields)
    return resolve(Config(model=ModelConfig(**model)), vocab_size=50, device="cpu").model


def model_cases(preset, tp):
    topo = build_topology(tp=tp)
    if topo is None:
        return None
    group = topo.tp_group
    cfg = model_cfg(preset, tp)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (2, 16), generator=gen)
    targets = torch.randint(0, 50, (2, 16), generator=gen)
    targets[:, :3] = -100
    reference = Transformer(cfg)
    init_parameters(reference, seed=3, std=0.1)
    ref_loss = reference(tokens, targets)
    ref_loss.backward()
    with torch.no_grad():
        ref_logits = reference(tokens)
    ref_params = dict(reference.named_parameters())
    for tp_sp in (False, True):
        model = Transformer(cfg, TensorParallelLayers(group, tp_sp, pad_to_multiple=4))
        init_parameters(model, seed=3, std=0.1)
        params = dict(model.named_parameters())
        assert params.keys() == ref_params.keys()
        if cfg.tie_embeddings:
            assert model.lm_head.weight is model.embed.weight
        for name, p in params.items():
            assert p.global_shape == ref_params[name].shape, name
            assert p.sequence_parallel_grad == (tp_sp and p.tp_split_dim is None), name
            assert torch.equal(global_tensor(p, p.detach(), group), ref_params[name].detach()), name
            if p.vocab_padding:
                held = local_range(p, group.rank, group.size)
                real = max(0, min(held.stop, p.global_shape[0]) - held.start)
                assert not p.detach()[real:].any(), f"{name}: pad rows must be zero"
        loss = model(tokens, targets)
        close(loss, ref_loss.detach(), f"{preset} tp_sp={tp_sp} loss")
        loss.backward()
        for name, p in params.items():
            if p.sequence_parallel_grad:
                comm.all_reduce(p.grad, group)
            close(global_tensor(p, p.grad, group), ref_params[name].grad,
                  f"{preset} tp_sp={tp_sp} {name} grad")
        with torch.no_grad():
            close(model(tokens), ref_logits, f"{preset} tp_sp={tp_sp} logits")
    destroy_topology(topo)
    return True


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_transformer_matches_single_process(preset, tp):
    assert run_on_ranks(model_cases, preset, tp)[:tp] == [True] * tp


def test_layouts_a_rank_cannot_hold_are_config_errors():
    gqa = model_cfg("llama", 2)  # 8 query heads, 2 kv heads
    check_tp_layout(gqa, 2, seq_len=16)
    with pytest.raises(ConfigError, match="num_kv_heads=2 is not divisible by parallel.tp=4"):
        check_tp_layout(gqa, 4)
    with pytest.raises(ConfigError, match="num_heads=8 is not divisible by parallel.tp=3"):
        check_tp_layout(gqa, 3)
    with pytest.raises(ConfigError, match="train.seq_len"):
        check_tp_layout(model_cfg("llama", 4), 4, seq_len=10)
    # The model runs the check before building anything (no process group needed).
    four_ranks = Group("tp", (0, 1, 2, 3), 0)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        Transformer(gqa, TensorParallelLayers(four_ranks))


@pytest.mark.parametrize("pad_to_multiple", [1, 8])
def test_one_rank_tensor_parallel_model_is_the_dense_model(pad_to_multiple):
    cfg = model_cfg("gpt2", 1)
    dense = Transformer(cfg)
    one_rank = Transformer(cfg, TensorParallelLayers(Group("tp", (0,), 0), False, pad_to_multiple))
    init_parameters(dense, seed=1, std=0.1)
    init_parameters(one_rank, seed=1, std=0.1)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = one_rank(tokens)
        assert logits.shape == (2, 16, 50)
        close(logits, dense(tokens), "logits")
        close(one_rank(tokens, tokens), dense(tokens, tokens), "loss")
