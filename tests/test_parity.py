"""Layout parity: every (tp, sp, dp, pp, zero, ...) layout trains like one process.

Each case runs 10 optimizer steps of the whole trainer on real gloo ranks in float64
and compares with the plain single-process PyTorch loop of tests/reference.py
(torch.optim.AdamW, clip_grad_norm_) on the same config and seed: the loss and
gradient norm of every step, then the gradients of one more batch gathered to global
tensors, and the final parameters, to rtol 1e-9 + atol 1e-9 x max|reference|
(tests/parity.py says why that holds on any machine and catches any real bug). A few
fp32 cases are judged against the float64 reference relative to the single-process
fp32 run's own error.
"""

import pytest
import torch

from dist_harness import restart_pool, run_on_ranks
from parity import (FP32_FACTOR, FP32_FLOOR, STEPS, config_args, fp32_errors, fp64_excess,
                    layout_args, merged, reference, run_layout, trainer_on_layout)
from megalite.cli import parse_args
from megalite.parallel.tensor import to_global
from megalite.parallel.topology import build_topology, destroy_topology
from megalite.training.trainer import Trainer


LAYOUTS = [
    ("llama", dict(tp=2)),
    ("llama", dict(tp=2, tp_sp="true")),
    ("llama", dict(tp=4, tp_sp="true")),
    ("gpt2", dict(tp=4)),
    ("gpt2", dict(tp=2, tp_sp="true")),
    ("llama", dict(sp=2, sp_mode="ring")),
    ("llama", dict(sp=4, sp_mode="ring")),
    ("llama", dict(sp=2, sp_mode="all_to_all")),
    ("gpt2", dict(sp=2, sp_mode="ring")),
    ("llama", dict(tp=2, sp=2, sp_mode="ring", tp_sp="true")),
    ("gpt2", dict(tp=2, sp=2, sp_mode="all_to_all")),
    ("llama", dict(dp=2, tp=2, sp=2, sp_mode="ring", tp_sp="true")),
]
# Pipeline layouts: m micro-batches = global_batch_size / (2 * dp).
PIPELINE_LAYOUTS = [
    ("llama", dict(pp=2, schedule="1f1b")),  # m = 4
    ("llama", {"pp": 2, "schedule": "gpipe", "train.global_batch_size": 10}),  # m = 5 (odd)
    ("gpt2", dict(pp=2, schedule="1f1b")),  # tied embeddings across stages
    ("llama", {"pp": 2, "schedule": "interleaved", "virtual_stages": 2, "model.num_layers": 4}),
    ("llama", dict(pp=2, tp=2, dp=2, schedule="1f1b", tp_sp="true")),  # m = 2 = pp
]
# ZeRO stages over dp x sp, bucketing, overlap, recomputation (2 micro-batches per step at
# dp=2, one at dp=4; clip_grad=0.5 is active in every step).
ZERO_LAYOUTS = [
    ("llama", dict(dp=2, zero=1)),
    ("llama", dict(dp=4, zero=1, bucket_mb=0.01)),  # many buckets
    ("llama", dict(dp=2, zero=2, bucket_mb=0.01)),
    ("gpt2", dict(dp=4, zero=2, overlap_grad_reduce="false")),
    ("gpt2", dict(dp=2, zero=3)),
    ("llama", dict(dp=4, zero=3, bucket_mb=0.01)),
    ("llama", dict(dp=2, zero=0, bucket_mb=1000, overlap_grad_reduce="false")),  # one bucket
    ("llama", dict(dp=2, tp=2, pp=2, zero=1, tp_sp="true")),
    ("gpt2", dict(dp=2, tp=2, pp=2, zero=2)),
    ("llama", {"dp": 2, "pp": 2, "zero": 2, "schedule": "interleaved", "virtual_stages": 2,
               "model.num_layers": 4}),
    ("llama", dict(dp=2, sp=2, zero=2, sp_mode="ring")),
    ("llama", {"dp": 2, "zero": 1, "optim.offload": "cpu"}),
    ("llama", {"dp": 2, "zero": 3, "train.recompute": "full", "train.offload_activations": "true"}),
    ("gpt2", {"tp": 2, "sp": 2, "tp_sp": "true", "train.recompute": "selective",
              "train.offload_activations": "true"}),
    ("llama", {"pp": 2, "tp": 2, "tp_sp": "true", "train.recompute": "full"}),
    # hybrid sharding: shards over blocks of zero_shard ranks, replicated over the rest
    ("llama", dict(dp=4, zero=3, zero_shard=2, bucket_mb=0.01)),
    ("llama", dict(dp=4, zero=2, zero_shard=2)),
    ("gpt2", dict(dp=4, zero=1, zero_shard=2, overlap_grad_reduce="false")),
    ("llama", dict(dp=2, sp=2, zero=2, zero_shard=2, sp_mode="ring")),
    ("llama", dict(dp=2, zero=1, zero_shard=1)),
]
PIPELINE_MATRIX = [
    (preset, {"pp": pp, "schedule": schedule, "model.num_layers": 8,
              "train.global_batch_size": 2 * m, **extra})
    for preset in ("llama", "gpt2") for pp in (2, 4) for schedule in ("gpipe", "1f1b")
    for m in (pp, 2 * pp, pp + 1) for extra in ({}, {"tp": 2}, {"dp": 2})
    if pp * (2 if extra else 1) <= 8 and (m * 2) % (2 * extra.get("dp", 1)) == 0
    and m // extra.get("dp", 1) >= pp
] + [
    (preset, {"pp": pp, "schedule": "interleaved", "virtual_stages": 2, "model.num_layers": 8,
              "train.global_batch_size": 2 * m, **extra})
    for preset in ("llama", "gpt2") for pp in (2, 4) for m in (pp, 2 * pp)
    for extra in ({}, {"tp": 2})
    if pp * extra.get("tp", 1) <= 8
] + [
    ("gpt2", {"pp": 2, "tp": 2, "dp": 2, "schedule": "1f1b", "train.global_batch_size": 16}),
    ("llama", {"pp": 2, "sp": 2, "tp": 2, "schedule": "1f1b", "sp_mode": "ring"}),
    ("llama", {"pp": 4, "schedule": "1f1b", "model.num_layers": 8, "stage_layers": "1,3,2,2"}),
]
SLOW_LAYOUTS = [
    (preset, dict(tp=tp, sp=sp, sp_mode=mode, tp_sp=tp_sp))
    for preset in ("llama", "gpt2") for tp in (1, 2, 4) for sp in (1, 2, 4)
    for mode in ("ring", "all_to_all") for tp_sp in ("false", "true")
    if 1 < tp * sp <= 8 and not (sp == 1 and mode == "all_to_all") and not (tp == 1 and tp_sp == "true")
    and not (mode == "all_to_all" and sp * tp > 4)  # 4 (kv) heads: (heads/tp) % sp == 0
]


