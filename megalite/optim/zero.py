"""The ZeRO sharded AdamW optimizer (stages 0-3), mixed precision and CPU offload.

`ZeroOptimizer(model, cfg, topo, init)` takes over a model: it puts every
parameter into flat buffers laid out by `parallel.buckets.BucketLayout` (reverse
registration order, buckets of `parallel.bucket_mb`, each padded to a multiple of
dp*sp*ALIGN elements so it splits into equal chunks, rank r owning chunk r of every
bucket), casts the parameters to `train.precision` and keeps the fp32 master copy
itself. Sharded start-up: the model may live on the meta device (model/build.py's
`build_meta_model`); each rank then allocates only its own buffers and fills what it
holds from `init` (model/init.py's `ParameterInit`: any range of any parameter's
layout-independent initial values), so no rank ever holds the whole local model, and
the start-up peak is the state's bytes plus one INIT_PIECE. Without `init` the values
are read from an initialised, materialised model on its device. Never call
`model.to()` afterwards. `train.precision: fp64` keeps gradients, master and moments
in float64 too (the layout-parity tests run so). Over the dp x sp group of N ranks (`parallel.zero`):

    stage  parameters (model dtype)  gradients          fp32 master + Adam moments
    0      full, all-reduced         full (grad_dtype)  full
    1      full                      full (grad_dtype)  this rank's chunks, params all-gathered
                                     reduce-scattered once per step
    2      full                      shard (grad_dtype) this rank's chunks, params all-gathered
    3      shard (gathered per layer) shard (grad_dtype) this rank's chunks

Stage 3 gathers each transformer block's parameters just before its forward (the next
block's gather is prefetched) and frees them after; the gradient of the block's
output re-gathers them for backward (prefetching the block before it), and they are
freed as soon as the block's gradients are all in. The other parameters (embedding,
final norm, head) form one unit, gathered for the whole forward and backward. Stage 3
with pp > 1 is rejected. `optim.offload: cpu` keeps master weights and moments in
(pinned, where CUDA exists) CPU memory and runs the AdamW step there.

AdamW is torch.optim.AdamW's (decoupled decay, bias correction; kernels/adamw.py:
the Triton kernel on CUDA, its torch reference elsewhere), with the trainer's decay
rule: no decay on 1-D parameters nor on names containing "embed" unless
optim.decay_embeddings. All parameters share one step counter; a skipped step does
not count.

The optimizer owns every gradient reduction (parallel/data.py): over dp x sp
(averaging), over TP for `sequence_parallel_grad` parameters, and over the embedding
group for a tied embedding across pipeline stages, so the trainer calls neither
`reduce_gradients` nor `reduce_tied_gradients` nor `clip_gradients`. Parameters never
hold a `.grad`: a hook moves each gradient into the bucket as soon as it is computed.

The trainer's step:

    opt.zero_grad()
    for i, micro in enumerate(micro_batches):
        with opt.micro_batch(is_last=(i == len(micro_batches) - 1)):
            loss = model(inputs, targets, positions) * weight
            opt.scale_loss(loss).backward()            # fp16: times the loss scale
    grad_norm, found_inf = opt.prepare_step()          # same values on every rank
    if found_inf or guard says skip:
        opt.skip()
    else:
        opt.step(lr)                                   # clips at optim.clip_grad

`micro_batch(is_last)` only tells ZeRO 0/1 when to start the overlapped all-reduce;
without it (the pipeline engine's backwards) everything is reduced in `prepare_step`,
which is correct, just not overlapped. Checkpoints and tests read and restore the
state per parameter (`state_tensors`, `param_tensors`, `grad_tensors`,
`load_state_tensors`: optim/zero_state.py); `step_count` is the shared AdamW step.
`memory_report()` gives this rank's bytes next to the ZeRO paper's formula.
"""

from __future__ import annotations

import contextlib
import math

import torch

