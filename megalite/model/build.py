"""Putting a model on the rank grid: the model built out of this layout's layers.

`build_model` picks the layer factory (dense, or tensor-parallel with tp_sp), the
attention over the `sp` group and this pipeline rank's stage (parallel/pipeline/stage.py),
and initialises every parameter as this rank's slice of the same global tensor a single
process would draw. Its layout checks are functions (`check_model_layout`, `pipeline_stage`)
so the preflight runs the same ones for every rank before any worker starts
(megalite/layout_checks.py). It composes the model with parallel/'s layers, so it lives here:
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
from megalite.parallel.pipeline.stage import StageSpec, stage_spec
from megalite.parallel.topology import Topology


def check_model_layout(cfg, tp: int, sp: int) -> None:
    """Raise ConfigError when the model of `cfg` (resolved) cannot be split over `tp`
    tensor-parallel and `sp` sequence-parallel ranks. Every rank of a TP or SP group
    holds an equal share, so the answer is the same on each: the workers ask it in
    build_meta_model, the preflight once for the whole grid (megalite/layout_checks.py)."""
    p, m = cfg.parallel, cfg.model
    tensor.check_tp_layout(m, tp, cfg.train.seq_len // sp if p.tp_sp else None)
    sequence.check_sp_layout(cfg.train.seq_len, m.num_heads, m.num_kv_heads, sp, p.sp_mode, tp)
    if sp > 1 and m.dropout > 0:
        raise ConfigError(f"model.dropout={m.dropout} with parallel.sp={sp}: attention "
                          f"dropout across a split sequence is not supported; set "
                          f"--model.dropout=0 or --parallel.sp=1.")


def pipeline_stage(cfg, pp: int, pp_rank: int) -> StageSpec | None:
    """What pipeline rank `pp_rank` of `pp` builds (None when pp = 1: the whole model);
    ConfigError when the layers cannot be split (parallel/pipeline/stage.py)."""
    p = cfg.parallel
    if pp == 1:
        return None
    return stage_spec(cfg.model.num_layers, pp, p.virtual_stages, pp_rank, p.stage_layers)


def build_meta_model(cfg, topo: Topology) -> Transformer:
    """This rank's model on the meta device: every shape and annotation, no values."""
    p, m = cfg.parallel, cfg.model
    check_model_layout(cfg, topo.tp, topo.sp)
    layers = DenseLayers()
    if topo.tp > 1:
        layers = tensor.TensorParallelLayers(topo.tp_group, p.tp_sp, p.vocab_pad_multiple)
    stage = pipeline_stage(cfg, topo.pp, topo.pp_rank)
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