# fp32 cases: the trainer at world size 1 and one layout of each kind.
FP32_LAYOUTS = [
    ("llama", {}),
    ("llama", dict(tp=2, tp_sp="true")),
    ("llama", dict(sp=2, sp_mode="ring")),
    ("gpt2", dict(pp=2, tp=2, dp=2, schedule="1f1b")),
    ("llama", dict(dp=2, zero=2, bucket_mb=0.01)),
]


def _check(cache, tmp_path, preset, layout):
    args, shared = layout_args(cache, tmp_path / "run", preset, layout)
    results = run_on_ranks(run_layout, args)
    ref = reference(cache, tmp_path, preset, shared)
    assert set(merged(results)[1]) == set(ref[1])
    excess = fp64_excess(results, ref)
    failed = {k: v for k, v in excess.items() if not v <= 1.0}
    assert not failed, f"over the float64 tolerance (error / tolerance): {failed}"


# In CI: the TP/SP layouts, the quick pipeline ones, the ZeRO ones and the whole
# pipeline matrix.
@pytest.mark.parametrize("preset, layout", LAYOUTS + PIPELINE_LAYOUTS + ZERO_LAYOUTS
                         + PIPELINE_MATRIX, ids=lambda v: str(v))
def test_layout_matches_single_process(cache, tmp_path, preset, layout):
    _check(cache, tmp_path, preset, layout)


