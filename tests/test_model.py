"""Tests of the transformer, its deterministic init, the HF name map and sampling."""

import pytest
import torch
import torch.nn.functional as F

from megalite.config import Config, ModelConfig, resolve
from megalite.parallel import fused
from megalite.hf.names import from_hf, hf_config, hf_name_map, to_hf
from megalite.model.init import init_parameters, init_tensor, normal_std
from megalite.model.transformer import Transformer, num_params
from megalite.model.sampling import generate

VOCAB = 64


def make_cfg(preset="llama", **fields) -> ModelConfig:
    model = dict(preset=preset, hidden_size=32, num_layers=2, num_heads=4, vocab_size=VOCAB,
                 max_seq_len=16, attention="sdpa", kernels="torch")
    model.update(fields)
    return resolve(Config(model=ModelConfig(**model)), vocab_size=VOCAB, device="cpu").model


def make_model(cfg, seed=0) -> Transformer:
    model = Transformer(cfg)
    init_parameters(model, seed=seed, std=cfg.init_std)
    return model


def tokens(batch=2, seq=12, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_shapes_and_loss(preset):
    model = make_model(make_cfg(preset))
    x, y = tokens(), tokens(seed=1)
    logits = model(x)
    assert logits.shape == (2, 12, VOCAB)
    loss = model(x, y)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()))


def test_parameter_names_match_hf_map():
    layer = ["attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight",
             "attn.v_proj.weight", "attn.o_proj.weight", "mlp_norm.weight"]
    llama = ["embed.weight", "norm.weight", "lm_head.weight"] + [
        f"layers.{i}.{n}" for i in range(2)
        for n in layer + ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]]
    gpt2_layer = layer + ["mlp.c_fc.weight", "mlp.c_proj.weight"]
    gpt2_layer += [n.replace(".weight", ".bias") for n in gpt2_layer]
    gpt2 = ["embed.weight", "pos_embed.weight", "norm.weight", "norm.bias"] + [
        f"layers.{i}.{n}" for i in range(2) for n in gpt2_layer]
    for cfg, expected in ((make_cfg("llama"), llama), (make_cfg("gpt2"), gpt2)):
        names = list(fused.stored_shapes(Transformer(cfg).named_parameters()))
        assert sorted(names) == sorted(expected)
        assert sorted(hf_name_map(cfg)) == sorted(expected)


def test_gqa_and_tied_embeddings():
    cfg = make_cfg("llama", num_heads=4, num_kv_heads=2)
    model = make_model(cfg)
    attn = model.layers[0].attn
    assert attn.qkv_proj.weight.shape == (32 + 16 + 16, 32)  # q, k, v fused
    assert model(tokens()).shape == (2, 12, VOCAB)
    gpt2 = Transformer(make_cfg("gpt2"))
    assert gpt2.lm_head.weight is gpt2.embed.weight
    untied = Transformer(make_cfg("gpt2", tie_embeddings=False))
    assert num_params(untied) - num_params(gpt2) == VOCAB * 32


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_init_is_deterministic(preset):
    cfg = make_cfg(preset, num_kv_heads=2 if preset == "llama" else 0)
    torch.manual_seed(1)
    a = make_model(cfg, seed=5).state_dict()
    torch.manual_seed(2)  # a different default init underneath must not matter
    b = make_model(cfg, seed=5).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    c = make_model(cfg, seed=6).state_dict()
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    norm_weights = [n for n in a if n.endswith("norm.weight")]
    assert norm_weights and all(torch.equal(a[n], torch.ones_like(a[n])) for n in norm_weights)
    assert all(torch.equal(a[n], torch.zeros_like(a[n])) for n in a if n.endswith(".bias"))


