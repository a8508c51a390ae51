"""Putting a model on the rank grid: the model built out of this layout's layers.

`build_model` picks the layer factory (dense, or tensor-parallel with tp_sp), the
attention over the `sp` group and this pipeline rank's stage (parallel/pipeline/stage.py),
and initialises every parameter as this rank's slice of the same global tensor a single
process would draw. It composes the model with parallel/'s layers, so it lives here:
model/ may use parallel/, while parallel/ knows no model (tests/test_imports.py).
Batches for a rank are parallel/sequence.py's `shard_batch`; a parameter's global
value is parallel/tensor.py's `to_global`.

Training never materialises the whole local model: `build_meta_model` builds it on the
meta device (shapes and metadata, no storage) and the optimizer allocates each rank's
flat buffers and fills only its shards from `parameter_init(model, cfg)` (sharded
start-up, optim/zero.py). The model holds no buffers (RoPE tables are computed from
the positions in each forward), so nothing else needs recomputing on the device.
"""

from __future__ import annotations

import torch

from megalite.errors import ConfigError
from megalite.model.init import ParameterInit, init_parameters
from megalite.model.transformer import DenseLayers, Transformer
from megalite.parallel import sequence, tensor
from megalite.parallel.pipeline.stage import stage_spec
from megalite.parallel.topology import Topology


def build_meta_model(cfg, topo: Topology) -> Transformer:
    """This rank's model on the meta device: every shape and annotation, no values."""
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
    with torch.device("meta"):
        model = Transformer(m, layers=layers, sp_group=topo.sp_group, sp_mode=p.sp_mode,
                            stage=stage, recompute=cfg.train.recompute,
                            offload_activations=cfg.train.offload_activations)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # they would stay on the meta device: compute them in forward instead
        raise RuntimeError(f"the model registers buffers {buffers}; sharded start-up "
                           f"materialises parameters only")
    return model


def parameter_init(model: Transformer, cfg) -> ParameterInit:
    """The layout-independent initial values of `model`'s parameters (model/init.py)."""
    return ParameterInit(model, cfg.train.seed, cfg.model.init_std)


def materialize(model: torch.nn.Module, device) -> torch.nn.Module:
    """Give every meta parameter fp32 storage on `device` (uninitialised), keeping each
    parameter object, so ties and the parallel metadata survive (Module.to_empty makes
    new parameters: a tied weight would come apart)."""
    for param in {id(p): p for p in model.parameters()}.values():
        if param.is_meta:
            tensor.swap_in(param, torch.empty(param.shape, device=device))
    return model


def build_model(cfg, topo: Topology, device: str) -> Transformer:
    """This rank's model, materialised on `device` and initialised (fp32)."""
    model = materialize(build_meta_model(cfg, topo), device)
    init_parameters(model, cfg.train.seed, cfg.model.init_std)
    return model
