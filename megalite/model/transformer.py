"""The decoder-only transformer: llama and gpt2 presets, written like single-device code.

- llama: RMSNorm, rotary position embeddings (Hugging Face rotate-half layout),
  grouped-query attention, SwiGLU MLP, no biases, untied head by default.
- gpt2: LayerNorm with bias, learned position embeddings, tanh-GELU MLP, biases
  everywhere, head tied to the token embedding by default.

Weights follow the Hugging Face LlamaForCausalLM / GPT2LMHeadModel conventions
(nn.Linear [out, in]), so export is a renaming; the exact mapping lives in
megalite/hf/names.py. q/k/v and gate/up each run as one fused GEMM (`qkv_proj`,
`gate_up_proj`), stored as the separate q/k/v and gate/up tensors
(parallel/fused.py).

Parallelism hooks, so later layers change classes, not this code:
- every projection, the embeddings and the LM head are built by a `layers` factory
  (`DenseLayers` here): tensor parallelism passes `parallel.tensor.TensorParallelLayers`,
  which returns column/row-parallel linears, a vocab-parallel embedding and a head
  whose `loss` is the vocab-parallel cross-entropy and whose `full_logits` gathers the
  vocabulary. Head counts are never stored: q/k/v are reshaped with the projection's
  own output width, so a layer holding 1/tp of the heads just works.
- under tp_sp the same code runs on [B, S/tp, H] between blocks: the embedding
  reduce-scatters the sequence, learned positions are looked up for the local shard
  only, norms and residual adds run on the shard, column layers gather it. Dropout
  masks are drawn per rank, so only dropout 0 matches a single process exactly under
  tensor parallelism (the parity tests run with dropout 0).
- `embed`, `pos_embed`, `layers` (a `LayerDict` keyed by the global layer index),
  `norm` and `lm_head` are separate attributes: a pipeline stage (`stage=StageSpec`)
  builds only its own, under their global names, and `forward(..., chunk=c)` runs one
  chunk.
- `position_ids` lets a sequence-parallel rank run its chunk of a longer sequence.
- activation recomputation (`recompute`): "full" keeps only each block's input and
  reruns the block in backward; "selective" reruns only the attention core (scores,
  softmax, dropout, weighted sum: the s^2 part, cheap to recompute and large to keep,
  Korthikanti et al. 2022). torch.utils.checkpoint restores the RNG, so dropout masks
  are redrawn identically; collectives inside a block (tp, sp) simply run again.
- norms, rotary, activations, attention and the loss go through the kernel op table
  (`kernels.get_ops`), so `model.kernels=triton` / `model.attention=triton` switch in
  the fused kernels by config.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import get_ops
from kernels.reference import compute_dtype
from megalite.config import ModelConfig
from megalite.model.offload import ActivationOffload
from megalite.parallel import fused
from megalite.parallel.sequence import sequence_attention
from megalite.parallel.pipeline.stage import StageSpec
from megalite.parallel.tensor import mark_replicated


class LMHead(nn.Linear):
    """The output projection, and the loss / logits made from its output."""

    def __init__(self, hidden_size: int, vocab_size: int, cross_entropy):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.cross_entropy = cross_entropy

    def loss(self, logits, targets):
        return self.cross_entropy(logits, targets)

    def full_logits(self, logits):
        return logits


class DenseLayers:
    """Builds the single-device versions of the layers that tensor parallelism splits.

    `column` layers split their output features across TP ranks (q/k/v, gate/up, c_fc,
    lm_head), `row` layers split their input features (o_proj, down_proj, c_proj).
    `check` rejects a config the layout cannot hold; `annotate` gives every parameter
    the metadata of `parallel.tensor` (here: all replicated).
    """

    def check(self, cfg: ModelConfig) -> None:
        pass

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, dim)

    def position_embedding(self, num_positions: int, dim: int) -> nn.Module:
        return nn.Embedding(num_positions, dim)

    def head(self, hidden_size: int, vocab_size: int, ops) -> nn.Module:
        return LMHead(hidden_size, vocab_size, ops.cross_entropy)

    def annotate(self, model: nn.Module) -> None:
        mark_replicated(model)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        # A function, not the ops module: modules cannot be deep-copied.
        self.rms_norm = ops.rms_norm

    def forward(self, x):
        return self.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self.layer_norm = ops.layer_norm

    def forward(self, x):
        return self.layer_norm(x, self.weight, self.bias, self.eps)


def make_norm(cfg: ModelConfig, ops) -> nn.Module:
    norm = RMSNorm if cfg.preset == "llama" else LayerNorm
    return norm(cfg.hidden_size, cfg.norm_eps, ops)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32):
    """cos, sin [S, head_dim] for the given positions (HF rotate-half layout), in `dtype`:
    fp32, or fp64 for a float64 model."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype)
    inv_freq = 1.0 / theta ** (exponents / head_dim)
    freqs = torch.outer(positions.to(dtype), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def eager_attention(q, k, v, dropout_p: float):
    """Causal attention that materialises the S x S probabilities (memory estimator's model)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    seq = scores.shape[-1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = _Softmax.apply(scores)
    return F.dropout(probs, dropout_p, training=dropout_p > 0) @ v


class _Softmax(torch.autograd.Function):
    """Softmax over the last dim computed in fp32 and saved in the input's dtype, as
    Megatron's fused softmax does: autograd would otherwise keep the fp32 result (twice
    the bytes of 16-bit probabilities, the largest activation of eager attention)."""

    @staticmethod
    def forward(ctx, scores):
        probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(scores.dtype)).to(scores.dtype)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        p, g = probs.to(compute_dtype(probs.dtype)), grad.to(compute_dtype(grad.dtype))
        return (p * (g - (g * p).sum(-1, keepdim=True))).to(grad.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: DenseLayers, ops, sp_group=None,
                 sp_mode: str = "ring"):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        kv_width = cfg.num_kv_heads * self.head_dim
        bias = cfg.preset == "gpt2"
        parts = (("q_proj", cfg.hidden_size), ("k_proj", kv_width), ("v_proj", kv_width))
        self.qkv_proj = fused.column(layers, cfg.hidden_size, parts, bias)
        self.o_proj = layers.row(cfg.hidden_size, cfg.hidden_size, bias)
        self.dropout = cfg.dropout
        self.impl = cfg.attention
        self.recompute_core = False  # selective recomputation: set by Transformer
        if cfg.attention == "sdpa":
            attention_op = get_ops("torch").attention
        elif cfg.attention == "triton":
            attention_op = get_ops("triton").attention
        elif cfg.attention == "eager":
            def attention_op(q, k, v):
                return eager_attention(q, k, v, 0.0)
        else:
            raise ValueError(f"model.attention={cfg.attention!r} is not resolved; "
                             f"call config.resolve() first (eager|sdpa|triton)")
        # Over an sp group of several ranks: ring or all-to-all attention around the op.
        self.attention_op = (attention_op if sp_group is None
                             else sequence_attention(sp_mode, sp_group, attention_op))
        self.rotary = ops.rotary

    def _heads(self, projected):
        # [B, S, heads * D] -> [B, heads, S, D]; the head count comes from the width.
        return projected.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def forward(self, x, rope):
        qkv = self.qkv_proj(x)
        q, k, v = map(self._heads, qkv.split(fused.local_widths(self.qkv_proj, qkv.shape[-1]), -1))
        if rope is not None:
            q, k = self.rotary(q, k, *rope)
            # q and k are new tensors now; a view v would keep the un-rotated q and k (its
            # base, the fused output) alive until backward: copy v out instead.
            v = v.contiguous()
        dropout_p = self.dropout if self.training else 0.0
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, dropout_p, use_reentrant=False)
        else:
            out = self._core(q, k, v, dropout_p)
        out = out.transpose(1, 2).flatten(2)
        return F.dropout(self.o_proj(out), self.dropout, self.training)

    def _core(self, q, k, v, dropout_p: float):
        """softmax(q k^T / sqrt(d)) v over heads [B, heads, S, D], causal."""
        if dropout_p > 0 and self.impl == "eager":
            return eager_attention(q, k, v, dropout_p)
        if dropout_p > 0:
            # The op table's attention has no dropout: torch SDPA takes over while
            # attention dropout is active (rejected with sp > 1, see parallel/build.py).
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return self.attention_op(q, k, v)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: DenseLayers, ops):
        super().__init__()
        parts = (("gate_proj", cfg.ffn_hidden_size), ("up_proj", cfg.ffn_hidden_size))
        self.gate_up_proj = fused.column(layers, cfg.hidden_size, parts, False)
        self.down_proj = layers.row(cfg.ffn_hidden_size, cfg.hidden_size, False)
        self.swiglu = ops.swiglu
        self.dropout = cfg.dropout

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        hidden = self.swiglu(*gate_up.chunk(2, dim=-1))  # views: the kernels take row strides
        return F.dropout(self.down_proj(hidden), self.dropout, self.training)


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: DenseLayers, ops):
        super().__init__()
        self.c_fc = layers.column(cfg.hidden_size, cfg.ffn_hidden_size, True)
        self.c_proj = layers.row(cfg.ffn_hidden_size, cfg.hidden_size, True)
        self.gelu = ops.gelu
        self.dropout = cfg.dropout

    def forward(self, x):
        hidden = self.c_fc(x)
        return F.dropout(self.c_proj(self.gelu(hidden)), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layers: DenseLayers, ops, sp_group=None,
                 sp_mode: str = "ring"):
        super().__init__()
        self.attn_norm = make_norm(cfg, ops)
        self.attn = Attention(cfg, layers, ops, sp_group, sp_mode)
        self.mlp_norm = make_norm(cfg, ops)
        self.mlp = (SwiGLU if cfg.preset == "llama" else GeluMLP)(cfg, layers, ops)

    def forward(self, x, rope):
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class LayerDict(nn.ModuleDict):
    """Blocks keyed by their global index, so a stage's parameter names are the global ones."""

    def __getitem__(self, key):
        return super().__getitem__(str(key))


