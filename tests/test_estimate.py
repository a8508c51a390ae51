"""The memory / FLOPs estimator, against real runs and the papers.

Real runs (CPU): the activation bytes are the storages autograd keeps for backward
(saved_tensors_hooks, deduplicated by storage, parameters left out) plus the inputs
torch.utils.checkpoint holds, measured on a forward of the model as build_model makes
it; parameters, gradients and optimizer state are ZeroOptimizer.memory_report's bytes
of its tensors; the micro-batches in flight are PipelineEngine.peak_live. Single
process for the model variants (torch ops, and the Triton kernels through the
interpreter), gloo ranks for tp / tp_sp / sp (ring, all-to-all) / pp / interleaved.
Tolerance 1%; they agree to a few bytes (the loss normaliser's scalar).

Papers: Korthikanti et al. 2022 Table 2 per-layer activations for their 22B / 175B /
530B / 1T configurations (Table 3), exactly, up to the named tensors our model keeps on
top, and within the issue's 10% for 22B at t 8 (tp, tp_sp, both selective); the 1F1B
and interleaved in-flight factors. Narayanan et al. 2021 Table 1 parameter counts (to
the published 0.1 B), the FLOPs formulas 72BslH^2(..) and 96BslH^2(..)
(exact) and the training-time estimates of section 5.1 (34 and 84 days, to 3%), and
(the planner's layouts: tests/test_planner.py). The ZeRO paper's 7.5B / 64 GPU
example (Figure 1): every stage to 0.05 GB (fp16 gradients, the ZeRO 2/3 shard too).
"""

import os
from fractions import Fraction
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported

import megalite.model.transformer as model_module  # noqa: E402
from dist_harness import run_on_ranks  # noqa: E402
from megalite.config import load_config, resolve  # noqa: E402
from megalite.planning.estimate import (activation_bytes, chunk_bytes, estimate, flops,  # noqa: E402
                               layer_items, prepare, state_bytes)
from megalite.optim.zero import ZeroOptimizer  # noqa: E402
from megalite.model.build import build_model  # noqa: E402
from megalite.parallel.sequence import shard_batch  # noqa: E402
from megalite.parallel.pipeline.engine import PipelineEngine  # noqa: E402
from megalite.planning.state import rank_params  # noqa: E402
from megalite.parallel.topology import build_topology, destroy_topology  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128
TINY = {"model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.vocab_size": VOCAB, "model.kernels": "torch",
        "train.seq_len": 32, "train.micro_batch_size": 2, "train.global_batch_size": 2,
        "train.device": "cpu"}


def tiny_config(**overrides):
    values = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    if values.get("model.preset") == "gpt2":
        values["model.num_kv_heads"] = 0
    if values.get("train.precision", "fp32") != "fp32":
        values.setdefault("train.grad_dtype", values["train.precision"])
    cfg = load_config(None, [(k, str(v)) for k, v in values.items()])
    return resolve(cfg, VOCAB, "cpu")