def test_init_tensor_slices_equal_the_full_tensor():
    shape = (200, 7)
    full = init_tensor("w", shape, slice(None), seed=3, std=0.5)
    assert full.shape == shape
    assert abs(full.std().item() - 0.5) < 0.05
    for rows in (slice(0, 64), slice(50, 131), slice(199, 200), slice(64, 128)):
        assert torch.equal(init_tensor("w", shape, rows, seed=3, std=0.5), full[rows])
    cols = init_tensor("w", shape, slice(10, 100), seed=3, std=0.5, cols=slice(2, 5))
    assert torch.equal(cols, full[10:100, 2:5])
    assert not torch.equal(init_tensor("v", shape, slice(None), seed=3, std=0.5), full)
    assert normal_std("layers.0.mlp.down_proj.weight", 0.02, 8) == pytest.approx(0.005)
    assert normal_std("layers.0.attn.q_proj.weight", 0.02, 8) == 0.02


def _hf_model(cfg):
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in hf_config(cfg).items() if k != "model_type"}
    cls = transformers.LlamaForCausalLM if cfg.preset == "llama" else transformers.GPT2LMHeadModel
    return cls(cls.config_class(**fields, attn_implementation="eager")).eval()


@pytest.mark.parametrize("preset,fields", [
    ("llama", dict(num_kv_heads=2, rope_theta=500000.0)),
    ("gpt2", dict(tie_embeddings=True)),
])
def test_logits_match_hugging_face(preset, fields):
    cfg = make_cfg(preset, init_std=0.2, **fields)  # a large std: a wrong gelu variant shows
    model = make_model(cfg, seed=7).eval()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms and biases too, so a swapped mapping shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.1)
    state = fused.stored_tensors(model.named_parameters())
    hf_state = to_hf(state, cfg)
    round_trip = from_hf(hf_state, cfg)
    assert all(torch.equal(round_trip[n], state[n]) for n in state)
    hf = _hf_model(cfg)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    x = tokens(seq=16)
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_eager_attention_equals_sdpa(preset):
    # A large std gives peaked attention, so a wrong scale or mask shows.
    cfg = make_cfg(preset, init_std=0.3, num_kv_heads=2 if preset == "llama" else 0)
    sdpa = make_model(cfg)
    eager = make_model(make_cfg(preset, attention="eager", init_std=0.3,
                                num_kv_heads=cfg.num_kv_heads))
    x, y = tokens(), tokens(seed=1)
    torch.testing.assert_close(eager(x), sdpa(x), atol=1e-5, rtol=1e-5)
    eager(x, y).backward()
    sdpa(x, y).backward()
    for (name, a), b in zip(eager.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rope_depends_on_relative_positions_only():
    model = make_model(make_cfg("llama"))
    x = tokens()
    shifted = model(x, position_ids=torch.arange(12) + 100)
    torch.testing.assert_close(shifted, model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset,fields", [("llama", dict(num_kv_heads=2)),
                                           ("gpt2", dict(attention="eager"))])
def test_dropout_only_in_training(preset, fields):
    model = make_model(make_cfg(preset, dropout=0.3, **fields))
    plain = make_model(make_cfg(preset, **fields))
    x = tokens()
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), plain(x))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = make_cfg("llama", hidden_size=32, num_layers=1)
    model = make_model(cfg)
    x = tokens(batch=4, seq=16)
    y = torch.roll(x, -1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_generate(preset):
    model = make_model(make_cfg(preset))
    prompt = [1, 2, 3, 4]
    greedy = generate(model, prompt, 20, greedy=True)  # 24 > max_seq_len: context is cropped
    assert len(greedy) == 20 and greedy == generate(model, prompt, 20, greedy=True)
    assert generate(model, prompt, 20, top_k=1, seed=9) == greedy
    sampled = generate(model, prompt, 20, temperature=2.0, seed=4)
    assert sampled == generate(model, prompt, 20, temperature=2.0, seed=4)
    assert sampled != generate(model, prompt, 20, temperature=2.0, seed=5)
    eos = greedy[3]
    assert generate(model, prompt, 20, greedy=True, eos_id=eos) == greedy[:greedy.index(eos)]
    assert model.training
