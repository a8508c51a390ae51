"""The trainer's checkpoints: which rank writes which slice, and how any layout reads it.

Saving (every rank of the topology calls `save_trainer_state`):
- model parameters: each (pipeline stage, TP rank) pair writes its own TP slice of the
  parameters its stage owns, from its dp = sp = 0 replica (tensors replicated across
  dp x sp are written once); a TP-replicated tensor (norms, row biases, learned
  positions) is written by TP rank 0 only, a tied embedding by the first stage only;
  vocabulary rows are stored unpadded.
- optimizer state: ZeRO shards are all-gathered over dp x sp at save time (a transient
  copy of this stage's fp32 state on every rank of the group; it costs one all-gather
  of 8-12 bytes per parameter and that much memory for the duration of the save), then
  stored per parameter with the same TP slice as the parameter, the parameters dealt
  round-robin over the dp x sp ranks so they all write in parallel. Per parameter,
  not as flat ZeRO fragments: any layout (another dp, zero stage or bucket size) reads
  it without knowing the writer's bucket layout.
- RNG: every rank's states, as uint8 tensors in its own file.
Every rank writes in parallel into the staging directory; rank 0 commits the index
(checkpoint.py) once all ranks report success, and every rank learns the outcome.

Loading (`load_trainer_state`): each rank reads only the boxes of the global tensors its
parameters hold in *this* layout (tp, pp, dp, sp, zero, virtual stages may all differ
from the writer's), checks names and shapes against the whole model first, and
changes no state until every rank has read everything it needs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from megalite.checkpoint import format as ckpt
from megalite.config import ModelConfig
from megalite.errors import CheckpointError
from megalite.model.transformer import Transformer
from megalite.parallel.tensor import (TensorParallelLayers, VocabParallelEmbedding,
                                      VocabParallelHead, padded_vocab_size)
from megalite.parallel.topology import Group

STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


@functools.lru_cache(maxsize=8)
def _partitioning(model_json: str) -> dict[str, dict]:
    """{name: {"shape", "split_dim", "vocab"}} of the whole model: how tensor parallelism
    cuts each parameter, from a meta-device model built with the TP layer factory."""
    cfg = ModelConfig(**json.loads(model_json))
    with torch.device("meta"):
        model = Transformer(cfg, layers=TensorParallelLayers(Group("tp", (0,), 0)))
    vocab = {id(m.weight) for m in model.modules()
             if isinstance(m, (VocabParallelEmbedding, VocabParallelHead))}
    return {n: {"shape": list(p.shape), "split_dim": p.tp_split_dim, "vocab": id(p) in vocab}
            for n, p in model.named_parameters()}


def partitioning(model_cfg) -> dict[str, dict]:
    return _partitioning(json.dumps(vars(model_cfg), sort_keys=True))


def tp_box(info: dict, tp: int, tp_rank: int, pad_multiple: int) -> tuple[list, list]:
    """[start, stop) of the unpadded global tensor that TP rank `tp_rank` of `tp` holds
    (empty along the split dim when the rank holds only vocabulary padding)."""
    shape, dim = info["shape"], info["split_dim"]
    start, stop = [0] * len(shape), list(shape)
    if dim is None or tp == 1:
        return start, stop
    total = padded_vocab_size(shape[dim], tp, pad_multiple) if info["vocab"] else shape[dim]
    size = total // tp
    start[dim] = min(tp_rank * size, shape[dim])
    stop[dim] = min((tp_rank + 1) * size, shape[dim])
    return start, stop


def _stored(value: torch.Tensor, info: dict, start: list, stop: list) -> torch.Tensor:
    """The unpadded part of a TP-local tensor."""
    dim = info["split_dim"]
    return value if dim is None else value.narrow(dim, 0, stop[dim] - start[dim])


def _padded(value: torch.Tensor, info: dict, shape: torch.Size) -> torch.Tensor:
    """Back to the local shape: vocabulary padding rows are zero."""
    if tuple(value.shape) == tuple(shape):
        return value
    out = torch.zeros(shape, dtype=value.dtype)
    out.narrow(info["split_dim"], 0, value.shape[info["split_dim"]]).copy_(value)
    return out


def _all_ranks_ok(topo, ok: bool) -> bool:
    """True when every rank of the topology is ok."""
    flag = torch.tensor([0.0 if ok else 1.0], device=topo.device)
    return topo.all_reduce(flag).item() == 0


def _rng_states(device: str) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def _rank_pieces(trainer) -> dict[str, list]:
    """This rank's files: its model slices, its share of the optimizer state, its RNG."""
    topo, opt, cfg = trainer.topo, trainer.optimizer, trainer.cfg
    parts, pad = partitioning(cfg.model), cfg.parallel.vocab_pad_multiple
    params = opt.param_tensors(tp_global=False)
    state = opt.state_tensors(tp_global=False)
    group = topo.dp_sp_group
    model, optim, rng = [], [], []
    for i, name in enumerate(sorted(params)):
        info = parts[name]
        if info["split_dim"] is None and topo.tp_rank != 0:
            continue  # replicated across TP: rank 0 writes it
        start, stop = tp_box(info, topo.tp, topo.tp_rank, pad)
        if any(b <= a for a, b in zip(start, stop)):
            continue  # this rank holds only vocabulary padding
        meta = {"shape": info["shape"], "split_dim": info["split_dim"], "vocab": info["vocab"]}
        if group.rank == 0:
            model.append(ckpt.Piece(name, _stored(params[name], info, start, stop), start,
                                    {"kind": "model", **meta}))
        if i % group.size == group.rank:
            optim += [ckpt.Piece(f"{name}/{key}", _stored(state[f"{name}/{key}"], info, start,
                                                          stop), start, {"kind": "optim", **meta})
                      for key in STATE_KEYS if f"{name}/{key}" in state]
    for key, value in _rng_states(trainer.device).items():
        rng.append(ckpt.Piece(f"rng/{key}/{topo.rank}", value, None,
                              {"kind": "rng", "shape": [value.numel()]}))
    r = topo.rank
    return {f"model-{r:05d}.safetensors": model, f"optim-{r:05d}.safetensors": optim,
            f"rng-{r:05d}.safetensors": rng}


