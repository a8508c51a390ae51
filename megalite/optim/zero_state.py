"""ZeroOptimizer's state exchange: its sharded flat buffers as per-parameter tensors.

Checkpoints and tests see the optimizer through these methods, never through its
flat layout, under the names checkpoints store (a fused projection as its parts):
`state_tensors()` ("name/exp_avg", "name/exp_avg_sq", and "name/master"
under bf16/fp16), `param_tensors()`, `grad_tensors()` (after `prepare_step`), all
gathered over dp x sp (and over TP unless `tp_global=False`: this TP rank's padded
shard), and `load_state_tensors()`, which takes the same shapes back for this
layout. A mixin of `ZeroOptimizer` (optim/zero.py), which owns the buffers.
"""

from __future__ import annotations

import contextlib

import torch

from megalite.errors import CheckpointError
from megalite.parallel import fused
from megalite.parallel.tensor import to_global, to_local


class ZeroStateExchange:
    def _full_flat(self, space_tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of this rank's update space -> the whole flat layout, on every rank."""
        if self.stage == 0:
            return space_tensor.to(self.device)
        out = torch.empty(self.layout.total, dtype=space_tensor.dtype, device=self.device)
        self._all_gather_flat(out, own=space_tensor)
        return out

    def _owned_named(self):
        return [(n, p) for n, p in self.named if not getattr(p, "pipeline_tied_copy", False)]

    def _stored(self, name: str, p, value: torch.Tensor, tp_global: bool) -> dict:
        """{stored name: tensor} of p's `value` (global or this TP rank's): a fused
        projection's parts, else p itself (parallel/fused.py)."""
        if not fused.is_fused(p):
            return {name: value}
        parts = fused.parts(name, p, 1 if tp_global else self.topo.tp)
        values = value.split([meta.shape[0] for _, _, meta in parts])
        return {stored: v for (stored, _, _), v in zip(parts, values)}

    def _per_param(self, flat: torch.Tensor, tp_global: bool, key: str = "") -> dict:
        """Split a whole-layout flat tensor into the owned parameters' tensors, under the
        names checkpoints store them by (a fused projection as its parts)."""
        out = {}
        for name, p in self._owned_named():
            off = self.where[id(p)]
            local = flat[off:off + p.numel()].view(p.shape)
            value = to_global(p, local, self.topo) if tp_global else local.clone()
            for stored, v in self._stored(name, p, value, tp_global).items():
                out[f"{stored}/{key}" if key else stored] = v
        return out

    @torch.no_grad()
    def state_tensors(self, tp_global: bool = True) -> dict[str, torch.Tensor]:
        """{"name/exp_avg", "name/exp_avg_sq"[, "name/master"]: tensor} for the parameters
        this stage owns; every rank of the topology must call it."""
        flats = {"exp_avg": self._full_flat(self.exp_avg),
                 "exp_avg_sq": self._full_flat(self.exp_avg_sq)}
        if self.model_dtype != self.master_dtype:
            flats["master"] = self._full_flat(self.master)
        out = {}
        for key, flat in flats.items():
            out.update(self._per_param(flat, tp_global, key))
        return out

    @torch.no_grad()
    def grad_tensors(self) -> dict[str, torch.Tensor]:
        """The reduced gradients (after `prepare_step`) as global tensors, for the parameters
        this stage owns; every rank of the topology must call it."""
        if self.stage >= 2:
            flat = self._full_flat(self.grads.shard)
        else:
            flat = self.grads.full.clone()
            if self.stage == 1:  # only this rank's chunks hold the reduced sum
                self._all_gather_flat(flat)
        return self._per_param(flat, tp_global=True)

    @torch.no_grad()
    def param_tensors(self, tp_global: bool = True) -> dict[str, torch.Tensor]:
        """The model parameters (model dtype) this stage owns, by name."""
        with self.gathered_params():
            # clones: under ZeRO 3 the gathered storage is freed on leaving
            out = {}
            for n, p in self._owned_named():
                value = to_global(p, p.detach().clone(), self.topo) if tp_global \
                    else p.detach().clone()
                out.update(self._stored(n, p, value, tp_global))
            return out

    @contextlib.contextmanager
    def gathered_params(self):
        """Every parameter present for the duration (ZeRO 3 gathers all units)."""
        if self.gather is None:
            yield
            return
        for b in self.layout.buckets:
            self.gather.fetch(b)
        try:
            yield
        finally:
            self.gather.free_all()

    @contextlib.contextmanager
    def unit_gathered(self, bucket):
        """`bucket`'s parameters present for the duration (ZeRO 3 gathers that unit only;
        every rank of the shard group must take part)."""
        if self.gather is None:
            yield
            return
        self.gather.fetch(bucket)
        try:
            yield
        finally:
            self.gather.free(bucket)

    # ---- flat ranges: what checkpoints write and read without gathering anything --------
    def param_ranges(self) -> list[tuple]:
        """(name, param, offset inside the flattened param, view) of every range of
        model-dtype parameter values this rank holds: everything (ZeRO 0-2) or its shard
        (ZeRO 3)."""
        if self.stage < 3:
            return [(self.names[id(p)], p, inside, self.param_flat[flat:flat + length])
                    for p, inside, flat, _, length in self.layout.pieces(None)]
        return [(self.names[id(p)], p, inside, self.param_shard[space:space + length])
                for p, inside, _, space, length in self.layout.pieces(self.rank)]

    def state_ranges(self, keys: tuple, writer_share: bool = False) -> list[tuple]:
        """(name, param, offset inside the flattened param, {key: view}) of the optimizer
        state `keys` (exp_avg, exp_avg_sq, master) this rank holds; `writer_share`: the part
        it writes in a checkpoint instead, so that every element is written once: its own
        chunks on the first replica (none on the others), and under ZeRO 0, where every
        rank holds everything, chunk r of every bucket on dp x sp rank r."""
        buffers = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                   "master": self.master}
        if not writer_share:
            ranges = [(p, inside, space, length)
                      for p, inside, _, space, length in self.layout.pieces(self.space_rank)]
        elif self.topo.zero_replica_group.rank != 0:
            ranges = []
        else:
            ranges = [(p, inside, flat if self.stage == 0 else space, length)
                      for p, inside, flat, space, length in self.layout.pieces(self.rank)]
        return [(self.names[id(p)], p, inside,
                 {k: buffers[k][at:at + length] for k in keys})
                for p, inside, at, length in ranges]

    def _flat_from(self, tensors: dict, key: str, required: bool,
                   tp_global: bool) -> torch.Tensor | None:
        flat = torch.zeros(self.layout.total, dtype=self.master_dtype, device=self.device)
        for name, p in self.named:
            parts = [tensors.get(f"{stored}/{key}" if key else stored)
                     for stored, _, _ in fused.parts(name, p)]
            if any(v is None for v in parts):
                if required:
                    raise CheckpointError(f"the checkpoint has no '{name}/{key or 'value'}' "
                                          f"for parameter '{name}'; it was written by another "
                                          f"model or is incomplete.")
                return None
            value = torch.cat(parts) if len(parts) > 1 else parts[0]
            off = self.where[id(p)]
            value = value.to(self.device, self.master_dtype)
            local = to_local(p, value, self.topo) if tp_global else value
            flat[off:off + p.numel()] = local.reshape(-1)
        return flat

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict, params: dict | None = None, step: int = 0,
                           tp_global: bool = True) -> None:
        """Restore from per-parameter tensors (`state_tensors(tp_global)`'s format), the
        AdamW step count, and, when given, the model parameters `params` (name -> tensor;
        every parameter this rank holds, a tied copy included)."""
        if params is not None:
            flat = self._flat_from(params, "", required=True, tp_global=tp_global)
            if self.stage < 3:
                self.param_flat.copy_(flat)
            else:
                self.param_shard.copy_(self._extract(flat))
            if self.separate_master:
                self.master.copy_(self._extract(flat))
        if not tensors:
            return
        for key, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            target.copy_(self._extract(self._flat_from(tensors, key, True, tp_global)))
        master = self._flat_from(tensors, "master", False, tp_global)
        if self.separate_master:
            if master is not None:
                self.master.copy_(self._extract(master))
            elif params is None and self.stage < 3:
                self.master.copy_(self._extract(self.param_flat.to(self.master_dtype)))
        self.step_count = step
