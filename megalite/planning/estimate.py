"""Memory and FLOPs of one training step as this code base runs it (pure functions).

`estimate(cfg)` gives, for a config and its layout, the parameter count, the model and
hardware FLOPs of one global batch, and the bytes each pipeline stage holds per rank:

- params / grads / optimizer (megalite/planning/state.py): ZeroOptimizer's flat buffers, bucket
  padding included by laying the rank's parameters out with the same `BucketLayout`:
  model-dtype parameters, gradients in train.grad_dtype (a shard of them under ZeRO 2/3),
  8 bytes of Adam moments plus a 4-byte fp32 master when the model is not fp32.
  ZeRO 1 shards the optimizer over N ranks, 2 also the gradients, 3 also the
  parameters (the ZeRO paper's Psi / N terms). N = dp * sp, or parallel.zero_shard
  under hybrid sharding (the shards replicated over dp * sp / N blocks); the estimate
  names both (`zero_shard_size`, `zero_replicas`).
- activations: every tensor autograd keeps for backward, itemised from what
  model.py, parallel/tensor.py, parallel/sequence.py and the kernels really save
  (`layer_items`), times the micro-batches in flight on that stage, found by running
  the schedule functions of parallel/pipeline.py. What a tensor costs depends on the
  device (a CPU dropout mask is model dtype, a CUDA one a byte; CPU sdpa with dropout
  is the fp32 math path) and the kernels (torch reference ops keep fp32 copies).
- buffers: transients alive at the backward peak: ZeRO 3's gathered blocks, the
  gradient bucket buffers, one layer's recomputation, the head's logits, p2p buffers,
  under tp_sp the input a column group gathers again in backward.

The gpt2 preset with dropout and eager attention stores Korthikanti et al. (2022)
Table 2's tensors plus two named extras (norm statistics, the causal mask); tests/test_estimate.py checks that to the byte. FLOPs follow Narayanan et al.
(2021): model FLOPs are metrics.flops_per_token's, hardware FLOPs add the recomputed
forward.
"""

from __future__ import annotations

import copy
from functools import lru_cache

from megalite.config import Config, resolve
from megalite.errors import ConfigError
from megalite.training.metrics import flops_per_token
from megalite.planning.state import (BYTES, vocab_rows, param_count, stage_layers,
                                     state_bytes, zero_groups)
from megalite.parallel.pipeline.schedules import SCHEDULES, most_waiting
from megalite.parallel.sequence import check_sp_layout
from megalite.parallel.tensor import check_tp_layout

MEMORY_KEYS = ("params", "grads", "optimizer", "activations", "buffers")


def prepare(cfg: Config, check: bool = True) -> Config:
    """A resolved copy of `cfg` for estimation, its layout checked like build_model does
    (unless not `check`: the planner replaces the layout).

    No tokenizer is read: model.vocab_size must be given. The device is train.device,
    or cuda when that is auto (kernels and attention then resolve as on a GPU)."""
    cfg = copy.deepcopy(cfg)
    if not cfg.model.vocab_size:
        raise ConfigError("model.vocab_size is 0: the estimator reads no tokenizer, so give "
                          "the vocabulary size, e.g. --model.vocab_size=32000.")
    resolve(cfg, cfg.model.vocab_size, "cuda" if cfg.train.device == "auto" else cfg.train.device)
    if check:
        check_layout(cfg)
    return cfg


