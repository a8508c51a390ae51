"""How megalite parameters map onto Hugging Face LlamaForCausalLM / GPT2LMHeadModel.

`hf_name_map(cfg)` gives, for every megalite parameter, the HF name and whether the
tensor is transposed on the way (GPT-2's HF Conv1D stores [in, out] where our
nn.Linear stores [out, in]). One fusion exists: GPT-2's `attn.c_attn` holds q, k and
v in one Conv1D, so `attn.q_proj`, `attn.k_proj` and `attn.v_proj` all map to it;
several megalite names mapping to one HF name are concatenated along the output
features in map order (q, k, v), i.e. c_attn.weight = cat([Wq, Wk, Wv], 0).T and
c_attn.bias = cat([bq, bk, bv]). `to_hf` / `from_hf` apply that rule, so export,
import and the parity test share one implementation.

With tied embeddings `lm_head.weight` is `embed.weight` and has no entry: HF ties it
too (`tie_word_embeddings`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megalite.config import ModelConfig


def _llama_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    names = {"embed.weight": ("model.embed_tokens.weight", False)}
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = (hf + "input_layernorm.weight", False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{ours}attn.{proj}.weight"] = (f"{hf}self_attn.{proj}.weight", False)
        names[ours + "mlp_norm.weight"] = (hf + "post_attention_layernorm.weight", False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}mlp.{proj}.weight"] = (f"{hf}mlp.{proj}.weight", False)
    names["norm.weight"] = ("model.norm.weight", False)
    return names


def _gpt2_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    names = {"embed.weight": ("transformer.wte.weight", False),
             "pos_embed.weight": ("transformer.wpe.weight", False)}
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"transformer.h.{i}."
        pairs = [("attn_norm", "ln_1", False)]
        pairs += [(f"attn.{p}", "attn.c_attn", True) for p in ("q_proj", "k_proj", "v_proj")]
        pairs += [("attn.o_proj", "attn.c_proj", True), ("mlp_norm", "ln_2", False),
                  ("mlp.c_fc", "mlp.c_fc", True), ("mlp.c_proj", "mlp.c_proj", True)]
        for our_module, hf_module, is_conv1d in pairs:
            names[f"{ours}{our_module}.weight"] = (f"{hf}{hf_module}.weight", is_conv1d)
            names[f"{ours}{our_module}.bias"] = (f"{hf}{hf_module}.bias", False)
    names["norm.weight"] = ("transformer.ln_f.weight", False)
    names["norm.bias"] = ("transformer.ln_f.bias", False)
    return names


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """megalite parameter name -> (HF name, transpose), in a fixed order."""
    names = _llama_map(cfg) if cfg.preset == "llama" else _gpt2_map(cfg)
    if cfg.tie_embeddings != "true":
        names["lm_head.weight"] = ("lm_head.weight", False)
    return names


def _groups(cfg: ModelConfig) -> dict[str, tuple[list[str], bool]]:
    """HF name -> (megalite names concatenated into it, in order; transpose)."""
    groups: dict[str, tuple[list[str], bool]] = {}
    for ours, (hf, transpose) in hf_name_map(cfg).items():
        groups.setdefault(hf, ([], transpose))[0].append(ours)
    return groups


def to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """megalite state dict -> HF state dict (same dtype, contiguous tensors)."""
    out = {}
    for hf, (ours, transpose) in _groups(cfg).items():
        tensor = torch.cat([state[name] for name in ours], dim=0)
        out[hf] = (tensor.t() if transpose else tensor).contiguous()
    return out


def from_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> megalite state dict; the inverse of `to_hf`."""
    out = {}
    for hf, (ours, transpose) in _groups(cfg).items():
        tensor = state[hf].t() if transpose else state[hf]
        # Only GPT-2's c_attn is fused, and GPT-2 has no GQA: q, k, v are equal parts.
        for name, part in zip(ours, tensor.chunk(len(ours), dim=0)):
            out[name] = part.contiguous()
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json fields that describe the same architecture."""
    tied = cfg.tie_embeddings == "true"
    if cfg.preset == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.ffn_hidden_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.num_kv_heads, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "attention_bias": False, "mlp_bias": False,
                "tie_word_embeddings": tied}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.ffn_hidden_size,
            "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "tie_word_embeddings": tied}
