"""The layout-parity machinery: run a layout on gloo ranks, judge it against one process.

`run_layout` (on every pool rank) trains STEPS optimizer steps of the whole trainer,
then computes the gradients of one more batch; the losses, grad norms, gradients and
final parameters come back as global tensors. `reference` runs the plain PyTorch loop
of tests/reference.py on the same config and seed (cached per model/batch override).

How a layout is judged:
- float64 (`fp64_excess`): a layout only changes the order of sums (split matmuls,
  all-reduce trees), so in float64 it differs from one process by rounding, ~1e-16
  relative per operation, which Adam and 10 steps amplify to ~1e-13 at most. The
  tolerance is rtol 1e-9 plus atol 1e-9 x max|reference| (over all gradients, all
  parameters, each of the loss and grad-norm histories):
  a thousand times the rounding, and a real bug (a missed average, a wrong shard, a
  double-counted norm) is off by 1e-3 or more, six orders above it, on any CPU.
- float32 (`fp32_errors`): the relative L2 error of the losses, grad norms, gradients
  and parameters against the float64 reference. A layout's fp32 error may be at most
  FP32_FACTOR times the single-process fp32 run's own error (the plain loop in fp32
  against the same float64 reference), with FP32_FLOOR = 2^-24 (fp32's unit roundoff)
  as the smallest error we ever ask for. Both runs do the same arithmetic in other
  orders, so their error norms are draws of the same size (measured ratios 0.5-2);
  10x is margin for the spread, and no number measured on one machine enters.
"""

from __future__ import annotations

import math

import torch

from reference import reference_run
from megalite.cli import parse_args
from megalite.data.build import prepare_default_data
from megalite.parallel.topology import build_topology, destroy_topology
from megalite.training.trainer import Trainer

STEPS = 10
FP64_RTOL = FP64_ATOL = 1e-9
FP32_FACTOR = 10.0
FP32_FLOOR = 2.0 ** -24


def config_args(cache, run_dir, preset="llama", layout=(), precision="fp64"):
    # llama: 8 heads sharing 4 kv heads (GQA at every tp <= 4); gpt2: 4 heads, no GQA
    heads = ["--model.num_heads=8", "--model.num_kv_heads=4"] if preset == "llama" else \
        ["--model.num_heads=4", "--model.num_kv_heads=0"]
    return ["--model.hidden_size=64", "--model.num_layers=2", *heads, f"--model.preset={preset}",
            "--train.seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=8",
            f"--train.steps={STEPS}", "--train.eval_every=0", "--log.every=100",
            f"--train.precision={precision}",
            "--optim.warmup_steps=2", "--optim.lr=3e-3", "--optim.clip_grad=0.5",
            "--data.corpus_max_mb=0.3", "--data.vocab_size=509", f"--data.cache_dir={cache}",
            f"--run.dir={run_dir}", "--checkpoint.every=0", *layout]


def prepared_cache(tmp_path_factory, name: str, make_args=config_args):
    """A data cache with the default corpus prepared for `make_args(cache, run_dir)`'s
    tokenizer settings (each test module's config helper)."""
    path = tmp_path_factory.mktemp(name)
    cfg, _ = parse_args(make_args(path, path / "unused"))
    prepare_default_data(cfg)
    return path


def trainer_on_layout(args):
    """(topology, trainer) for the layout in `args`; (None, None) on ranks outside it."""
    cfg, _ = parse_args(args)
    p = cfg.parallel
    topo = build_topology(p.tp, p.sp, p.dp, p.pp, timeout_s=120, zero_shard=p.zero_shard)
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


# Settings that leave the arithmetic unchanged: the reference runs without them.
LAYOUT_ONLY = {"train.recompute", "optim.offload", "train.offload_activations"}


