"""The model with model.kernels=triton trains like the torch path (interpreter on CPU).

A few AdamW steps of a tiny llama (RMSNorm, rotary, SwiGLU, flash attention with GQA,
fused cross-entropy) and gpt2 (LayerNorm, GELU) with every op from kernels.triton_ops,
against the same model on the torch reference ops. fp32; losses agree to 1e-4
relative: the kernels sum in another order (blocked softmax, per-program partial
sums), and three Adam steps keep those differences at the 1e-6 level.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' import

from megalite.config import ModelConfig  # noqa: E402
from megalite.model.init import init_parameters  # noqa: E402
from megalite.model.transformer import Transformer  # noqa: E402

# Triton runs on the GPU when there is one (tools/gpu_check.sh), in the interpreter else.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def losses(preset: str, kernels: str, steps: int = 3) -> list[float]:
    cfg = ModelConfig(preset=preset, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2 if preset == "llama" else 4, ffn_hidden_size=96,
                      vocab_size=61, max_seq_len=24, attention="triton" if kernels == "triton"
                      else "sdpa", kernels=kernels,
                      tie_embeddings=preset == "gpt2")
    model = Transformer(cfg)
    init_parameters(model, seed=3, std=0.02)
    model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


def test_llama_with_triton_kernels_matches_torch():
    torch.testing.assert_close(losses("llama", "triton"), losses("llama", "torch"), rtol=1e-4,
                               atol=0)


def test_gpt2_with_triton_kernels_matches_torch():
    torch.testing.assert_close(losses("gpt2", "triton"), losses("gpt2", "torch"), rtol=1e-4,
                               atol=0)
