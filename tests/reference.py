"""The single-process reference run: plain PyTorch, no megalite trainer machinery.

Same data order, init, LR schedule, loss and precision (fp64 or fp32: the model cast to
train.precision) as the trainer, but the textbook loop:
one model holding every layer, `loss / m` backward per micro-batch into `.grad`,
`torch.nn.utils.clip_grad_norm_`, and `torch.optim.AdamW` (no decay on 1-D parameters
and embeddings, as the trainer's rule). Layout-parity tests compare every layout
(tp, sp, dp, pp, zero) of the real trainer against it.
"""

import numpy as np
import torch

from megalite.cli import parse_args
from megalite.config import resolve
from megalite.data.build import build_data
from megalite.data.sampler import BatchSampler
from megalite.optim.schedule import LRSchedule
from megalite.optim.zero import DTYPES
from megalite.model.build import build_model
from megalite.parallel.topology import build_topology
from megalite.parallel import fused


def reference_run(args: list[str], steps: int):
    """Train `steps` steps; returns ([(loss, grad_norm)], gradients of one more batch,
    parameters), the last two by global name."""
    cfg, _ = parse_args(args)
    data = build_data(cfg)
    resolve(cfg, data.vocab_size, "cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, build_topology(), "cpu").to(DTYPES[cfg.train.precision])
    o, t = cfg.optim, cfg.train
    decay = [p for n, p in model.named_parameters()
             if p.ndim >= 2 and (o.decay_embeddings or "embed" not in n)]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    schedule = LRSchedule.from_config(cfg)
    sampler = BatchSampler(len(data.train), t.global_batch_size, t.seed, 0, 1)

    def gradients():
        opt.zero_grad(set_to_none=True)
        indices = sampler.next_indices()
        micro = [indices[i:i + t.micro_batch_size]
                 for i in range(0, len(indices), t.micro_batch_size)]
        total = 0.0
        for chunk in micro:
            rows = torch.from_numpy(np.stack([data.train[i] for i in chunk]))
            loss = model(rows[:, :-1], rows[:, 1:]) / len(micro)
            loss.backward()
            total += loss.item()
        return total

    history = []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        loss = gradients()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad or float("inf"))
        history.append((loss, norm.item()))
        opt.step()
    gradients()
    # under the names the optimizer reports (a fused projection as its parts)
    grads = fused.stored_tensors(model.named_parameters(), grads=True)
    params = fused.stored_tensors(model.named_parameters())
    return (history, {n: g.clone() for n, g in grads.items()},
            {n: p.clone() for n, p in params.items()})