@pytest.mark.slow
@pytest.mark.parametrize("preset, layout", SLOW_LAYOUTS, ids=lambda v: str(v))
def test_full_matrix(cache, tmp_path, preset, layout):
    _check(cache, tmp_path, preset, layout)


@pytest.mark.parametrize("preset, layout", FP32_LAYOUTS, ids=lambda v: str(v))
def test_fp32_layout_error_is_that_of_one_process(cache, tmp_path, preset, layout):
    args, shared = layout_args(cache, tmp_path / "run", preset, layout, precision="fp32")
    run = merged(run_on_ranks(run_layout, args))
    ref64 = reference(cache, tmp_path, preset, shared)
    own = fp32_errors(reference(cache, tmp_path, preset, shared, "fp32"), ref64)
    errors = fp32_errors(run, ref64)
    for key, error in errors.items():
        bound = FP32_FACTOR * max(own[key], FP32_FLOOR)
        assert error <= bound, (f"{key}: fp32 relative error {error:.2e} vs float64, more than "
                                f"{FP32_FACTOR:g} x the single-process fp32 run's "
                                f"{own[key]:.2e}")


def run_with_one_bucket_unaveraged(args):
    """`run_layout` with a planted bug: the first bucket's gradients miss the 1/(dp*sp)
    average (summed over the replicas, not averaged)."""
    from megalite.parallel.grads import reduce as data
    finish = data.GradBuffer.finish

    def broken(self):
        finish(self)
        self._owned_view(self.layout.buckets[0]).mul_(self.group.size)
    data.GradBuffer.finish = broken
    try:
        return run_layout(args)
    finally:
        data.GradBuffer.finish = finish


def test_float64_parity_catches_a_skipped_average(cache, tmp_path):
    """The tolerance is tight enough to see a bug in one bucket of many: the error is
    orders of magnitude over it (the closing note of the issue gives the number)."""
    layout = dict(dp=2, bucket_mb=0.01)
    args, shared = layout_args(cache, tmp_path / "run", "llama", layout)
    results = run_on_ranks(run_with_one_bucket_unaveraged, args)
    excess = fp64_excess(results, reference(cache, tmp_path, "llama", shared))
    assert max(excess.values()) > 1e6, excess


def count_live_activations(args):
    """Stage 0's most micro-batches with saved activations at once, per schedule."""
    out = {}
    for schedule in ("gpipe", "1f1b"):
        cfg, _ = parse_args([*args, f"--parallel.schedule={schedule}"])
        topo = build_topology(pp=2, timeout_s=120)
        if topo is None:
            return None
        trainer = Trainer(cfg, topo=topo)
        trainer.train_step()
        out[schedule] = (topo.pp_rank, trainer.pipeline.peak_live)
        destroy_topology(topo)
    return out


def test_1f1b_keeps_at_most_pp_micro_batches_alive(cache, tmp_path):
    # 8 micro-batches through 2 stages: GPipe holds all 8 on stage 0, 1F1B at most 2.
    args = config_args(cache, tmp_path / "run", "llama",
                       ["--parallel.pp=2", "--train.global_batch_size=16", "--train.steps=1"])
    results = [r for r in run_on_ranks(count_live_activations, args) if r is not None]
    stage0 = [r for r in results if r["gpipe"][0] == 0][0]
    assert stage0["gpipe"][1] == 8
    assert stage0["1f1b"][1] == 2
    last = [r for r in results if r["1f1b"][0] == 1][0]
    assert last["1f1b"][1] == 1  # the last stage runs each backward right after its forward


