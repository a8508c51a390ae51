"""Offline resharding: rewrite a checkpoint for another layout, on CPU, without a process group.

The trainer already reshards on load (checkpoint/sharding.py reads whatever boxes the new
layout needs), so this is for moving a checkpoint ahead of time (one file per writer
of the target layout, each holding exactly its slices) or consolidating it into one
file for other tools. Each writer of the target layout, the dp = sp = 0 rank of every
(pipeline stage, TP rank), gets the TP slices of the parameters its stage owns and of
their optimizer state, as boxes, whatever the source held (format 3's flat ranges or
format 2's boxes); dp, sp, zero and zero_shard change only the recorded layout, since
the trainer reads the ranges it needs from any boxes (docs/checkpoint-format.md). RNG
states are copied unchanged (a rank with no state of its own takes rank 0's). Tensors
are copied, never recomputed, so a round trip A -> B -> A gives byte-identical tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from megalite.checkpoint import format as ckpt
from megalite.config import config_from_dict
from megalite.errors import CheckpointError, ConfigError
from megalite.model.transformer import Transformer
from megalite.parallel import fused
from megalite.parallel.pipeline.stage import stage_spec
from megalite.parallel.tensor import check_tp_layout
from megalite.parallel.topology import grid_rank
from megalite.checkpoint.sharding import STATE_KEYS, partitioning, tp_box

LAYOUT_KEYS = ("tp", "pp", "dp", "sp", "zero", "zero_shard", "virtual_stages", "stage_layers")


def _stage_names(model_cfg, pp: int, virtual: int, pp_rank: int, explicit: str) -> list[str]:
    """Parameter names pipeline rank `pp_rank` owns (a tied copy left out)."""
    stage = stage_spec(model_cfg.num_layers, pp, virtual, pp_rank, explicit) if pp > 1 else None
    with torch.device("meta"):
        model = Transformer(model_cfg, stage=stage)
    return list(fused.stored_shapes((n, p) for n, p in model.named_parameters()
                                    if not getattr(p, "pipeline_tied_copy", False)))


def target_config(index: dict, layout: dict):
    """The checkpoint's config with the new layout; rejects layouts the model cannot take."""
    data = copy.deepcopy(index["config"])
    given = {k: v for k, v in layout.items() if v is not None}
    if {"dp", "sp", "zero"} & set(given) and "zero_shard" not in given:
        given["zero_shard"] = 0  # hybrid sharding is per layout: one shard unless asked
    data["parallel"].update(given)
    cfg = config_from_dict(data)  # validates batch, pipeline and ZeRO combinations
    if cfg.parallel.tp > 1:
        check_tp_layout(cfg.model, cfg.parallel.tp)
    return cfg


def reshard(src: Path, dst_root: Path, layout: dict, consolidate: bool = False) -> Path:
    """Write checkpoint `src` for `layout` ({tp, pp, dp, sp, zero, virtual_stages,
    stage_layers}; None keeps the source's) as a step directory under `dst_root`."""
    index = ckpt.read_index(src, verify=True)
    reader = ckpt.CheckpointReader(src, index)
    if consolidate:
        layout = {**layout, **dict(tp=1, pp=1, dp=1, sp=1, virtual_stages=1, stage_layers="")}
    cfg = target_config(index, layout)
    p = cfg.parallel
    parts = partitioning(cfg.model)
    step = index["step"]
    if Path(dst_root).resolve() == Path(src).resolve().parent:
        raise ConfigError(f"the destination '{dst_root}' is the source's own checkpoint "
                          f"directory; write the resharded checkpoint somewhere else.")
    stages = [_stage_names(cfg.model, p.pp, p.virtual_stages, r, p.stage_layers)
              for r in range(p.pp)]
    missing = set(reader.names("model")) - {n for names in stages for n in names}
    if missing:
        raise CheckpointError(f"tensors {sorted(missing)[:5]} of '{src}' belong to no stage "
                              f"of the new layout; the checkpoint does not match its config.")
    tmp = ckpt.begin_save(dst_root, step)
    writers = []
    for pp_rank, names in enumerate(stages):
        for tp_rank in range(p.tp):
            rank = grid_rank(tp_rank, 0, 0, pp_rank, p.tp, p.sp, p.dp)
            model, optim = [], []
            for name in names:
                info = {k: parts[name][k] for k in ("shape", "split_dim", "vocab")}
                if info["split_dim"] is None and tp_rank != 0:
                    continue
                start, stop = tp_box(info, p.tp, tp_rank, p.vocab_pad_multiple)
                if any(b <= a for a, b in zip(start, stop)):
                    continue
                model.append(ckpt.Piece(name, reader.read(name, start, stop), start,
                                        {"kind": "model", **info}))
                optim += [ckpt.Piece(f"{name}/{key}", reader.read(f"{name}/{key}", start, stop),
                                     start, {"kind": "optim", **info})
                          for key in STATE_KEYS if f"{name}/{key}" in reader.tensors]
            files = {f"model-{rank:05d}.safetensors": model,
                     f"optim-{rank:05d}.safetensors": optim}
            if rank == 0:
                files["rng-00000.safetensors"] = [
                    ckpt.Piece(n, reader.read(n), None, {"kind": "rng",
                                                         "shape": reader.tensors[n]["shape"]})
                    for n in reader.names("rng")]
            if consolidate:
                files = {"consolidated.safetensors": [x for f in files.values() for x in f]}
            ckpt.write_part(tmp, rank, files)
            writers.append(rank)
    meta = {k: v for k, v in index.items()
            if k not in ("files", "tensors", "format_version", "step", "hostname", "hardware",
                         "torch_version", "python_version", "timestamp")}
    meta["config"] = cfg.to_dict()
    meta["layout"] = {**index.get("layout", {}),
                      **{k: getattr(p, k) for k in (*LAYOUT_KEYS, "vocab_pad_multiple")}}
    meta["world_size"] = p.tp * p.pp * p.dp * p.sp
    meta["resharded_from"] = str(Path(src).resolve())
    return ckpt.commit(dst_root, tmp, step, meta, keep=1 << 30, ranks=writers)