# ---- measuring a real forward --------------------------------------------------------
def saved_bytes(run, params=()) -> tuple[int, dict, object]:
    """Bytes of the distinct storages the forward `run()` leaves for backward: what
    autograd saves, and the inputs torch.utils.checkpoint keeps to rerun its function.
    Weights (`params`' storages, where they are at that moment: ZeRO 3 gathers them) are
    not activations. Sizes are read after the forward."""
    seen = {}

    def note(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in {q.untyped_storage().data_ptr() for q in params}:
            seen.setdefault(storage.data_ptr(), storage)

    def pack(t):
        note(t)
        return t

    original = model_module.checkpoint

    def checkpoint(fn, *args, **kwargs):
        for arg in args:
            for t in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(t, torch.Tensor):
                    note(t)
        return original(fn, *args, **kwargs)

    model_module.checkpoint = checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
    finally:
        model_module.checkpoint = original
    sizes = {ptr: storage.nbytes() for ptr, storage in seen.items()}
    return sum(sizes.values()), sizes, out


def measure_single(cfg) -> tuple[int, dict]:
    """(activation bytes of one micro-batch, memory_report) on one process."""
    topo = build_topology()
    model = build_model(cfg, topo, "cpu")
    optimizer = ZeroOptimizer(model, cfg, topo)  # casts to train.precision, owns the grads
    model.train()
    params = list(model.parameters())
    tokens = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    measured, _, _ = saved_bytes(lambda: model(tokens[:, :-1], tokens[:, 1:]), params)
    return measured, optimizer.memory_report()


def assert_state_matches(report: dict, state: dict):
    """memory_report's measured bytes == the estimator's (optimizer on the host included)."""
    assert report["params_bytes"] == state["params"]
    assert report["grads_bytes"] == state["grads"]
    assert report["optimizer_bytes"] == state["optimizer"] + state["host_optimizer"]


SINGLE = [
    {},
    {"model.attention": "eager"},
    {"model.attention": "eager", "model.dropout": 0.1},
    {"model.attention": "sdpa", "model.dropout": 0.1},
    {"train.precision": "bf16"},
    {"train.precision": "bf16", "model.attention": "eager", "model.dropout": 0.1,
     "train.recompute": "selective"},
    {"train.precision": "bf16", "model.attention": "sdpa", "model.dropout": 0.1},
    {"model.preset": "gpt2"},
    {"model.preset": "gpt2", "train.precision": "bf16", "model.attention": "eager",
     "model.dropout": 0.1},
    {"train.recompute": "full", "train.precision": "bf16", "parallel.zero": 2},
    {"train.recompute": "selective", "parallel.zero": 3, "train.precision": "bf16",
     "train.grad_dtype": "fp32"},
    {"parallel.zero": 1, "optim.offload": "cpu", "model.preset": "gpt2"},
]


@pytest.mark.parametrize("overrides", SINGLE, ids=lambda o: ",".join(
    f"{k.split('.')[1]}={v}" for k, v in o.items()) or "llama")
def test_activations_and_state_match_a_real_forward(overrides):
    cfg = tiny_config(**{k.replace(".", "__"): v for k, v in overrides.items()})
    measured, report = measure_single(cfg)
    est = prepare(cfg)
    assert chunk_bytes(est, 0)[0] == pytest.approx(measured, rel=0.01)
    assert_state_matches(report, state_bytes(est, 0))


def test_triton_kernels_activations_match():
    """The fused kernels keep less (no fp32 norm copies, flash attention without the
    s x s matrix, the loss keeps its gradient): measured through the interpreter."""
    for overrides in ({"model__kernels": "triton", "model__attention": "triton",
                       "train__precision": "bf16", "model__num_layers": 1},
                      {"model__kernels": "triton", "model__attention": "eager",
                       "model__preset": "gpt2", "model__dropout": 0.1, "model__num_layers": 1}):
        cfg = tiny_config(**overrides)
        measured, _ = measure_single(cfg)
        assert chunk_bytes(prepare(cfg), 0)[0] == pytest.approx(measured, rel=0.01)


# ---- gloo ranks: tp, tp_sp, sp (ring, all-to-all), pp (1F1B, interleaved), dp ----------
LAYOUTS = [
    # gpt2 (tied head across stages) with dropout masks under tp_sp, 1F1B, ZeRO 1
    {"model.preset": "gpt2", "model.num_kv_heads": 0, "model.attention": "eager",
     "model.dropout": 0.1, "parallel.tp": 2, "parallel.tp_sp": True, "parallel.pp": 2,
     "parallel.dp": 2, "parallel.zero": 1, "train.precision": "bf16", "train.grad_dtype": "bf16",
     "train.global_batch_size": 16},
    # ring attention with GQA inside tp, ZeRO 2 over dp x sp
    {"parallel.tp": 2, "parallel.sp": 2, "parallel.dp": 2, "parallel.zero": 2,
     "train.recompute": "selective", "train.global_batch_size": 4},
    # all-to-all attention (sdpa inside), interleaved 1F1B over 2 x 2 virtual stages
    {"model.num_layers": 4, "model.attention": "sdpa", "parallel.sp": 2,
     "parallel.sp_mode": "all_to_all", "parallel.pp": 2, "parallel.virtual_stages": 2,
     "parallel.schedule": "interleaved", "train.precision": "bf16", "train.global_batch_size": 8},
    # hybrid sharding: ZeRO 3 shards over blocks of 2 of the 4 dp ranks, 2 replicas
    {"parallel.dp": 4, "parallel.zero": 3, "parallel.zero_shard": 2,
     "train.global_batch_size": 8},
]


def measure_layout(overrides: dict):
    """On every pool rank: per-chunk activation bytes of one micro-batch (what autograd
    and the pipeline engine keep), micro-batches in flight and memory_report, next to
    the estimator's; None on ranks outside the layout."""
    cfg = tiny_config(**{k.replace(".", "__"): v for k, v in overrides.items()})
    p = cfg.parallel
    topo = build_topology(p.tp, p.sp, p.dp, p.pp, timeout_s=120, zero_shard=p.zero_shard)
    if topo is None:
        return None
    try:
        model = build_model(cfg, topo, "cpu")
        optimizer = ZeroOptimizer(model, cfg, topo)
        model.train()
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(topo.rank)
        rows = [torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.train.seq_len + 1),
                              generator=gen) for _ in range(cfg.grad_accum_steps)]
        batches = [shard_batch(r, topo, cfg) for r in rows]
        inputs, targets, positions = batches[0]
        if positions is None:
            positions = torch.arange(inputs.shape[1])
        last = p.pp * p.virtual_stages - 1
        measured = []
        for chunk in range(len(model.stage.chunks)):
            vstage = chunk * p.pp + topo.pp_rank
            x = inputs
            if vstage > 0:  # hidden states as the engine receives them
                rows_here = inputs.shape[1] // (p.tp if p.tp_sp else 1)
                x = torch.randn(inputs.shape[0], rows_here, cfg.model.hidden_size,
                                dtype=next(model.parameters()).dtype, requires_grad=True)
            total, seen, out = saved_bytes(lambda: model(
                x, targets if vstage == last else None, positions, chunk=chunk), params)
            # the engine also holds the chunk's input and output until its backward
            for held in ([x] if vstage > 0 else []) + ([out] if vstage < last else []):
                storage = held.untyped_storage()
                if storage.data_ptr() not in seen:
                    total += storage.nbytes()
                    seen[storage.data_ptr()] = storage.nbytes()
            measured.append(total)
        peak_live = 1
        if p.pp > 1:
            optimizer.zero_grad()
            engine = PipelineEngine(model, topo, p.tp if p.tp_sp else 1)
            engine.run(p.schedule, batches, [1.0 / len(batches)] * len(batches))
            optimizer.prepare_step()
            peak_live = engine.peak_live
        est = prepare(cfg)
        return {"measured": measured, "estimated": chunk_bytes(est, topo.pp_rank),
                "peak_live": peak_live, "in_flight": activation_bytes(est, topo.pp_rank)[1],
                "report": optimizer.memory_report(), "state": state_bytes(est, topo.pp_rank)}
    finally:
        destroy_topology(topo)


