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

`hf_config` and `model_fields_from_hf` translate the architecture both ways; the
import refuses HF variants our model does not implement (rope scaling, biases in a
llama, another activation) instead of loading weights into the wrong function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megalite.config import ModelConfig
from megalite.errors import CheckpointError


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
    if not cfg.tie_embeddings:
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
    tied = cfg.tie_embeddings
    if cfg.preset == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.ffn_hidden_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.num_kv_heads, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                # transformers 5 reads rope_parameters, 4.x reads rope_theta: give both.
                "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.ffn_hidden_size,
            "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "tie_word_embeddings": tied}


def _unsupported(what: str) -> CheckpointError:
    return CheckpointError(f"the Hugging Face config uses {what}, which megalite's model does "
                           f"not implement; only plain Llama (RMSNorm, SwiGLU, default RoPE, no "
                           f"biases) and GPT-2 (gelu_new) checkpoints can be imported.")


def _llama_rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _unsupported(f"rope scaling of type '{kind}'")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields_from_hf(hf: dict) -> dict:
    """ModelConfig fields of the architecture an HF config.json describes (llama, gpt2)."""
    kind = hf.get("model_type")
    try:
        if kind == "llama":
            heads = hf["num_attention_heads"]
            if hf.get("hidden_act", "silu") != "silu":
                raise _unsupported(f"hidden_act='{hf['hidden_act']}'")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise _unsupported("attention or MLP biases")
            if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
                raise _unsupported(f"head_dim={hf['head_dim']} != hidden_size / heads")
            return dict(preset="llama", hidden_size=hf["hidden_size"],
                        num_layers=hf["num_hidden_layers"], num_heads=heads,
                        num_kv_heads=hf.get("num_key_value_heads") or heads,
                        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                        max_seq_len=hf.get("max_position_embeddings", 2048),
                        tie_embeddings=bool(hf.get("tie_word_embeddings")),
                        rope_theta=_llama_rope_theta(hf), norm_eps=hf.get("rms_norm_eps", 1e-6))
        if kind == "gpt2":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise _unsupported(f"activation_function='{hf['activation_function']}'")
            if hf.get("scale_attn_by_inverse_layer_idx") or \
                    not hf.get("scale_attn_weights", True):
                raise _unsupported("a non-standard attention scale")
            tied = hf.get("tie_word_embeddings", True)  # GPT-2 ties unless told otherwise
            return dict(preset="gpt2", hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
                        num_heads=hf["n_head"],
                        ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                        vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", 1024),
                        tie_embeddings=bool(tied),
                        norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise CheckpointError(f"the Hugging Face config.json lacks {e}, which a {kind} config "
                              f"always has; the file is damaged or not a model config.") from None
    raise CheckpointError(f"Hugging Face model_type '{kind}' cannot be imported: megalite "
                          f"implements 'llama' and 'gpt2' (config.json's model_type).")