def one_stage_engine_record(args):
    """pp = 1 through the engine: most micro-batches alive, and for every bucket launch
    whether it ran inside backward and inside the last micro-batch's backward."""
    topo, trainer = trainer_on_layout(args)
    if topo is None:
        return None
    grads, launches = trainer.optimizer.grads, []
    launch = grads._launch

    def spy(bucket):
        # _callback_queued: inside a backward (its end-of-backward callback is pending)
        launches.append((grads._callback_queued, grads.last_micro_batch))
        launch(bucket)
    grads._launch = spy
    trainer.train_step()
    destroy_topology(topo)
    return trainer.pipeline.peak_live, launches, len(trainer.optimizer.layout.buckets)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_stage_runs_each_backward_after_its_forward(cache, tmp_path, schedule):
    """pp = 1 is the engine's trivial case: 4 micro-batches per rank at dp = 2 keep one
    alive whatever the schedule, and the ZeRO 1 buckets all start during the last
    micro-batch's backward, none before."""
    args = config_args(cache, tmp_path / "run", "llama",
                       ["--parallel.dp=2", "--parallel.zero=1", "--parallel.bucket_mb=0.01",
                        f"--parallel.schedule={schedule}", "--train.global_batch_size=16"])
    for peak, launches, buckets in (r for r in run_on_ranks(one_stage_engine_record, args) if r):
        assert peak == 1
        assert buckets > 1 and len(launches) == buckets
        assert all(in_backward and last for in_backward, last in launches), launches


def train_and_save(args, steps):
    """Train `steps` steps, save, train one more; returns (loss of the extra step, params)."""
    topo, trainer = trainer_on_layout(args)
    if topo is None:
        return None
    for _ in range(steps):
        trainer.train_step()
    trainer.save()
    saved = {n: to_global(q, q.detach(), topo).clone() for n, q in trainer.model.named_parameters()}
    loss = trainer.train_step()["loss"]
    destroy_topology(topo)
    return loss, saved


def test_pipeline_checkpoint_loads_in_one_process(cache, tmp_path):
    """A pp=2 x tp=2 x dp=2 checkpoint (stages gathered to rank 0) resumes in one process."""
    # all 8 ranks: saving gathers RNG states over the whole world. Fresh workers: in the
    # full suite this test met a pool whose ranks had created different numbers of
    # process groups (not reproduced in isolation; see the closing note of issue 4)
    restart_pool()
    args = config_args(cache, tmp_path / "run", "gpt2",
                       ["--parallel.pp=2", "--parallel.tp=2", "--parallel.dp=2"])
    results = [r for r in run_on_ranks(train_and_save, args, 1) if r is not None]
    single, _ = parse_args(config_args(cache, tmp_path / "run", "gpt2"))
    trainer = Trainer(single, resume="latest", topo=build_topology())
    assert trainer.step == 1
    named = dict(trainer.model.named_parameters())
    for _, saved in results:
        for name, value in saved.items():
            torch.testing.assert_close(named[name].detach(), value, rtol=0, atol=0,
                                       msg=lambda m: f"{name}: {m}")
    assert trainer.train_step()["loss"] == pytest.approx(results[0][0], rel=1e-5)


def one_step_record(args):
    topo, trainer = trainer_on_layout(args)
    if topo is None:
        return None
    trainer.train_step()
    record = trainer.train_step()
    record.update(trainer._memory())
    destroy_topology(topo)
    return topo.rank, record


def test_step_record_splits_time_and_counts_bytes_per_group(cache, tmp_path):
    args = config_args(cache, tmp_path / "run", "llama",
                       ["--parallel.pp=2", "--parallel.tp=2", "--parallel.dp=2"])
    results = dict(r for r in run_on_ranks(one_step_record, args) if r is not None)
    for rank, r in results.items():
        parts = [r["time_compute"], r["time_pipeline"], r["time_comm"], r["time_optimizer"]]
        assert all(p >= 0 for p in parts), parts
        assert sum(parts) == pytest.approx(r["step_time"], rel=0.02)
        assert {"tp", "pp", "dp_sp"} <= set(r["comm_bytes"]), r["comm_bytes"]
        assert r["mem_rss_max"] >= r["mem_rss"]
    maxima = {r["mem_rss_max"] for r in results.values()}
    assert len(maxima) == 1  # every rank reports the same maximum