class Transformer(nn.Module):
    """Decoder-only LM. `cfg` must be resolved (config.resolve): every size concrete.

    Parameters keep PyTorch's default init; call `megalite.model.init.init_parameters` for
    the deterministic, layout-independent one.
    """

    def __init__(self, cfg: ModelConfig, layers: DenseLayers | None = None, sp_group=None,
                 sp_mode: str = "ring", stage: StageSpec | None = None, recompute: str = "none",
                 offload_activations: bool = False):
        """`sp_group`: the sequence-parallel group when each rank holds a chunk of every
        sequence (`position_ids` then gives the chunk's global positions). `stage`: the
        pipeline rank's share (parallel/stage.py); None builds the whole model.
        `recompute`: none | selective | full (activation recomputation in training).
        `offload_activations`: keep what the blocks save for backward in host memory."""
        super().__init__()
        layers = layers or DenseLayers()
        layers.check(cfg)
        ops = get_ops(cfg.kernels)
        self.cfg = cfg
        self.stage = stage or StageSpec((tuple(range(cfg.num_layers)),), True, True)
        self.head_dim = cfg.hidden_size // cfg.num_heads
        if not isinstance(cfg.tie_embeddings, bool):
            raise ValueError(f"model.tie_embeddings={cfg.tie_embeddings!r} is not resolved; "
                             f"call config.resolve() first (it becomes a bool)")
        tied = cfg.tie_embeddings
        first, last = self.stage.first, self.stage.last
        self.embed = (layers.embedding(cfg.vocab_size, cfg.hidden_size)
                      if first or (last and tied) else None)
        # Learned positions are small and replicated on every TP rank.
        self.pos_embed = (layers.position_embedding(cfg.max_seq_len, cfg.hidden_size)
                          if cfg.preset == "gpt2" and first else None)
        if sp_group is not None and sp_group.size == 1:
            sp_group = None
        self.layers = LayerDict({str(i): Block(cfg, layers, ops, sp_group, sp_mode)
                                 for i in self.stage.layer_ids})
        self.recompute_blocks = recompute == "full"
        self.offload = ActivationOffload(offload_activations)
        for block in self.layers.values():
            block.attn.recompute_core = recompute == "selective"
        self.norm = make_norm(cfg, ops) if last else None
        self.lm_head = layers.head(cfg.hidden_size, cfg.vocab_size, ops) if last else None
        if tied and last:
            # Same factory, same (padded) vocabulary rows per rank: the shapes agree.
            self.lm_head.weight = self.embed.weight
            if not first:
                # The last stage's copy of a weight the first stage owns: its gradient is
                # summed over the embedding group, and norms/checkpoints count it once.
                self.embed.weight.pipeline_tied_copy = True
        layers.annotate(self)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, chunk: int = 0):
        """tokens [B, S] -> logits [B, S, V], or with targets [B, S] the mean loss (fp32).

        position_ids [S] default to 0..S-1; a sequence-parallel rank passes the global
        positions of its chunk. On a pipeline stage this runs local chunk `chunk`: token
        ids in on the first virtual stage, hidden states [B, S, H] in otherwise; the loss
        (or logits) out of the last, hidden states otherwise.
        """
        embeds = self.stage.first and chunk == 0
        heads = self.stage.last and chunk == len(self.stage.chunks) - 1
        if position_ids is None:
            if not embeds:
                raise ValueError("a forward on hidden states needs the position_ids of the "
                                 "sequence (under tp_sp the hidden states hold a shard of it)")
            seq = x.shape[1]
            if self.pos_embed is not None and seq > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {seq} tokens is longer than the "
                                 f"learned positions (model.max_seq_len={self.cfg.max_seq_len})")
            position_ids = torch.arange(seq, device=x.device)
        dtype = compute_dtype((x if x.is_floating_point() else self.embed.weight).dtype)
        rope = (None if self.cfg.preset == "gpt2"
                else rope_tables(position_ids, self.head_dim, self.cfg.rope_theta, dtype))
        if embeds:
            x = self.embed(x)
            if self.pos_embed is not None:
                x = x + self.pos_embed(position_ids)
            x = F.dropout(x, self.cfg.dropout, self.training)
        recompute = self.recompute_blocks and torch.is_grad_enabled()
        self.offload.new_chain()
        for i in self.stage.chunks[chunk]:
            with self.offload:  # one block at a time: its saved tensors go to the host
                if recompute:
                    x = checkpoint(self.layers[i], x, rope, use_reentrant=False)
                else:
                    x = self.layers[i](x, rope)
        if not heads:
            return x
        logits = self.lm_head(self.norm(x))  # [B, S, V/tp] under tensor parallelism
        if targets is None:
            return self.lm_head.full_logits(logits)
        return self.lm_head.loss(logits.flatten(0, 1), targets.flatten())


def num_params(model: nn.Module) -> int:
    """Number of parameter elements, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters())
