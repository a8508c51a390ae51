"""Putting a model on the rank grid: the model built out of this layout's layers.

`build_model` picks the layer factory (dense, or tensor-parallel with tp_sp), the
attention over the `sp` group and this pipeline rank's stage (parallel/pipeline/stage.py),
and initialises every parameter as this rank's slice of the same global tensor a single
process would draw. It composes the model with parallel/'s layers, so it lives here:
model/ may use parallel/, while parallel/ knows no model (tests/test_imports.py).
Batches for a rank are parallel/sequence.py's `shard_batch`; a parameter's global
value is parallel/tensor.py's `to_global`.
"""

from __future__ import annotations

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
                        recompute=cfg.train.recompute,
                        offload_activations=cfg.train.offload_activations)
    init_parameters(model, cfg.train.seed, m.init_std)
    return model.to(device)