def check_layout(cfg: Config) -> None:
    """Raise ConfigError for a layout the model cannot be built in (parallel/build.py)."""
    m, p, seq = cfg.model, cfg.parallel, cfg.train.seq_len
    check_tp_layout(m, p.tp, seq // p.sp if p.tp_sp else None)
    check_sp_layout(seq, m.num_heads, m.num_kv_heads, p.sp, p.sp_mode, p.tp)
    if p.sp > 1 and m.dropout > 0:
        raise ConfigError(f"model.dropout={m.dropout} with parallel.sp={p.sp} is not supported; "
                          f"set --model.dropout=0 or --parallel.sp=1.")
    if p.zero == 3 and p.pp > 1:
        raise ConfigError("zero 3 with pp > 1 is not supported; use --parallel.zero=2.")


# ---- activations ---------------------------------------------------------------------
class _Shape:
    """Sizes of one micro-batch's tensors on one rank."""

    def __init__(self, cfg: Config):
        m, p, t = cfg.model, cfg.parallel, cfg.train
        self.gpt2, self.sp, self.sp_mode = m.preset == "gpt2", p.sp, p.sp_mode
        self.b, self.seq, self.h = t.micro_batch_size, t.seq_len, m.hidden_size
        self.s = t.seq_len // p.sp  # this rank's piece of every sequence
        self.tokens = self.b * self.s  # rows of a column layer's (gathered) input
        self.rows = self.tokens // p.tp if p.tp_sp else self.tokens  # rows of the residual stream
        self.d = m.hidden_size // m.num_heads
        self.heads, self.kv_heads = m.num_heads // p.tp, m.num_kv_heads // p.tp
        self.ffn, self.vocab, self.tp = m.ffn_hidden_size // p.tp, vocab_rows(cfg), p.tp
        self.e = BYTES[t.precision]
        self.cuda = t.device == "cuda"
        self.mask = 1 if self.cuda else self.e  # CUDA dropout keeps a bool mask, CPU a scaled one
        self.dropout = m.dropout > 0
        self.attention, self.triton = m.attention, m.kernels == "triton"
        # Triton norms save their input itself; so does the torch one in fp32, where
        # x.float() is x. Then the block input costs nothing extra to a pipeline stage.
        self.keeps_input = self.triton or self.e == 4


def _norm(x: _Shape, name: str) -> dict:
    rows, h, layer = x.rows, x.h, x.gpt2
    stats = 4 * rows * (2 if layer else 1)  # mean and rstd, or rstd
    if x.triton:
        return {f"{name}_input": x.e * rows * h, f"{name}_stats": stats}
    items = {f"{name}_input": 4 * rows * h, f"{name}_stats": stats}  # x.float()
    if not layer:
        items[f"{name}_normalized"] = 4 * rows * h  # x * rsqrt, before the weight
    if x.e != 4:
        items[f"{name}_weight_fp32"] = 4 * h * (2 if layer else 1)
    return items


def _attention_op(x: _Shape, heads: int, kv_heads: int, seq: int) -> dict:
    """What the attention op keeps for q [b, heads, seq, d] and k/v [b, kv_heads, seq, d]."""
    e, b, d = x.e, x.b, x.d
    rows, scores = b * seq, b * heads * seq * seq
    q, kv, lse = e * rows * heads * d, e * rows * kv_heads * d, 4 * b * heads * seq
    if x.attention == "eager":  # model.eager_attention: repeated k/v, softmax saved in e
        items = {"q": q, "k": q, "v": q, "causal_mask": seq * seq, "softmax": e * scores}
        if x.dropout:
            items.update(softmax_dropout_mask=x.mask * scores, softmax_dropout=e * scores)
        return items
    # Torch's fused SDPA kernels return [b, seq, heads, d] memory (on CPU only for such
    # inputs: not after the Triton rotary), so the output they keep is also o_proj's
    # input ("attn_out"); the Triton attention kernel's output needs a copy.
    out = "attn_out" if x.cuda or x.gpt2 or not x.triton else "core_out"
    if x.dropout:  # torch SDPA with dropout (model.Attention._core)
        if x.cuda and (e != 4 or heads == kv_heads):  # flash / memory-efficient kernel
            return {"q": q, "k": kv, "v": kv, out: q, "lse": lse}
        # the math path, in fp32 on CPU, with a float mask
        return {"q": 4 * rows * heads * d, "k": 4 * rows * heads * d, "v": 4 * rows * heads * d,
                "softmax": 4 * scores, "softmax_dropout_mask": 4 * scores,
                "softmax_dropout": 4 * scores}
    if x.attention == "sdpa":  # kernels.reference.attention repeats k/v for GQA first
        return {"q": q, "k": q, "v": q, out: q, "lse": lse}
    return {"q": q, "k": kv, "v": kv, "core_out": q, "lse": lse}


def _attention_core(x: _Shape, selective: bool) -> dict:
    e, t = x.e, x.tokens
    if selective:  # checkpoint(_core, q, k, v): only its inputs stay
        return {"q": e * t * x.heads * x.d, "k": e * t * x.kv_heads * x.d,
                "v": e * t * x.kv_heads * x.d}
    if x.sp > 1 and x.sp_mode == "ring":  # sequence._RingAttention
        return {"q": e * t * x.heads * x.d, "k": e * t * x.kv_heads * x.d,
                "v": e * t * x.kv_heads * x.d, "core_out": e * t * x.heads * x.d,
                "lse": 4 * x.b * x.heads * x.s}
    if x.sp > 1:  # all-to-all: sp-th of the heads over the whole sequence, then back
        items = _attention_op(x, x.heads // x.sp, x.kv_heads // x.sp, x.seq)
        if "attn_out" in items:
            items["core_out"] = items.pop("attn_out")
        return items
    return _attention_op(x, x.heads, x.kv_heads, x.s)


def layer_items(cfg: Config, recompute: str | None = None) -> dict:
    """Bytes autograd keeps for one transformer block and one micro-batch on a rank,
    by tensor. `recompute` defaults to train.recompute."""
    x = _Shape(cfg)
    recompute = recompute or cfg.train.recompute
    e, t, rows, h = x.e, x.tokens, x.rows, x.h
    if recompute == "full":  # checkpoint(block, x, rope) keeps the block input only
        return {"block_input": e * rows * h}
    items = _norm(x, "attn_norm")
    # A fused column layer (q/k/v, gate/up) or c_fc saves its input once: the norm
    # output, under tp_sp only this rank's sequence shard (parallel/column_linear.py
    # gathers it again in backward, as Megatron does).
    items["qkv_input"] = e * rows * h
    if not x.gpt2 and not x.triton and e != 4:
        items["rope_cast"] = 2 * e * x.s * x.d  # cos/sin cast to the model dtype
    items.update(_attention_core(x, recompute == "selective"))
    items.setdefault("attn_out", e * t * x.heads * x.d)  # o_proj input, a transposed copy
    if x.dropout:
        items["attn_dropout_mask"] = x.mask * rows * h
    items.update(_norm(x, "mlp_norm"))
    items["mlp_input"] = e * rows * h
    if x.gpt2:
        items.update(mlp_hidden=e * t * x.ffn, mlp_act=e * t * x.ffn)  # gelu in, c_proj in
    else:  # gate, up, silu(gate) (torch ops only), down_proj input
        items.update(mlp_gate=e * t * x.ffn, mlp_up=e * t * x.ffn, mlp_act=e * t * x.ffn)
        if not x.triton:
            items["mlp_silu"] = e * t * x.ffn
    if x.dropout:
        items["mlp_dropout_mask"] = x.mask * rows * h
    return items


def embedding_items(cfg: Config) -> dict:
    """First virtual stage: token ids, positions, embedding dropout mask."""
    x = _Shape(cfg)
    if x.tp > 1:  # vocab-parallel lookup: masked ids (int64) and the outside mask
        items = {"token_ids": 9 * x.tokens}
    else:  # the lookup keeps the ids tensor; with sp == 1 a view of the [b, s+1] rows
        items = {"token_ids": 8 * x.b * (x.s + (1 if x.sp == 1 else 0))}
    if x.gpt2:  # under tp_sp a contiguous slice of the same arange
        items["position_ids"] = 8 * x.s
    if x.dropout:
        items["embedding_dropout_mask"] = x.mask * x.rows * x.h
    return items


def head_items(cfg: Config) -> dict:
    """Last virtual stage: final norm, head input and what the loss keeps."""
    x = _Shape(cfg)
    items = _norm(x, "final_norm")
    items["head_input"] = x.e * x.rows * x.h  # under tp_sp the shard (column_linear.py)
    if x.triton:  # the fused loss (vocab-parallel too) computes and keeps d(loss)/d(logits)
        items["logits_grad"] = x.e * x.tokens * x.vocab
    elif x.tp > 1:  # parallel.tensor's torch vocab-parallel cross-entropy
        items.update(logits=x.e * x.tokens * x.vocab, loss_stats=14 * x.tokens)
    else:
        items.update(log_softmax=4 * x.tokens * x.vocab, targets=8 * x.tokens)
    return items


def chunk_bytes(cfg: Config, pp_rank: int) -> list[int]:
    """Activation bytes of one micro-batch in each local chunk of a pipeline rank."""
    x, p = _Shape(cfg), cfg.parallel
    full = cfg.train.recompute == "full"
    # offloaded blocks keep their saved tensors in host memory (host_activation_bytes)
    per_layer = 0 if cfg.train.offload_activations else sum(layer_items(cfg).values())
    last = p.pp * p.virtual_stages - 1
    out = []
    for chunk, layers in enumerate(stage_layers(cfg, pp_rank)):
        vstage = chunk * p.pp + pp_rank
        total = len(layers) * per_layer
        if not x.gpt2 and (x.keeps_input or full):
            total += 8 * x.s * x.d  # the chunk's fp32 rope tables, shared by its blocks
        if vstage == 0:
            total += sum(embedding_items(cfg).values())
        if vstage == last:
            total += sum(head_items(cfg).values())
        boundary = x.e * x.rows * x.h
        if vstage > 0 and not (x.keeps_input or full):
            total += boundary  # the received input the engine holds (no block keeps it)
        if vstage < last and p.pp > 1:
            total += boundary  # the chunk's output, held by the engine until its backward
        out.append(total)
    return out


@lru_cache(maxsize=4096)
def _peak(schedule: str, m: int, pp: int, rank: int, v: int, weights: tuple) -> int:
    """Most bytes alive at once while `rank` runs the schedule: a forward of chunk c adds
    weights[c] until its backward."""
    if pp == 1:  # the trainer runs micro-batches one after the other
        return max(weights)
    live = peak = 0
    for kind, chunk, _ in SCHEDULES[schedule](m, pp, rank, v):
        live += weights[chunk] if kind == "F" else -weights[chunk]
        peak = max(peak, live)
    return peak


def activation_bytes(cfg: Config, pp_rank: int) -> tuple[int, int]:
    """(peak activation bytes, chunk-micro-batches in flight at most) of a rank."""
    chunks = tuple(chunk_bytes(cfg, pp_rank))
    schedule, m = cfg.parallel.schedule, cfg.grad_accum_steps
    args = (schedule, m, cfg.parallel.pp, pp_rank, cfg.parallel.virtual_stages)
    return _peak(*args, chunks), _peak(*args, (1,) * len(chunks))


def buffer_bytes(cfg: Config, pp_rank: int, state: dict, exact: bool = True) -> dict:
    """Transients at the backward peak, by name (state: `state_bytes` of the rank)."""
    x, p = _Shape(cfg), cfg.parallel
    out = dict(state["buffers"])
    recompute = cfg.train.recompute
    if recompute != "none":  # the layer being recomputed in backward
        out["recompute"] = (sum(layer_items(cfg, "none").values()) -
                            sum(layer_items(cfg, recompute).values()))
    if p.tp > 1 and p.tp_sp:  # a column layer's backward gathers its saved shard again
        out["column_regather"] = x.e * x.tokens * x.h
    if pp_rank == p.pp - 1:  # logits, and the torch loss's fp32 working copy (the Triton
        # kernels stream the logits: no [tokens, vocab] fp32 tensor)
        out["head_logits"] = (x.e + (0 if x.triton else 4)) * x.tokens * x.vocab
    if cfg.train.offload_activations:  # the block being run, or brought back for backward
        out["offloaded_block"] = sum(layer_items(cfg).values())
    if p.pp > 1:  # the receives waiting for their action, and a gradient send in flight
        # the planner (not exact) takes the most seen over pp <= 8, v <= 4, m <= 4 pp
        # (test_nccl_rules) instead of building a timetable for every candidate
        waiting = (most_waiting(p.schedule, cfg.grad_accum_steps, p.pp, p.virtual_stages)[pp_rank]
                   if exact else (4 if p.virtual_stages > 1 else 2))
        out["p2p"] = (waiting + 1) * x.e * x.rows * x.h
    return out


# ---- FLOPs and the whole estimate -------------------------------------------------------
def flops(cfg: Config) -> dict:
    """Model FLOPs (MFU's numerator, metrics.flops_per_token) of one global batch, and
    hardware FLOPs: the model's plus the forward recomputation does again."""
    m, t = cfg.model, cfg.train
    per_token = flops_per_token(m, t.seq_len)
    blocks_forward = (per_token - 6.0 * m.hidden_size * m.vocab_size) / 3
    extra = {"none": 0.0, "selective": 4.0 * m.num_layers * t.seq_len * m.hidden_size,
             "full": blocks_forward}[t.recompute]
    tokens = t.global_batch_size * t.seq_len
    return {"flops_per_token": per_token, "flops_per_iteration": per_token * tokens,
            "hardware_flops_per_iteration": (per_token + extra) * tokens}


def stage_memory(cfg: Config, pp_rank: int, exact: bool = True) -> dict:
    """Bytes per rank of pipeline stage `pp_rank`, by kind, with the buffers by name."""
    state = state_bytes(cfg, pp_rank, exact)
    activations, in_flight = activation_bytes(cfg, pp_rank)
    host_activations = 0
    if cfg.train.offload_activations:  # every block of every micro-batch in flight
        layers = [len(c) for c in stage_layers(cfg, pp_rank)]
        host_activations = _peak(cfg.parallel.schedule, cfg.grad_accum_steps, cfg.parallel.pp,
                                 pp_rank, cfg.parallel.virtual_stages,
                                 tuple(n * sum(layer_items(cfg).values()) for n in layers))
    buffers = buffer_bytes(cfg, pp_rank, state, exact)
    memory = {"params": state["params"], "grads": state["grads"],
              "optimizer": state["optimizer"], "activations": activations,
              "buffers": sum(buffers.values())}
    memory = {k: int(v) for k, v in memory.items()}
    memory["total"] = sum(memory.values())
    return {"pp_rank": pp_rank, "memory_bytes": memory, "buffers": buffers,
            "params_per_rank": state["psi"], "host_optimizer_bytes": int(state["host_optimizer"]),
            "host_activation_bytes": int(host_activations),
            "micro_batches_in_flight": in_flight}


def estimate(cfg: Config, exact: bool = True) -> dict:
    """The whole estimate of a prepared config (`prepare`): the most loaded pipeline
    stage's memory per rank, every stage's, the activation items and the FLOPs.
    `exact=False` (the planner) skips the bucket padding and looks at the first and
    last stage only, the only ones holding more than the others."""
    p = cfg.parallel
    ranks = range(p.pp) if exact else sorted({0, p.pp - 1})
    stages = [stage_memory(cfg, r, exact) for r in ranks]
    worst = max(stages, key=lambda st: st["memory_bytes"]["total"])
    shard, replicas = zero_groups(cfg)
    return {"param_count": param_count(cfg), **flops(cfg),
            "zero_shard_size": shard, "zero_replicas": replicas,
            "memory_bytes": worst["memory_bytes"], "most_loaded_stage": worst["pp_rank"],
            "stages": stages,
            "activation_items": {"layer": layer_items(cfg), "embedding": embedding_items(cfg),
                                 "head": head_items(cfg)}}