@pytest.mark.parametrize("overrides", LAYOUTS, ids=["gpt2-tp_sp-pp-zero1", "ring-tp-zero2",
                                                    "a2a-interleaved", "zero3-hybrid"])
def test_layouts_match_real_ranks(overrides):
    results = [r for r in run_on_ranks(measure_layout, overrides) if r is not None]
    for r in results:
        for measured, estimated in zip(r["measured"], r["estimated"]):
            assert estimated == pytest.approx(measured, rel=0.01)
        assert r["in_flight"] == r["peak_live"]
        assert_state_matches(r["report"], r["state"])


# ---- Korthikanti et al. 2022 ------------------------------------------------------------
def paper_config(heads, hidden, layers, tp=1, pp=1, micro=1, batch=1, **overrides):
    """A GPT of the papers (vocabulary 51200, sequence 2048) as our gpt2 preset on a GPU:
    fp16-class precision, dropout, eager attention (the s x s matrix is stored)."""
    values = {"model.preset": "gpt2", "model.num_heads": heads, "model.num_kv_heads": 0,
              "model.hidden_size": hidden, "model.num_layers": layers,
              "model.vocab_size": 51200, "model.dropout": 0.1, "model.attention": "eager",
              "model.kernels": "triton", "train.seq_len": 2048, "train.precision": "bf16",
              "train.grad_dtype": "bf16", "train.device": "cuda", "parallel.tp": tp,
              "parallel.pp": pp, "train.micro_batch_size": micro,
              "train.global_batch_size": batch, **overrides}
    return prepare(load_config(None, [(k, str(v)) for k, v in values.items()]))


# Table 3: heads, hidden, layers, tp, pp, micro-batch, global batch
KORTHIKANTI = {"22B": (64, 6144, 48, 8, 1, 4, 4), "175B": (96, 12288, 96, 8, 8, 1, 64),
               "530B": (128, 20480, 105, 8, 35, 1, 280), "1T": (160, 25600, 128, 8, 64, 1, 512)}


