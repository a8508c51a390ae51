"""Validation of a Config: each value, and the combinations that cannot work.

`validate(cfg)` raises ConfigError with the key, the value and the fix, so a mistake
fails before any work starts; `CHOICES` lists the keys that take one of a few words.
"""

from __future__ import annotations

import difflib

from megalite.errors import ConfigError
from megalite.parallel.pipeline.stage import layer_counts

CHOICES = {
    "model.preset": ("llama", "gpt2"),
    "model.attention": ("eager", "sdpa", "triton", "auto"),
    "model.kernels": ("torch", "triton", "auto"),
    "parallel.sp_mode": ("ring", "all_to_all"),
    "parallel.schedule": ("gpipe", "1f1b", "interleaved"),
    "train.precision": ("fp32", "bf16", "fp16", "fp64"),
    "train.grad_dtype": ("fp32", "bf16", "fp16", "fp64"),
    "train.recompute": ("none", "selective", "full"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.schedule": ("constant", "cosine", "wsd"),
    "optim.offload": ("none", "cpu"),
}


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid: {', '.join(sorted(options))}."


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg) -> None:
    """Check values and combinations; raise ConfigError with the fix."""
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in options, f"config key '{key}' got '{value}'; it must be one of "
                                 f"{', '.join(options)}.{closest(str(value), options)}")
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    _check(p.dp != "auto", "parallel.dp=auto is decided by the number of ranks started; "
                           "this config was never launched, so give parallel.dp=N.")
    for key in ("model.hidden_size", "model.num_layers", "model.num_heads", "train.steps",
                "train.seq_len", "train.micro_batch_size", "train.global_batch_size",
                "parallel.tp", "parallel.pp", "parallel.dp", "parallel.sp",
                "parallel.virtual_stages", "parallel.vocab_pad_multiple", "log.every", "checkpoint.keep",
                "train.guard_window"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value >= 1, f"config key '{key}' got {value}; it must be at least 1.")
    for key in ("model.num_kv_heads", "model.ffn_hidden_size", "model.vocab_size",
                "model.max_seq_len", "checkpoint.every", "train.eval_every",
                "optim.warmup_steps", "train.eval_batches"):
        section, name = key.split(".")
        _check(getattr(getattr(cfg, section), name) >= 0,
               f"config key '{key}' must be >= 0 (0 means automatic or off).")
    _check(not t.eval_every or t.eval_batches >= 1,
           f"train.eval_every={t.eval_every} validates, but train.eval_batches=0 reads nothing; "
           f"give train.eval_batches >= 1 or set train.eval_every=0.")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; "
           f"choose num_heads that divides hidden_size.")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0, f"model.num_heads={m.num_heads} is not a multiple of "
                                  f"model.num_kv_heads={kv}; grouped-query attention needs it.")
    _check(m.preset == "llama" or kv == m.num_heads,
           "model.num_kv_heads differs from num_heads, but the gpt2 preset has no grouped-query "
           "attention; use --model.preset=llama or drop num_kv_heads.")
    _check((m.hidden_size // m.num_heads) % 2 == 0 or m.preset != "llama",
           "rotary embeddings need an even head dimension (hidden_size / num_heads).")
    _check(m.max_seq_len == 0 or m.max_seq_len >= t.seq_len,
           f"model.max_seq_len={m.max_seq_len} is shorter than train.seq_len={t.seq_len}.")
    per_step = t.micro_batch_size * p.dp
    _check(t.global_batch_size % per_step == 0,
           f"train.global_batch_size={t.global_batch_size} is not a multiple of "
           f"micro_batch_size * dp = {t.micro_batch_size} * {p.dp} = {per_step}; "
           f"set it to a multiple, e.g. {per_step * max(1, round(t.global_batch_size / per_step))}.")
    if p.pp > 1 or p.virtual_stages > 1:
        layer_counts(m.num_layers, p.pp, p.virtual_stages, p.stage_layers)
        micro = t.global_batch_size // per_step if t.global_batch_size % per_step == 0 else 0
        _check(p.virtual_stages == 1 or p.schedule == "interleaved",
               f"parallel.virtual_stages={p.virtual_stages} needs --parallel.schedule=interleaved.")
        _check(p.schedule != "interleaved" or (p.pp > 1 and p.virtual_stages > 1),
               "parallel.schedule=interleaved needs parallel.pp > 1 and parallel.virtual_stages > 1.")
        _check(micro == 0 or micro >= p.pp,
               f"{micro} micro-batches per step (global_batch_size / (micro_batch_size * dp)) "
               f"are fewer than parallel.pp={p.pp}: a pipeline needs at least pp; raise "
               f"train.global_batch_size or lower micro_batch_size.")
        _check(micro == 0 or p.schedule != "interleaved" or micro % p.pp == 0,
               f"interleaved 1F1B runs micro-batches in groups of pp: {micro} micro-batches per "
               f"step is not a multiple of parallel.pp={p.pp}; change global_batch_size or use "
               f"--parallel.schedule=1f1b.")
    _check(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s} must be > 0 seconds.")
    _check(cfg.run.stop_window_s >= 1, f"run.stop_window_s={cfg.run.stop_window_s} must be at "
                                       f"least 1 second: a terminal's and a scheduler's copies "
                                       f"of one stop signal arrive within it.")
    _check(cfg.run.max_restarts >= 0, f"run.max_restarts={cfg.run.max_restarts} must be >= 0 "
                                      f"(0: a failure ends the run).")
    _check(0 <= p.zero <= 3, f"parallel.zero={p.zero} must be 0, 1, 2 or 3.")
    _check(p.zero != 3 or p.pp == 1,
           f"zero 3 with pp > 1 is not supported (parallel.pp={p.pp}); use zero 1 or 2 "
           f"(--parallel.zero=2) with pipeline parallelism.")
    _check(p.zero_shard >= 0 and (p.zero_shard == 0 or (p.dp * p.sp) % p.zero_shard == 0),
           f"parallel.zero_shard={p.zero_shard} must divide dp x sp = {p.dp * p.sp} (0: one "
           f"shard over all of them): a shard spans zero_shard ranks, replicated over the rest.")
    _check(p.zero > 0 or p.zero_shard in (0, p.dp * p.sp),
           f"parallel.zero_shard={p.zero_shard} with parallel.zero=0: ZeRO 0 shards nothing; "
           f"use --parallel.zero=1, 2 or 3 for hybrid sharding, or drop zero_shard.")
    _check(p.bucket_mb > 0, f"parallel.bucket_mb={p.bucket_mb} must be > 0 (MiB per gradient "
                            f"bucket; a huge value gives one bucket).")
    _check(0 <= t.loss_scale_init_pow <= 64,
           f"train.loss_scale_init_pow={t.loss_scale_init_pow} must be in [0, 64] (the initial "
           f"fp16 loss scale is 2**this; 16 is usual).")
    _check(t.loss_scale_window >= 1, f"train.loss_scale_window={t.loss_scale_window} must be "
                                     f">= 1 (steps without overflow before the scale doubles).")
    _check(t.loss_scale_hysteresis >= 1,
           f"train.loss_scale_hysteresis={t.loss_scale_hysteresis} must be >= 1 (1 halves the "
           f"scale at every overflow).")
    _check(0 < t.loss_scale_min <= 2.0 ** t.loss_scale_init_pow,
           f"train.loss_scale_min={t.loss_scale_min} must be > 0 and at most the initial scale "
           f"2**{t.loss_scale_init_pow}.")
    _check(o.lr > 0 and 0 <= o.min_lr <= o.lr,
           f"optim.lr={o.lr} must be > 0 and optim.min_lr={o.min_lr} in [0, lr].")
    _check(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction must be in [0, 1].")
    _check(o.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 disables clipping).")
    _check(t.guard_spike_factor == 0 or t.guard_spike_factor > 1,
           "train.guard_spike_factor must be 0 (off) or > 1 (skip when loss > factor * mean).")
    _check(0 < cfg.data.val_fraction < 1, "data.val_fraction must be in (0, 1).")
    if t.precision == "fp32":
        _check(t.grad_dtype == "fp32", "train.grad_dtype must be fp32 when precision is fp32.")
    if t.precision == "fp64":
        _check(t.grad_dtype in ("fp32", "fp64"),
               f"train.precision=fp64 reduces gradients in fp64; train.grad_dtype={t.grad_dtype} "
               f"would round them. Drop train.grad_dtype.")
    else:
        _check(t.grad_dtype != "fp64", f"train.grad_dtype=fp64 needs train.precision=fp64 "
                                       f"(got {t.precision}).")