from kernels.reference import compute_dtype
from megalite.errors import ConfigError
from megalite.optim.scaler import DynamicLossScaler
from megalite.parallel import comm
from megalite.optim.zero3 import LayerGather
from megalite.optim.zero_state import ZeroStateExchange
from megalite.parallel.grads.buckets import ALIGN, BucketLayout
from megalite.parallel.grads.reduce import (GradBuffer, clip_coefficient,
                                    counts_in_norm)
from megalite.parallel.tensor import swap_in
from megalite.parallel.topology import Topology

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


# Elements drawn (or copied) at once while the optimizer fills its buffers at start-up:
# 4 MiB of fp32, so the start-up transient stays far below any buffer it fills.
INIT_PIECE = 1 << 20


def _current_values(p: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of a materialised parameter, as it is now."""
    return p.detach().reshape(-1)[start:start + length]


def _adamw_kernel(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype == torch.float32:
        from kernels.adamw import adamw_step
        return adamw_step
    from kernels.adamw import adamw_step_reference
    return adamw_step_reference


def _tied_embedding(model, topo: Topology) -> tuple:
    """The embedding weight whose copies on the first and last stage are summed."""
    cfg, embed = getattr(model, "cfg", None), getattr(model, "embed", None)
    if topo.embedding_group.size == 1 or embed is None:
        return ()
    return (embed.weight,) if getattr(cfg, "tie_embeddings", False) else ()


class ZeroOptimizer(ZeroStateExchange):
    def __init__(self, model: torch.nn.Module, cfg, topo: Topology, init=None):
        par, train, optim = cfg.parallel, cfg.train, cfg.optim
        self.stage = par.zero  # zero 3 with pp > 1: rejected by config.validate
        self.cfg, self.topo, self.model = cfg, topo, model
        # The ranks one shard spans: dp x sp, or a block of it under hybrid sharding, with
        # the shards replicated over topo.zero_replica_group.
        self.group = topo.zero_shard_group
        self.n, self.rank = self.group.size, self.group.rank
        if self.n != (par.zero_shard or topo.dp_sp_group.size):
            raise ConfigError(f"parallel.zero_shard={par.zero_shard} but the topology's ZeRO "
                              f"shard group has {self.n} ranks: build the topology with "
                              f"build_topology(..., zero_shard={par.zero_shard}).")
        self.model_dtype = DTYPES[train.precision]
        # fp64 (tests, debugging): gradients, master and moments all float64 too
        self.grad_dtype = (torch.float64 if self.model_dtype == torch.float64
                           else DTYPES[train.grad_dtype])
        self.master_dtype = compute_dtype(self.model_dtype)
        self.offload = optim.offload == "cpu"
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in self.named}
        params = [p for _, p in self.named]
        # a meta model (sharded start-up) lives where the topology's collectives do
        self.device = topo.device if params[0].is_meta else params[0].device
        self.opt_device = torch.device("cpu") if self.offload else self.device
        order = list(reversed(params))
        units = self._units(model, order) if self.stage == 3 else None
        grad_bytes = self.grad_dtype.itemsize
        bucket_numel = max(1, int(par.bucket_mb * 2 ** 20 / grad_bytes))
        tied = _tied_embedding(model, topo)
        self.weight_decay = {
            id(p): optim.weight_decay if p.ndim >= 2 and (optim.decay_embeddings or
                                                         "embed" not in self.names[id(p)]) else 0.0
            for p in params}
        self.layout = layout = BucketLayout(order, self.n, bucket_numel, units, isolate=tied,
                                            sort_key=lambda p: -self.weight_decay[id(p)])
        self.where = {id(p): layout.where[id(p)][1] for p in params}
        # Which rank's chunks this rank updates: all of them under ZeRO 0.
        self.space_rank = None if self.stage == 0 else self.rank
        self.space_numel = layout.total if self.stage == 0 else layout.shard_size

        # Each rank allocates its buffers and fills only what it holds from `init` (or from
        # the parameters' current values): a meta model is never materialised whole, so
        # the start-up peak is the state's own bytes plus one INIT_PIECE (sharded start-up).
        values = init.values if init is not None else _current_values
        self.separate_master = self.model_dtype != self.master_dtype or self.offload
        self.param_flat = self.param_shard = None
        self.unit_full = {}
        pin = self.offload and torch.cuda.is_available()

        def state_buffer():
            t = torch.zeros(self.space_numel, dtype=self.master_dtype, device=self.opt_device)
            return t.pin_memory() if pin else t

        if self.stage < 3:
            self.param_flat = self._filled(
                torch.zeros(layout.total, dtype=self.model_dtype, device=self.device), None, values)
        else:
            self.param_shard = self._filled(
                torch.zeros(layout.shard_size, dtype=self.model_dtype, device=self.device),
                self.rank, values)
        self.master = None
        if self.separate_master:  # the exact fp32 values, not the model dtype's rounding
            self.master = self._filled(state_buffer(), self.space_rank, values)
        elif self.stage in (0, 3):
            self.master = self.param_flat if self.stage == 0 else self.param_shard
        # Only now do the parameters become views of the buffers (`values` may read them).
        if self.stage < 3:
            for p in params:
                off = self.where[id(p)]
                swap_in(p, self.param_flat[off:off + p.numel()].view(p.shape))
        else:
            for bucket in layout.buckets:
                full = torch.empty(bucket.size, dtype=self.model_dtype, device=self.device)
                for p, off in bucket.params:
                    start = off - bucket.start
                    swap_in(p, full[start:start + p.numel()].view(p.shape))
                full.untyped_storage().resize_(0)
                self.unit_full[bucket.index] = full
        self.exp_avg, self.exp_avg_sq = state_buffer(), state_buffer()
        self.runs = self._runs()
        # Replicas hold the same reduced gradients: the first one counts them in the norm.
        self.norm_pieces = [(flat, space, length)
                            for p, _, flat, space, length in layout.pieces(self.rank)
                            if counts_in_norm(p, topo) and topo.zero_replica_group.rank == 0]
        self.step_count = 0
        self.scaler = DynamicLossScaler.from_config(cfg) if train.precision == "fp16" else None
        self.gather = LayerGather(self, model) if self.stage == 3 else None
        self.grads = GradBuffer(
            layout, topo, self.grad_dtype, self.device, shard=self.stage >= 2,
            overlap=par.overlap_grad_reduce, tied=tied, scatter=self.stage == 1,
            on_bucket_complete=self.gather.free if self.gather else None,
            on_backward_end=self.gather.free_all if self.gather else None)
        self._norm = None

    # ---- layout helpers ------------------------------------------------------------------
    @staticmethod
    def _units(model, order: list) -> list[list]:
        """ZeRO 3 gather units: one per transformer block, one for everything else."""
        layers = getattr(model, "layers", None)
        if layers is None:
            return [order]
        blocks = [list(reversed([p for p in block.parameters() if p.requires_grad]))
                  for block in layers.values()]
        in_blocks = {id(p) for unit in blocks for p in unit}
        rest = [p for p in order if id(p) not in in_blocks]
        return [rest, *reversed(blocks)]

    def _filled(self, target: torch.Tensor, rank: int | None, values) -> torch.Tensor:
        """Write `values(p, start, length)` of what `rank` owns (None: everything) into
        `target`, a buffer in that rank's space, INIT_PIECE elements at a time."""
        with torch.no_grad():
            for p, inside, _, space, length in self.layout.pieces(rank):
                for off in range(0, length, INIT_PIECE):
                    n = min(INIT_PIECE, length - off)
                    target[space + off:space + off + n] = values(p, inside + off, n)
        return target

    def _extract(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's part (its update space) of a flat-layout tensor."""
        if self.stage == 0:
            return flat
        return torch.cat([flat[s:s + n] for s, n, _ in self.layout.segments(self.rank)])

    def _runs(self) -> list[tuple[int, int, int, float]]:
        """(offset in the update space, flat offset, length, weight decay): contiguous
        stretches of the update space with one weight decay, one AdamW call each."""
        runs = []
        for p, _, flat, space, length in self.layout.pieces(self.space_rank):
            wd = self.weight_decay[id(p)]
            if runs and runs[-1][3] == wd and runs[-1][0] + runs[-1][2] == space \
                    and runs[-1][1] + runs[-1][2] == flat:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + length, wd)
            else:
                runs.append((space, flat, length, wd))
        return runs

    def _master_view(self, space: int, flat: int, length: int) -> torch.Tensor:
        if self.master is None:  # fp32 ZeRO 1/2: the parameters are their own master
            return self.param_flat[flat:flat + length]
        return self.master[space:space + length]

    # ---- the step ------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.grads.zero()
        if self.gather is not None:
            self.gather.free_all()

    @contextlib.contextmanager
    def micro_batch(self, is_last: bool):
        """Around one micro-batch's forward and backward: ZeRO 0/1 start the overlapped
        all-reduce only during the last one."""
        self.grads.last_micro_batch = is_last
        try:
            yield
        finally:
            self.grads.last_micro_batch = False

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    @property
    def loss_scale(self) -> float:
        """The factor `scale_loss` applies (fp16's dynamic scale, else 1)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def prepare_step(self) -> tuple[float, bool]:
        """Finish the reductions, unscale (fp16), and return (global gradient norm,
        found_inf), equal on every rank; an overflow anywhere is seen everywhere. Reads
        the norm to the host at once; the trainer instead sums `local_grad_sum_squares()`
        over the grid together with its other grid-wide sums, reads them in one
        transfer and hands the value to `set_norm`."""
        return self.set_norm(self.topo.all_reduce(self.local_grad_sum_squares()).item())

    def local_grad_sum_squares(self) -> torch.Tensor:
        """Finish the reductions, unscale (fp16), and return this rank's part of the sum
        of squares of the gradients (float64, on the device, not waited for): summed over
        every rank of the grid (`topo.all_reduce`) it is the global one."""
        self.grads.finish()
        if self.scaler is not None:
            (self.grads.shard if self.stage >= 2 else self.grads.full).mul_(self.scaler.inv_scale)
        # Every element counts in exactly one rank's norm pieces, so a non-finite gradient
        # anywhere makes the global sum of squares non-finite: one pass finds both.
        sum_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for flat, space, length in self.norm_pieces:
            g = self.grads.grad_view(flat, space, length).to(self.master_dtype)
            # CPU torch.dot loses precision on long vectors (rel 1e-4 at 25M elements):
            # sum dots of 256K-element pieces (rel ~1e-8).
            for piece in g.split(1 << 18):
                sum_sq += torch.dot(piece, piece)
        return sum_sq

    def set_norm(self, sum_squares: float) -> tuple[float, bool]:
        """Take the global sum of squares (host value): (grad norm, found_inf); updates
        the fp16 loss scale and arms `step`."""
        found_inf = not math.isfinite(sum_squares)
        if self.scaler is not None:
            self.scaler.update(found_inf)
        self._norm = math.sqrt(sum_squares) if not found_inf else float("nan")
        return self._norm, found_inf

    @torch.no_grad()
    def step(self, lr: float, max_norm: float | None = None) -> None:
        """Clip by the global norm (max_norm, default optim.clip_grad; 0: off), update this
        rank's part, and bring the parameters up to date in the model dtype."""
        if self._norm is None:
            raise RuntimeError("ZeroOptimizer.step() needs prepare_step() first")
        o = self.cfg.optim
        coef = clip_coefficient(self._norm, o.clip_grad if max_norm is None else max_norm)
        self.step_count += 1
        adamw = _adamw_kernel(self.opt_device, self.master_dtype)
        # On CPU, pieces that stay in cache and bound the update's temporaries; the
        # CUDA kernel takes a whole run in one launch.
        piece = 1 << 18 if self.opt_device.type == "cpu" else 1 << 62
        for run_space, run_flat, run_length, wd in self.runs:
            for off in range(0, run_length, piece):
                space, flat, length = run_space + off, run_flat + off, min(piece, run_length - off)
                grad = self.grads.grad_view(flat, space, length)
                if grad.dtype != self.master_dtype or grad.device != self.opt_device:
                    grad = grad.to(self.opt_device, self.master_dtype)
                if coef != 1.0:
                    grad.mul_(coef)
                adamw(self._master_view(space, flat, length), grad,
                      self.exp_avg[space:space + length], self.exp_avg_sq[space:space + length],
                      lr, o.beta1, o.beta2, o.eps, wd, self.step_count)
        self._write_back()
        self._norm = None

    def skip(self) -> None:
        """No update this step (overflow or step guard); the loss scale already moved."""
        self._norm = None

    def _write_back(self) -> None:
        """Master -> model-dtype parameters; ZeRO 1/2 then all-gather every bucket."""
        if self.separate_master:
            if self.stage == 0:
                self.param_flat.copy_(self.master)
            elif self.stage == 3:
                self.param_shard.copy_(self.master)
            else:
                for space, flat, length, _ in self.runs:
                    self.param_flat[flat:flat + length].copy_(self.master[space:space + length])
        if self.stage in (1, 2):
            self._all_gather_flat(self.param_flat)

    def _all_gather_flat(self, flat: torch.Tensor, own: torch.Tensor | None = None) -> None:
        """Fill every bucket of flat-layout `flat` from each rank's chunk (taken from
        `flat` itself, or from `own`, a tensor in this rank's shard layout)."""
        pending = []
        for b in self.layout.buckets:
            start, end = self.layout.chunk(b, self.rank)
            if own is None:
                chunk = flat[start:end].clone()
            else:
                offset = self.layout.shard_offset(b)
                chunk = own[offset:offset + end - start].to(flat.device, flat.dtype)
            work = comm.all_gather_async(flat[b.start:b.start + b.size], chunk, self.group)
            pending.append(comm.Pending(work, self.group, "all_gather", key=b, keep=chunk))
        for item in pending:
            item.wait()

    # ---- memory ------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """This rank's bytes of parameters, gradients and optimizer state (measured from the
        tensors held) next to the ZeRO paper's formula, with Psi the parameters of this
        model-parallel rank. Padding: every bucket is padded to a multiple of dp*sp*ALIGN
        elements; a term sharded over N ranks holds (Psi + padding) / N elements, an
        unsharded one Psi + padding. ZeRO 3's transiently gathered layers and ZeRO 2/3's
        in-flight bucket gradients are not counted."""
        psi, pad, n = self.layout.numel, self.layout.padding, self.n
        e_param = self.model_dtype.itemsize
        e_master = self.master_dtype.itemsize
        e_grad = self.grad_dtype.itemsize
        e_opt = e_master * (3 if self.separate_master else 2)
        shards = {"params": n if self.stage == 3 else 1, "grads": n if self.stage >= 2 else 1,
                  "optimizer": n if self.stage >= 1 else 1}
        param_tensor = self.param_flat if self.stage < 3 else self.param_shard
        measured = {
            "params": param_tensor.numel() * param_tensor.element_size(),
            "grads": self.grads.nbytes(),
            "optimizer": sum(t.numel() * t.element_size() for t in
                             (self.exp_avg, self.exp_avg_sq,
                              self.master if self.separate_master else None) if t is not None)}
        per_elem = {"params": e_param, "grads": e_grad, "optimizer": e_opt}
        report = {"zero": self.stage, "shards": n, "replicas": self.topo.zero_replica_group.size,
                  "psi": psi, "padding_elements": pad,
                  "align_elements": ALIGN, "buckets": len(self.layout.buckets),
                  "optimizer_device": str(self.opt_device)}
        for term in ("params", "grads", "optimizer"):
            report[f"{term}_bytes"] = measured[term]
            report[f"{term}_formula_bytes"] = per_elem[term] * psi / shards[term]
            report[f"{term}_padding_bytes"] = per_elem[term] * pad / shards[term]
        report["total_bytes"] = sum(measured.values())
        return report
