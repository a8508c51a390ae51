"""The trainer in bf16 / fp16 and with activation recomputation.

- bf16 (parameters and activations bf16, fp32 master weights and gradients) tracks the
  fp32 run of the same config for 20 steps: every loss within BF16_LOSS_TOL relative.
  bf16 has 8 mantissa bits (rel. rounding 2^-9 ~ 0.2% per op), but the loss averages
  many rounded terms: the largest difference seen here is 0.04%. 1% leaves room
  without hiding a real bug (a lost master update or an unscaled gradient moves the
  loss by far more).
- fp16 with dynamic loss scaling: an inf injected into one dp rank's gradient skips the
  step on every rank (parameters unchanged, guard reason "overflow") and, with
  hysteresis 1, halves the scale; the next step trains.
- recompute none / selective / full give the same losses and gradients (dropout on, so
  the recomputed masks must equal the first ones).
"""

import pytest
import torch

from dist_harness import run_on_ranks
from parity import prepared_cache
from megalite.cli import parse_args
from megalite.parallel.topology import build_topology, destroy_topology
from megalite.training.trainer import Trainer

BF16_LOSS_TOL = 0.01


def args(cache, run_dir, *extra):
    return ["--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4",
            "--model.num_kv_heads=2", "--train.seq_len=32", "--train.micro_batch_size=4",
            "--train.global_batch_size=8", "--train.steps=20", "--train.eval_every=0",
            "--optim.warmup_steps=2", "--optim.lr=3e-3", "--data.corpus_max_mb=0.3",
            "--data.vocab_size=512", f"--data.cache_dir={cache}", f"--run.dir={run_dir}",
            "--checkpoint.every=0", "--model.kernels=torch", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory, "precision_data", args)


def losses(cli_args, steps):
    cfg, _ = parse_args(cli_args)
    trainer = Trainer(cfg, topo=build_topology())
    return [trainer.train_step()["loss"] for _ in range(steps)]


def test_bf16_tracks_fp32(cache, tmp_path):
    fp32 = losses(args(cache, tmp_path / "a"), 20)
    bf16 = losses(args(cache, tmp_path / "b", "--train.precision=bf16"), 20)
    assert fp32[-1] < 0.9 * fp32[0]  # it learns, so tracking means something
    for step, (a, b) in enumerate(zip(fp32, bf16), 1):
        assert b == pytest.approx(a, rel=BF16_LOSS_TOL), f"step {step}: fp32 {a}, bf16 {b}"


def overflow_on_one_rank(cli_args):
    cfg, _ = parse_args(cli_args)
    topo = build_topology(dp=2, timeout_s=120)
    if topo is None:
        return None
    trainer = Trainer(cfg, topo=topo)
    weight = trainer.model.lm_head.weight
    handle = (weight.register_hook(lambda g: g + float("inf"))
              if topo.dp_rank == 1 else None)
    before = {n: t.clone() for n, t in trainer.optimizer.param_tensors().items()}
    scale = trainer.optimizer.loss_scale
    first = trainer.train_step()
    unchanged = all(torch.equal(before[n], t)
                    for n, t in trainer.optimizer.param_tensors().items())
    if handle is not None:
        handle.remove()
    second = trainer.train_step()
    destroy_topology(topo)
    return (first["skip_reason"], unchanged, scale, first["loss_scale"], second["skip_reason"],
            second["loss"])


@pytest.mark.parametrize("zero", [0, 2])
def test_fp16_overflow_skips_on_every_rank_and_halves_scale(cache, tmp_path, zero):
    cli = args(cache, tmp_path, "--train.precision=fp16", "--train.loss_scale_hysteresis=1",
               "--parallel.dp=2", f"--parallel.zero={zero}", "--train.micro_batch_size=2")
    results = [r for r in run_on_ranks(overflow_on_one_rank, cli) if r is not None]
    assert len(results) == 2
    for reason, unchanged, scale, scale_after, second_reason, second_loss in results:
        assert reason == "overflow" and unchanged
        assert scale_after == scale / 2
        assert second_reason is None and second_loss == second_loss  # trains, finite


def step_with_grads(cli_args):
    cfg, _ = parse_args(cli_args)
    trainer = Trainer(cfg, topo=build_topology())
    loss = trainer.train_step()["loss"]
    trainer.optimizer.zero_grad()
    trainer.forward_backward(trainer.micro_batches(trainer.sampler.next_indices()))
    trainer.optimizer.prepare_step()
    return loss, trainer.optimizer.grad_tensors()


def test_recompute_gives_identical_losses_and_gradients(cache, tmp_path):
    base = args(cache, tmp_path, "--model.dropout=0.1", "--model.attention=eager")
    loss, grads = step_with_grads(base)
    for mode in ("selective", "full"):
        other_loss, other_grads = step_with_grads([*base, f"--train.recompute={mode}"])
        assert other_loss == loss, mode
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=0, atol=0,
                                       msg=lambda m: f"{mode} {name}: {m}")