def korthikanti_layer(s, b, h, a, t, sp, recompute) -> Fraction:
    """Table 2: activation bytes per layer (16-bit tensors, 1-byte dropout masks)."""
    sbh, attention = Fraction(s * b * h), Fraction(5 * a * s, h * t)
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    if recompute == "selective":
        attention = 0
    if t == 1:
        return sbh * (34 + attention)
    return sbh * (Fraction(34, t) + attention) if sp else sbh * (10 + Fraction(24, t) + attention)


@pytest.mark.parametrize("name", KORTHIKANTI)
@pytest.mark.parametrize("tp,sp,recompute", [(1, False, "none"), (8, False, "none"),
                                             (8, True, "none"), (8, False, "selective"),
                                             (8, True, "selective"), (8, False, "full"),
                                             (8, True, "full")])
def test_gpt2_layer_is_korthikanti_table2_plus_named_extras(name, tp, sp, recompute):
    a, h, layers, _, _, b, batch = KORTHIKANTI[name]
    cfg = paper_config(a, h, layers, tp=tp, micro=b, batch=batch,
                       **{"parallel.tp_sp": sp, "train.recompute": recompute})
    s = 2048
    extras = 0
    if recompute != "full":
        rows = s * b // (tp if sp else 1)
        extras += 2 * 8 * rows  # LayerNorm mean and rstd (fp32), two norms
    if recompute == "none":
        extras += s * s  # the causal mask
    expected = korthikanti_layer(s, b, h, a, tp, sp, recompute) + extras
    assert sum(layer_items(cfg).values()) == expected


@pytest.mark.parametrize("sp,recompute", [(False, "none"), (True, "none"),
                                          (False, "selective"), (True, "selective")],
                         ids=["tp", "tp_sp", "tp-selective", "tp_sp-selective"])
def test_gpt2_layer_within_10_percent_of_korthikanti_22b(sp, recompute):
    """The issue's bound under the paper's assumptions: their 22B GPT (h 6144, a 64,
    s 2048, b 4), t 8, fp16, dropout 0.1, eager attention."""
    a, h, layers, tp, _, b, batch = KORTHIKANTI["22B"]
    cfg = paper_config(a, h, layers, tp=tp, micro=b, batch=batch, **{
        "train.precision": "fp16", "train.grad_dtype": "fp16", "parallel.tp_sp": sp,
        "train.recompute": recompute})
    paper = korthikanti_layer(2048, b, h, a, tp, sp, recompute)
    assert sum(layer_items(cfg).values()) == pytest.approx(float(paper), rel=0.10)


@pytest.mark.parametrize("name", ["175B", "530B", "1T"])
def test_first_stage_holds_korthikanti_in_flight_micro_batches(name):
    """1F1B: the first stage keeps pp micro-batches of L/pp layers, L layers' worth, plus
    per micro-batch the embedding's ids and dropout mask (their sbhp/t) and the stage
    output the engine holds until its backward (2sbh/t). Interleaved over v chunks:
    (1 + (pp - 1) / (pp * v)) times the layers (their section 4.2.3)."""
    a, h, layers, tp, pp, b, batch = KORTHIKANTI[name]
    cfg = paper_config(a, h, layers, tp, pp, b, batch, **{"parallel.tp_sp": True,
                                                          "train.recompute": "selective"})
    per_layer = sum(layer_items(cfg).values())
    activations, in_flight = activation_bytes(cfg, 0)
    assert in_flight == pp
    s = 2048
    embedding = 9 * s * b + 8 * s + s * b * h // tp  # ids, positions, 1-byte dropout mask
    output = 2 * s * b * h // tp
    assert activations == layers * per_layer + pp * (embedding + output)
    # ~ L layers: the mask and the held output add 3sbh/t a micro-batch, (p/L)(3/34)
    # of the layers (4.4% at 1T)
    assert activations == pytest.approx(layers * per_layer, rel=0.05)
    if name == "175B":
        v = 2
        cfg = paper_config(a, h, layers, tp, pp, b, batch, **{
            "parallel.tp_sp": True, "parallel.virtual_stages": v,
            "parallel.schedule": "interleaved"})
        _, in_flight = activation_bytes(cfg, 0)
        assert in_flight * Fraction(layers, pp * v) == layers * (1 + Fraction(pp - 1, pp * v))


