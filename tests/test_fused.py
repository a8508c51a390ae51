"""The fused q/k/v and gate/up projections: one GEMM in memory, the separate tensors on
disk (megalite/parallel/fused.py).

- each TP rank's rows are its shard of every part (q_r; k_r; v_r), so under
  grouped-query attention a rank holds whole query heads and the key/value heads they
  read; global <-> local is exact for tp 1, 2, 4;
- the layout-independent init draws each part under its stored name: the fused model
  starts from the weights the separate layers had;
- checkpoints and the model weights use the stored names, so a checkpoint written with
  separate q/k/v tensors (every checkpoint before fusion) loads.
"""

import torch

from megalite.checkpoint import format as ckpt
from megalite.config import Config, ModelConfig, resolve
from megalite.model.init import init_parameters, init_tensor, normal_std
from megalite.model.transformer import Transformer
from megalite.parallel import fused

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 8, 4, 4, 32


def cfg(**fields):
    config = Config(model=ModelConfig(preset="llama", hidden_size=HIDDEN, num_layers=2,
                                      num_heads=HEADS, num_kv_heads=KV_HEADS, vocab_size=64,
                                      max_seq_len=16, ffn_hidden_size=48, **fields))
    resolve(config, 64, "cpu")
    return config.model


def test_each_rank_holds_whole_heads_of_every_part():
    model = Transformer(cfg())
    p = model.layers[0].attn.qkv_proj.weight
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    assert p.fused_parts == (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))
    # row i of the global value is tagged with (part, row within the part)
    tags = torch.cat([torch.stack([torch.full((n,), k), torch.arange(n)], 1).float()
                      for k, n in enumerate((q_rows, kv_rows, kv_rows))])
    for tp in (1, 2, 4):
        shards = [fused.global_to_local_rows(p, tags, r, tp) for r in range(tp)]
        for r, shard in enumerate(shards):
            part, row = shard[:, 0].long(), shard[:, 1].long()
            for k, n in enumerate((q_rows, kv_rows, kv_rows)):
                mine = row[part == k]  # rank r's contiguous 1/tp of part k, in order
                assert torch.equal(mine, torch.arange(r * n // tp, (r + 1) * n // tp))
            # whole heads: query heads r*H/tp.. read kv heads r*Hkv/tp.. (GQA groups)
            q_heads = row[part == 0].div(HEAD_DIM, rounding_mode="floor").unique()
            kv_heads = row[part == 1].div(HEAD_DIM, rounding_mode="floor").unique()
            assert torch.equal(q_heads.div(HEADS // KV_HEADS, rounding_mode="floor").unique(),
                               kv_heads)
        assert torch.equal(fused.local_to_global_rows(p, torch.cat(shards), tp), tags)


def test_init_draws_every_part_under_its_stored_name():
    model = Transformer(cfg())
    init_parameters(model, seed=3, std=0.02)
    attn, mlp = model.layers[1].attn, model.layers[1].mlp
    for layer, prefix in ((attn.qkv_proj, "layers.1.attn"), (mlp.gate_up_proj, "layers.1.mlp")):
        expected = [init_tensor(f"{prefix}.{suffix}.weight", (rows, HIDDEN), seed=3,
                                std=normal_std(f"{prefix}.{suffix}.weight", 0.02, 2))
                    for suffix, rows in layer.weight.fused_parts]
        assert torch.equal(layer.weight.detach(), torch.cat(expected))


def test_a_checkpoint_of_separate_projections_loads(tmp_path):
    model_cfg = cfg()
    model = Transformer(model_cfg)
    stored = {n: torch.randn(shape) for n, shape in
              fused.stored_shapes(model.named_parameters()).items()}
    assert "layers.0.attn.k_proj.weight" in stored and "layers.0.mlp.up_proj.weight" in stored
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in stored)
    meta = {"config": Config(model=model_cfg).to_dict(), "layout": {"tp": 1, "pp": 1}}
    path = ckpt.save_checkpoint(tmp_path, 1, {"model.safetensors": stored}, meta, keep=1)
    ckpt.load_model_weights(model, path, ckpt.read_index(path))
    attn = model.layers[0].attn.qkv_proj.weight
    assert torch.equal(attn, torch.cat([stored[f"layers.0.attn.{s}_proj.weight"]
                                        for s in "qkv"]))
    assert fused.stored_tensors(model.named_parameters()).keys() == stored.keys()