def save_trainer_state(trainer, meta: dict) -> Path:
    """Every rank writes its part; rank 0 commits. Returns the step directory."""
    topo, root, step = trainer.topo, Path(trainer.ckpt_dir), trainer.step
    files = _rank_pieces(trainer)  # collectives first: every rank takes part
    if topo.rank == 0:
        ckpt.begin_save(root, step)
    _all_ranks_ok(topo, True)  # a barrier: the staging directory exists
    error = None
    try:
        ckpt.write_part(ckpt.staging_dir(root, step), topo.rank, files)
    except OSError as e:
        error = f"rank {topo.rank} could not write its checkpoint files ({e})"
    if not _all_ranks_ok(topo, error is None):
        raise CheckpointError(f"saving checkpoint step {step} failed: "
                              f"{error or 'another rank failed (see its log)'}. The previous "
                              f"checkpoint is untouched; free disk space or fix "
                              f"checkpoint.dir and resume from it.")
    path = root / ckpt.step_dir_name(step)
    if topo.rank == 0:
        meta = {**meta, "layout": {k: getattr(trainer.cfg.parallel, k) for k in
                                   ("tp", "pp", "dp", "sp", "zero", "virtual_stages",
                                    "stage_layers", "vocab_pad_multiple")},
                "world_size": topo.world_size, "optimizer_step": trainer.optimizer.step_count}
        path = ckpt.commit(root, ckpt.staging_dir(root, step), step, meta,
                           trainer.cfg.checkpoint.keep, range(topo.world_size))
    _all_ranks_ok(topo, True)  # nobody moves on (or exits) before the commit
    return path


def _read_rank_state(trainer, reader: ckpt.CheckpointReader) -> tuple[dict, dict, dict]:
    """(parameter values, optimizer state, RNG states) this rank needs, TP-local."""
    topo, opt, cfg = trainer.topo, trainer.optimizer, trainer.cfg
    parts, pad = partitioning(cfg.model), cfg.parallel.vocab_pad_multiple
    ckpt.check_shapes(reader.index, {n: tuple(i["shape"]) for n, i in parts.items()})
    values, state = {}, {}
    for name, p in opt.named:  # a tied copy included: both stages need the weight
        info = parts[name]
        start, stop = tp_box(info, topo.tp, topo.tp_rank, pad)
        for key in STATE_KEYS:
            if f"{name}/{key}" in reader.tensors:
                state[f"{name}/{key}"] = _padded(reader.read(f"{name}/{key}", start, stop),
                                                 info, p.shape)
        # The fp32 master, where a bf16/fp16 run saved one, is the parameter's true value.
        values[name] = state.get(f"{name}/master")
        if values[name] is None:
            values[name] = _padded(reader.read(name, start, stop), info, p.shape)
        if f"{name}/exp_avg" not in state:
            raise CheckpointError(f"checkpoint '{reader.path}' has no optimizer state for "
                                  f"'{name}'; it is incomplete.")
    rng = {}
    for key in _rng_states(trainer.device):
        own, first = f"rng/{key}/{topo.rank}", f"rng/{key}/0"
        name = own if own in reader.tensors else first
        if name in reader.tensors:
            rng[key] = reader.read(name)
    return values, state, rng


def load_trainer_state(trainer, path: Path) -> dict:
    """Restore model, optimizer and RNG for this layout; returns the index (the caller
    restores schedule, sampler, guard, scaler). Nothing changes unless every rank read
    everything it needs."""
    index, error = None, None
    try:
        index = ckpt.read_index(path, verify=False)
        values, state, rng = _read_rank_state(trainer, ckpt.CheckpointReader(path, index))
    except CheckpointError as e:
        error = e
    if not _all_ranks_ok(trainer.topo, error is None):
        raise error or CheckpointError(f"another rank could not read checkpoint '{path}' "
                                       f"(see its log); nothing was loaded.")
    trainer.optimizer.load_state_tensors(state, params=values, step=index["optimizer_step"],
                                         tp_global=False)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return index