# ---- Narayanan et al. 2021 ----------------------------------------------------------------
# Table 1: published parameters (billions), heads, hidden, layers, tp, pp, GPUs, batch
NARAYANAN = [(1.7, 24, 2304, 24, 1, 1, 32, 512), (3.6, 32, 3072, 30, 2, 1, 64, 512),
             (7.5, 32, 4096, 36, 4, 1, 128, 512), (18.4, 48, 6144, 40, 8, 1, 256, 1024),
             (39.1, 64, 8192, 48, 8, 2, 512, 1536), (76.1, 80, 10240, 60, 8, 4, 1024, 1792),
             (145.6, 96, 12288, 80, 8, 8, 1536, 2304), (310.1, 128, 16384, 96, 8, 16, 1920, 2160),
             (529.6, 128, 20480, 105, 8, 35, 2520, 2520),
             (1008.0, 160, 25600, 128, 8, 64, 3072, 3072)]


@pytest.mark.parametrize("row", NARAYANAN, ids=lambda r: f"{r[0]}B")
def test_narayanan_table1_parameters_and_flops(row):
    billions, a, h, l, _, _, _, batch = row
    cfg = paper_config(a, h, l, micro=batch, batch=batch)
    # their P = 12lh^2 (1 + 13/(12h) + (V+s)/(12lh)); ours adds the final norm's 2h
    assert estimate(cfg, exact=False)["param_count"] / 1e9 == pytest.approx(billions, abs=0.05)
    s, V = 2048, 51200
    model = 72 * batch * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
    assert flops(cfg)["flops_per_iteration"] == pytest.approx(model, rel=1e-12)
    cfg.train.recompute = "full"
    hardware = 96 * batch * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    assert flops(cfg)["hardware_flops_per_iteration"] == pytest.approx(hardware, rel=1e-12)


def test_narayanan_training_time_estimates():
    """Section 5.1: GPT-3 175B on 300B tokens, 1024 GPUs at 140 TFLOP/s: 34 days; 1T on
    450B tokens, 3072 GPUs at 163 TFLOP/s: 84 days (with recomputation)."""
    for (a, h, l), tokens, gpus, tflops, days in (((96, 12288, 96), 300e9, 1024, 140, 34),
                                                  ((160, 25600, 128), 450e9, 3072, 163, 84)):
        cfg = paper_config(a, h, l, **{"train.recompute": "full"})
        per_token = flops(cfg)["hardware_flops_per_iteration"] / 2048
        assert per_token * tokens / (gpus * tflops * 1e12) / 86400 == pytest.approx(days, rel=0.03)


# ---- the ZeRO paper (Rajbhandari et al. 2020), Figure 1: 7.5B parameters, 64 GPUs -------
def test_zero_paper_figure1():
    cfg = paper_config(32, 4096, 36, **{"parallel.dp": 64, "train.global_batch_size": 64})
    paper = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}  # GB per GPU: (2 + 2 + 12) * 7.5e9 ...
    for zero, published in paper.items():
        cfg.parallel.zero = zero
        state = state_bytes(cfg, 0, exact=False)
        per_param = (state["params"] + state["grads"] + state["optimizer"]) / state["psi"]
        # fp16 gradients: the ZeRO 2/3 shard is in grad_dtype, 2 bytes as in the paper
        assert per_param * 7.5 == pytest.approx(published, abs=0.05)


def test_hybrid_sharding_divides_state_by_the_shard_size():
    """dp = 4, zero_shard = 2: every ZeRO 3 term is (Psi + padding) / 2, the padding that of
    buckets (one per layer unit) padded to multiples of 2 x 64 elements, not / 4."""
    cfg = prepare(tiny_config(parallel__dp=4, parallel__zero=3, parallel__zero_shard=2,
                              train__global_batch_size=8))
    shapes = rank_params(cfg, 0)
    units = [sum(k for i, k in shapes if i is None),
             *(sum(k for i, k in shapes if i == layer) for layer in range(2))]

    def shard(n):  # elements of one rank's shard, each unit padded to a multiple of n * 64
        return sum(-(-u // (n * 64)) * n * 64 for u in units) // n

    state = state_bytes(cfg, 0)
    for n, matches in ((2, True), (4, False)):  # fp32: moments only, no separate master
        formula = {"params": 4 * shard(n), "grads": 4 * shard(n), "optimizer": 8 * shard(n)}
        assert ({k: state[k] for k in formula} == formula) == matches
    assert (state["zero_shard_size"], state["zero_replicas"]) == (2, 2)
    result = estimate(cfg)
    assert (result["zero_shard_size"], result["zero_replicas"]) == (2, 2)


# ---- the planner ------------------------------------------------------------------------
