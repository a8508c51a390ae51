"""Autoregressive sampling from a single-process Transformer (tools/generate, tests).

A deliberately simple loop: every step runs the full model on the last
`max_seq_len` tokens (no KV cache), which is plenty for checking what a small
checkpoint has learned. Sampling draws from a CPU torch.Generator seeded by `seed`,
so the same model, prompt and settings give the same tokens on any device.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _next_token(logits: torch.Tensor, temperature: float, top_k: int, greedy: bool,
                generator: torch.Generator) -> int:
    if greedy or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, greedy: bool = False, seed: int = 0,
             eos_id: int | None = None) -> list[int]:
    """Return the new tokens (not the prompt) that follow `prompt_ids`.

    Stops after `max_new_tokens` or when `eos_id` is sampled (the eos token is not
    returned). `greedy` (or temperature <= 0) takes the argmax; otherwise sample from
    softmax(logits / temperature), restricted to the `top_k` largest when top_k > 0.
    The model runs in eval mode (no dropout) and is put back in its previous mode.
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (e.g. the tokenizer's BOS id)")
    device = next(model.parameters()).device
    context_len = model.cfg.max_seq_len
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    ids, new = list(prompt_ids), []
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-context_len:]], dtype=torch.long, device=device)
            logits = model(context)[0, -1].float().cpu()
            token = _next_token(logits, temperature, top_k, greedy, generator)
            if token == eos_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return new