def layout_args(cache, run_dir, preset, layout, precision="fp64"):
    """(the layout's trainer arguments, the overrides its reference shares). Keys with a
    section ("train.global_batch_size") change the model or batch, and the reference with
    them; bare keys are parallel.* layout keys."""
    shared = tuple(f"--{k}={v}" for k, v in layout.items() if "." in k and k not in LAYOUT_ONLY)
    own = [f"--{k}={v}" for k, v in layout.items() if k in LAYOUT_ONLY]
    args = config_args(cache, run_dir, preset,
                       [*shared, *own, *(f"--parallel.{k}={v}" for k, v in layout.items()
                                         if "." not in k)], precision)
    return args, shared


_references = {}


def reference(cache, tmp_path, preset, shared=(), precision="fp64"):
    """The single-process run (no process group: every group has size 1); `shared`: the
    layout's model/train overrides, which the reference runs with too."""
    key = (preset, precision, *shared)
    if key not in _references:
        _references[key] = reference_run(
            config_args(cache, tmp_path / "ref", preset, shared, precision), STEPS)
    return _references[key]


def merged(results) -> tuple[list, dict, dict]:
    """One (history, grads, params) from all ranks: each pipeline stage holds its own
    share of the names; the last stage's history has the loss everyone agrees on."""
    results = [r for r in results if r is not None]
    grads, params = {}, {}
    for _, g, p in results:
        grads.update(g)
        params.update(p)
    return results[0][0], grads, params


def _largest(tensors) -> float:
    return max(t.double().abs().max().item() for t in tensors)


def fp64_excess(results, ref) -> dict[str, float]:
    """For each quantity, the worst |layout - reference| / tolerance over every rank's
    copy and every element: <= 1 passes. max|reference| is taken over all gradients
    (all parameters, each history column): some gradients are zero but for rounding
    (a gpt2 key bias cannot change the softmax), and no error is small next to those."""
    ref_history, ref_grads, ref_params = ref
    rh = torch.tensor(ref_history, dtype=torch.float64)
    scale = {"loss": _largest([rh[:, 0]]), "grad_norm": _largest([rh[:, 1]]),
             "grad": _largest(ref_grads.values()), "param": _largest(ref_params.values())}

    def excess(x: torch.Tensor, r: torch.Tensor, kind: str) -> float:
        x, r = x.double(), r.double()
        tol = FP64_RTOL * r.abs() + FP64_ATOL * scale[kind]
        return ((x - r).abs() / tol).max().item()

    worst = {"loss": 0.0, "grad_norm": 0.0}
    for history, grads, params in (r for r in results if r is not None):
        assert set(grads) <= set(ref_grads), set(grads) - set(ref_grads)
        h = torch.tensor(history, dtype=torch.float64)
        for column, name in enumerate(("loss", "grad_norm")):
            worst[name] = max(worst[name], excess(h[:, column], rh[:, column], name))
        for kind, got, want in (("grad", grads, ref_grads), ("param", params, ref_params)):
            for name in got:
                key = f"{kind} {name}"
                worst[key] = max(worst.get(key, 0.0), excess(got[name], want[name], kind))
    return worst


def fp32_errors(run, ref64) -> dict[str, float]:
    """Relative L2 error of (history, grads, params) `run` against the float64 `ref64`:
    losses, grad norms, all gradients together, all parameters together."""
    history, grads, params = run
    h, rh = torch.tensor(history, dtype=torch.float64), torch.tensor(ref64[0], dtype=torch.float64)

    def rel(pairs) -> float:
        pairs = [(x.double(), r.double()) for x, r in pairs]
        num = math.sqrt(sum(((x - r) ** 2).sum().item() for x, r in pairs))
        return num / math.sqrt(sum((r ** 2).sum().item() for _, r in pairs))

    assert set(grads) == set(ref64[1]) and set(params) == set(ref64[2])
    return {"loss": rel([(h[:, 0], rh[:, 0])]), "grad_norm": rel([(h[:, 1], rh[:, 1])]),
            "grads": rel([(grads[n], ref64[1][n]) for n in grads]),
            "params": rel([(params[n], ref64[2][n]) for n in params])}
