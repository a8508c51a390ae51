"""Putting a model on the rank grid: layers for this layout, batches for this rank.

`build_model` picks the layer factory (dense, or tensor-parallel with tp_sp), the
attention over the `sp` group, this pipeline rank's stage (parallel/stage.py), and initialises every parameter as this rank's slice of
the same global tensor a single process would draw. `shard_batch` turns a batch of
token rows into this rank's inputs, targets and global positions. `to_global` /
`to_local` convert a parameter-shaped tensor between this rank's shard and the
unpadded global tensor that checkpoints store.
"""

from __future__ import annotations

import torch

from megalite.errors import ConfigError
from megalite.model.init import init_parameters
from megalite.model.transformer import DenseLayers, Transformer
from megalite.parallel import sequence, tensor
from megalite.parallel.pipeline.stage import stage_spec
from megalite.parallel.topology import Topology


def build_model(cfg, topo: Topology, device: str) -> Transformer:
    p, m = cfg.parallel, cfg.model
    layers = DenseLayers()
    if topo.tp > 1:
        tensor.check_tp_layout(m, topo.tp, cfg.train.seq_len // topo.sp if p.tp_sp else None)
        layers = tensor.TensorParallelLayers(topo.tp_group, p.tp_sp, p.vocab_pad_multiple)
    sequence.check_sp_layout(cfg.train.seq_len, m.num_heads, m.num_kv_heads, topo.sp, p.sp_mode,
                             topo.tp)
    if topo.sp > 1 and m.dropout > 0:
        raise ConfigError(f"model.dropout={m.dropout} with parallel.sp={topo.sp}: attention "
                          f"dropout across a split sequence is not supported; set "
                          f"--model.dropout=0 or --parallel.sp=1.")
    stage = (stage_spec(m.num_layers, topo.pp, p.virtual_stages, topo.pp_rank, p.stage_layers)
             if topo.pp > 1 else None)
    model = Transformer(m, layers=layers, sp_group=topo.sp_group, sp_mode=p.sp_mode, stage=stage,
                        recompute=cfg.train.recompute)
    init_parameters(model, cfg.train.seed, m.init_std)
    return model.to(device)


def shard_batch(tokens: torch.Tensor, topo: Topology, cfg):
    """[B, S+1] token rows -> this rank's (inputs, targets, position_ids or None)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if topo.sp == 1:
        return inputs, targets, None
    mode, seq_len = cfg.parallel.sp_mode, inputs.shape[1]
    return (sequence.shard_sequence(inputs, topo.sp, topo.sp_rank, mode),
            sequence.shard_sequence(targets, topo.sp, topo.sp_rank, mode),
            sequence.shard_positions(seq_len, topo.sp, topo.sp_rank, mode).to(tokens.device))


def to_global(param: torch.nn.Parameter, value: torch.Tensor, topo: Topology) -> torch.Tensor:
    if topo.tp == 1:
        return value
    return tensor.global_tensor(param, value, topo.tp_group)


def to_local(param: torch.nn.Parameter, value: torch.Tensor, topo: Topology) -> torch.Tensor:
    if topo.tp == 1:
        return value
    return tensor.local_slice(param, value, topo.tp_rank, topo.tp)
