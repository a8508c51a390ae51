"""Layout parity: every (tp, sp, dp, pp, zero, ...) layout trains like one process.

Each case runs 10 optimizer steps of the whole trainer on real gloo ranks and compares
with the plain single-process PyTorch loop of tests/reference.py (torch.optim.AdamW,
clip_grad_norm_) on the same config and seed: the loss and gradient norm of every step,
then the gradients of one more batch gathered to global tensors, and the final
parameters. fp32 throughout. The layouts only change summation order (split
matmuls, all-reduce order), whose rounding differences stay around 1e-6 relative:
losses rel 1e-5, gradients rtol 2e-5 / atol 2e-5 (checked after the 10 steps, so
they cover the whole trajectory: the layout's and the reference's norms round
differently, clipping scales every gradient by that norm, and Adam amplifies the
difference on near-zero gradients; seen: 1.7e-5 on 60 of 32k embedding entries at 8
layers, 4.5e-6 for the one-process trainer itself). Parameters get atol 1e-4 (weights ~0.02, lr 3e-3):
Adam divides each gradient by its own running RMS, so an element whose gradient is
near zero turns rounding noise into an update of up to lr; seen here: 2.3e-5 on one
element of 16k (a GELU unit that is nearly off), everything else below 1e-5.
"""

import pytest
import torch

from dist_harness import restart_pool, run_on_ranks
from reference import reference_run
from megalite.cli import parse_args
from megalite.data.build import prepare_default_data
from megalite.parallel.build import to_global
from megalite.topology import build_topology, destroy_topology
from megalite.trainer import Trainer

STEPS = 10


def config_args(cache, run_dir, preset="llama", layout=()):
    # llama: 8 heads sharing 4 kv heads (GQA at every tp <= 4); gpt2: 4 heads, no GQA
    heads = ["--model.num_heads=8", "--model.num_kv_heads=4"] if preset == "llama" else \
        ["--model.num_heads=4", "--model.num_kv_heads=0"]
    return ["--model.hidden_size=64", "--model.num_layers=2", *heads, f"--model.preset={preset}", "--train.seq_len=32",
            "--train.micro_batch_size=2", "--train.global_batch_size=8",
            f"--train.steps={STEPS}", "--train.eval_every=0", "--log.every=100",
            "--optim.warmup_steps=2", "--optim.lr=3e-3", "--optim.clip_grad=0.5",
            "--data.corpus_max_mb=0.3", "--data.vocab_size=509", f"--data.cache_dir={cache}",
            f"--run.dir={run_dir}", "--checkpoint.every=0", *layout]


def trainer_on_layout(args):
    """(topology, trainer) for the layout in `args`; (None, None) on ranks outside it."""
    cfg, _ = parse_args(args)
    p = cfg.parallel
    topo = build_topology(p.tp, p.sp, p.dp, p.pp, timeout_s=120)
    return (topo, Trainer(cfg, topo=topo)) if topo is not None else (None, None)


def run_layout(args):
    """Runs on every pool rank: train, then gradients of one extra batch, all global."""
    topo, trainer = trainer_on_layout(args)
    if topo is None:
        return None
    history = [(r["loss"], r["grad_norm"]) for r in (trainer.train_step() for _ in range(STEPS))]
    trainer.model.train()
    trainer.optimizer.zero_grad()
    trainer.forward_backward(trainer.micro_batches(trainer.sampler.next_indices()))
    trainer.optimizer.prepare_step()
    grads, params = trainer.optimizer.grad_tensors(), trainer.optimizer.param_tensors()
    destroy_topology(topo)
    return history, grads, params


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity_data")
    cfg, _ = parse_args(config_args(path, path / "unused"))
    prepare_default_data(cfg)
    return path


_references = {}


def reference(cache, tmp_path, preset, shared=()):
    """The single-process run (no process group: every group has size 1); `shared`: the
    layout's model/train overrides, which the reference runs with too."""
    key = (preset, *shared)
    if key not in _references:
        _references[key] = reference_run(config_args(cache, tmp_path / "ref", preset, shared),
                                         STEPS)
    return _references[key]


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
    ("llama", {"dp": 2, "zero": 3, "train.recompute": "full"}),
    ("gpt2", {"tp": 2, "sp": 2, "tp_sp": "true", "train.recompute": "selective"}),
    ("llama", {"pp": 2, "tp": 2, "tp_sp": "true", "train.recompute": "full"}),
]
# Settings that leave the arithmetic unchanged: the reference runs without them.
LAYOUT_ONLY = {"train.recompute", "optim.offload"}
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


def _check(cache, tmp_path, preset, layout):
    # keys with a section ("train.global_batch_size") change the model or batch, and the
    # reference with them; bare keys are parallel.* layout keys
    shared = tuple(f"--{k}={v}" for k, v in layout.items() if "." in k and k not in LAYOUT_ONLY)
    own = [f"--{k}={v}" for k, v in layout.items() if k in LAYOUT_ONLY]
    args = config_args(cache, tmp_path / "run", preset,
                       [*shared, *own,
                        *(f"--parallel.{k}={v}" for k, v in layout.items() if "." not in k)])
    results = run_on_ranks(run_layout, args)
    ref_history, ref_grads, ref_params = reference(cache, tmp_path, preset, shared)
    seen = set()
    for history, grads, params in (r for r in results if r is not None):
        seen.update(grads)
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(history, ref_history), 1):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"loss at step {step}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"grad norm at step {step}"
        for name in grads:  # a pipeline stage holds its own share of the names
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=2e-5, atol=2e-5,
                                       msg=lambda m: f"gradient of {name}: {m}")
            torch.testing.assert_close(params[name], ref_params[name], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"parameter {name}: {m}")
    assert seen == set(ref_grads)


# In CI: the TP/SP layouts, the quick pipeline ones, the ZeRO ones and the whole
# pipeline matrix (about 5 minutes of the suite on 2 cores).
@pytest.mark.parametrize("preset, layout", LAYOUTS + PIPELINE_LAYOUTS + ZERO_LAYOUTS
                         + PIPELINE_MATRIX, ids=lambda v: str(v))
def test_layout_matches_single_process(cache, tmp_path, preset, layout):
    _check(cache, tmp_path, preset, layout)


@pytest.mark.slow
@pytest.mark.parametrize("preset, layout", SLOW_LAYOUTS, ids=lambda v: str(v))
def test_full_matrix(cache, tmp_path, preset, layout):
    _check(cache, tmp_path, preset, layout)


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
