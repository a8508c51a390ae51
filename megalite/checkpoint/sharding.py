"""The trainer's checkpoints: which rank writes which slice, and how any layout reads it.

Saving (format 3; every rank of the topology calls `save_trainer_state`), one gradient
bucket at a time, so a save holds at most about one bucket more than training:
- model parameters: dp x sp rank 0 of each (pipeline stage, TP rank) writes its TP
  slice of the parameters its stage owns as boxes of the global tensors (ZeRO 3 gathers
  one unit at a time for it); a TP-replicated tensor (norms, row biases, learned
  positions) is written by TP rank 0 only, a tied embedding by the first stage only;
  vocabulary rows are stored unpadded. Files model-RRRRR-BBBB.safetensors.
- optimizer state (Adam moments, and the fp32 master under bf16/fp16): every rank
  writes what it holds, as the flat ranges of its TP-local slices (checkpoint/flat.py),
  each with its own sha256, without any gather: its ZeRO chunks (under hybrid sharding
  the first replica writes, the others hold copies), and under ZeRO 0, where every rank
  holds everything, chunk r of every bucket on dp x sp rank r. Files
  optim-RRRRR-BBBB.safetensors. The index maps every flat range to global coordinates,
  so any layout reads it without knowing the writer's buckets.
- RNG: every rank's states, as uint8 tensors in its own file.
Every rank writes in parallel into the staging directory; rank 0 commits the index
(format.py) once all ranks report success, and every rank learns the outcome.

Loading (`load_trainer_state`): each rank first checks names, shapes and completeness
against the whole model (every rank agrees before anything changes), then streams in
only the flat ranges it holds in *this* layout (tp, pp, dp, sp, zero, zero_shard,
virtual stages may all differ from the writer's), as boxes of the global tensors read
from whatever pieces cover them, each flat piece checked against its own sha256. A
format 2 checkpoint (optimizer state in boxes) loads the same way.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from megalite.checkpoint import flat
from megalite.checkpoint import format as ckpt
from megalite.config import ModelConfig
from megalite.errors import CheckpointError, on_every_rank
from megalite.model.transformer import Transformer
from megalite.parallel import fused
from megalite.parallel.tensor import (TensorParallelLayers, VocabParallelEmbedding,
                                      VocabParallelHead, padded_vocab_size)
from megalite.parallel.topology import Group

STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


@functools.lru_cache(maxsize=8)
def _partitioning(model_json: str) -> dict[str, dict]:
    """{stored name: {"shape", "split_dim", "vocab"}} of the whole model: how tensor
    parallelism cuts each stored tensor (a fused projection's parts, parallel/fused.py),
    from a meta-device model built with the TP layer factory."""
    cfg = ModelConfig(**json.loads(model_json))
    with torch.device("meta"):
        model = Transformer(cfg, layers=TensorParallelLayers(Group("tp", (0,), 0)))
    vocab = {id(m.weight) for m in model.modules()
             if isinstance(m, (VocabParallelEmbedding, VocabParallelHead))}
    return {stored: {"shape": list(meta.shape), "split_dim": meta.tp_split_dim,
                     "vocab": id(p) in vocab}
            for n, p in model.named_parameters() for stored, _, meta in fused.parts(n, p)}


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


def _all_ranks_ok(topo, ok: bool) -> bool:
    """True when every rank of the topology is ok."""
    flag = torch.tensor([0.0 if ok else 1.0], device=topo.device)
    return topo.all_reduce(flag).item() == 0


def _rng_states(device: str) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def _slice_meta(info: dict, topo, pad: int) -> tuple[dict, list, list] | None:
    """(index metadata, box start, box stop) of this TP rank's slice of a parameter, or
    None when another TP rank writes it or this one holds only vocabulary padding."""
    if info["split_dim"] is None and topo.tp_rank != 0:
        return None  # replicated across TP: rank 0 writes it
    start, stop = tp_box(info, topo.tp, topo.tp_rank, pad)
    if any(b <= a for a, b in zip(start, stop)):
        return None
    return {"shape": info["shape"], "split_dim": info["split_dim"],
            "vocab": info["vocab"]}, start, stop


class _Writes:
    """This rank's files, added one bucket at a time; the first OSError stops the writing
    but not the loop, so the rank keeps taking part in ZeRO 3's per-unit gathers."""

    def __init__(self, tmp: Path, rank: int):
        self.writer, self.error = ckpt.PartWriter(tmp, rank), None

    def add(self, fname: str, pieces: list) -> None:
        if self.error is None:
            try:
                self.writer.add(fname, pieces)
            except OSError as e:
                self.error = f"rank {self.writer.rank} could not write its checkpoint files ({e})"

    def close(self) -> str | None:
        if self.error is None:
            try:
                self.writer.close()
            except OSError as e:
                self.error = f"rank {self.writer.rank} could not write its checkpoint files ({e})"
        return self.error


def _write_rank_files(trainer, writes: _Writes) -> None:
    """Format 3, bucket by bucket (so a save holds at most one bucket's tensors more than
    training): dp x sp rank 0 of each (stage, TP rank) writes its slices of the model
    weights as boxes (ZeRO 3 gathers one unit at a time for it); the optimizer state is
    written by the ranks that hold it, as the flat ranges they hold (no gather at all)."""
    topo, opt, cfg = trainer.topo, trainer.optimizer, trainer.cfg
    parts, pad, r = partitioning(cfg.model), cfg.parallel.vocab_pad_multiple, topo.rank
    keys = tuple(k for k in STATE_KEYS if k != "master" or opt.model_dtype != opt.master_dtype)
    state = {}
    for name, p, inside, views in opt.state_ranges(keys, writer_share=True):
        state.setdefault(opt.layout.where[id(p)][0].index, []).append((name, p, inside, views))
    for bucket in opt.layout.buckets:
        model = []
        with opt.unit_gathered(bucket):
            if topo.dp_sp_group.rank == 0:
                for p, _ in bucket.params:
                    for stored, row, local in fused.parts(opt.names[id(p)], p, topo.tp):
                        sliced = _slice_meta(parts[stored], topo, pad)
                        if sliced is None or getattr(p, "pipeline_tied_copy", False):
                            continue
                        meta, start, stop = sliced
                        value = p.detach().narrow(0, row, local.shape[0])
                        model.append(ckpt.Piece(stored, _stored(value, parts[stored], start, stop),
                                                start, {"kind": "model", **meta}))
                writes.add(f"model-{r:05d}-{bucket.index:04d}.safetensors", model)
        optim = []
        for name, p, inside, views in state.get(bucket.index, []):
            length = next(iter(views.values())).numel()
            for stored, local, offset, at, n in fused.flat_pieces(name, p, topo.tp, inside, length):
                sliced = _slice_meta(parts[stored], topo, pad)
                if sliced is None or getattr(p, "pipeline_tied_copy", False):
                    continue
                meta, start, _ = sliced
                where = {"slice_start": start, "slice_shape": list(local.shape), "offset": offset}
                optim += [ckpt.Piece(f"{stored}/{key}", view[at:at + n], None,
                                     {"kind": "optim", **meta}, where)
                          for key, view in views.items()]
        writes.add(f"optim-{r:05d}-{bucket.index:04d}.safetensors", optim)
    rng = [ckpt.Piece(f"rng/{key}/{r}", value, None, {"kind": "rng", "shape": [value.numel()]})
           for key, value in _rng_states(trainer.device).items()]
    writes.add(f"rng-{r:05d}.safetensors", rng)


def save_trainer_state(trainer, meta: dict) -> Path:
    """Every rank writes its part; rank 0 commits. Returns the step directory."""
    topo, root, step = trainer.topo, Path(trainer.ckpt_dir), trainer.step
    path = root / ckpt.step_dir_name(step)
    # Rank 0's own steps (the staging directory, the commit) fail on every rank at once:
    # the others would otherwise wait in the next agreement until the collective timeout.
    _on_rank_0(topo, path, "could not start it", lambda: ckpt.begin_save(root, step))
    writes = _Writes(ckpt.staging_dir(root, step), topo.rank)
    _write_rank_files(trainer, writes)
    error = writes.close()
    if not _all_ranks_ok(topo, error is None):
        raise on_every_rank(CheckpointError(f"saving checkpoint step {step} failed: "
                              f"{error or 'another rank failed (see its log)'}. The previous "
                              f"checkpoint is untouched; free disk space or fix "
                              f"checkpoint.dir and resume from it."))
    meta = {**meta, "layout": {k: getattr(trainer.cfg.parallel, k) for k in
                               ("tp", "pp", "dp", "sp", "zero", "zero_shard",
                                "virtual_stages", "stage_layers", "vocab_pad_multiple")},
            "world_size": topo.world_size, "optimizer_step": trainer.optimizer.step_count}
    # nobody moves on (or exits) before the commit
    _on_rank_0(topo, path, "could not commit it", lambda: ckpt.commit(
        root, ckpt.staging_dir(root, step), step, meta, trainer.cfg.checkpoint.keep,
        range(topo.world_size)))
    return path


def _on_rank_0(topo, path: Path, what: str, action) -> None:
    """Run `action` on rank 0; every rank then agrees, and all raise if it failed."""
    error = None
    if topo.rank == 0:
        try:
            action()
        except (OSError, CheckpointError) as e:
            error = e
    if not _all_ranks_ok(topo, error is None):
        cause = f": {error}" if error else " (its log says why)"
        raise on_every_rank(CheckpointError(
            f"checkpoint '{path}' was not saved: rank 0 {what}{cause}. The previous checkpoint "
            f"is still `latest` and resumes exactly; fix the checkpoint directory (space, "
            f"permissions, a file in the way) and resume from it."))


def _check_complete(trainer, reader: ckpt.CheckpointReader) -> None:
    """Before any state changes: the model's shapes, and state for every parameter."""
    parts = partitioning(trainer.cfg.model)
    ckpt.check_shapes(reader.index, {n: tuple(i["shape"]) for n, i in parts.items()})
    for name, p in trainer.optimizer.named:
        for stored, _, _ in fused.parts(name, p):
            for key in ("exp_avg", "exp_avg_sq"):
                if f"{stored}/{key}" not in reader.tensors:
                    raise CheckpointError(f"checkpoint '{reader.path}' has no optimizer state "
                                          f"'{key}' for '{stored}'; it is incomplete.")


def _fill(trainer, reader: ckpt.CheckpointReader) -> None:
    """Stream every flat range this rank holds from the boxes of the global tensors that
    cover it: model-dtype parameters, master weights, Adam moments. The fp32 master, where
    a bf16/fp16 run saved one, is a parameter's true value; else the weights are."""
    topo, opt, cfg = trainer.topo, trainer.optimizer, trainer.cfg
    parts, pad = partitioning(cfg.model), cfg.parallel.vocab_pad_multiple

    def fill(view, key, name, p, inside):
        """`view`, p's flat range from `inside`, from the stored tensors `key(stored)`."""
        for stored, local, offset, at, n in fused.flat_pieces(name, p, topo.tp, inside,
                                                              view.numel()):
            info, part = parts[stored], view[at:at + n]
            start, _ = tp_box(info, topo.tp, topo.tp_rank, pad)
            for at2, lo, hi in flat.runs(start, list(local.shape), offset, n, info["shape"]):
                flat.box_view(part, at2, lo, hi).copy_(reader.read(key(stored), lo, hi))

    def truth(stored):
        return f"{stored}/master" if f"{stored}/master" in reader.tensors else stored

    with torch.no_grad():
        for name, p, inside, view in opt.param_ranges():
            fill(view, truth, name, p, inside)
        keys = ("exp_avg", "exp_avg_sq", *(("master",) if opt.separate_master else ()))
        for name, p, inside, views in opt.state_ranges(keys):
            for key, view in views.items():
                fill(view, truth if key == "master" else lambda s, k=key: f"{s}/{k}",
                     name, p, inside)


def _read_rng(trainer, reader: ckpt.CheckpointReader) -> dict:
    rng = {}
    for key in _rng_states(trainer.device):
        own, first = f"rng/{key}/{trainer.topo.rank}", f"rng/{key}/0"
        name = own if own in reader.tensors else first
        if name in reader.tensors:
            rng[key] = reader.read(name)
    return rng


def load_trainer_state(trainer, path: Path) -> dict:
    """Restore model, optimizer and RNG for this layout; returns the index (the caller
    restores schedule, sampler, guard, scaler). Every rank checks the index first (names,
    shapes, completeness) and nothing changes unless all pass; then each streams in only
    the ranges it holds, checking each piece it reads. A damaged piece found then fails
    the load on every rank (the trainer does not start)."""
    topo, index, error = trainer.topo, None, None
    try:
        index = ckpt.read_index(path, verify=False)
        reader = ckpt.CheckpointReader(path, index)
        _check_complete(trainer, reader)
    except CheckpointError as e:
        error = e
    if not _all_ranks_ok(topo, error is None):
        raise on_every_rank(error or CheckpointError(
            f"another rank could not read checkpoint '{path}' (see its log); nothing was "
            f"loaded."))
    try:
        _fill(trainer, reader)
        rng = _read_rng(trainer, reader)
    except CheckpointError as e:
        error = e
    if not _all_ranks_ok(topo, error is None):
        raise on_every_rank(error or CheckpointError(
            f"another rank failed reading checkpoint '{path}' (see its log); this run's state "
            f"is incomplete and it does not start."))
    trainer.optimizer.step_count = index["optimizer_step"]
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return index
