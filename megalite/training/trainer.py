"""The training loop.

`Trainer(cfg)` builds data, model, optimizer, LR schedule and step guard from a
validated config; `train()` runs optimizer updates (steps count from 1) with gradient
accumulation over micro-batches (every layout through the pipeline engine, pp = 1 being
its one-stage case), mixed precision, global-norm clipping (all three in
the ZeRO optimizer, optim/zero.py, at every stage 0-3), the step guard, validation
(at step 0 and every `train.eval_every` steps, on a fixed slice of the validation
split, touching neither the training RNG nor the training sample order), metrics,
and checkpoints every N steps / T minutes, at the end, on SIGUSR1 (then goes on) and
on SIGINT/SIGTERM: a stop lets the current step finish, saves, and returns normally
(exit code 0; training/signals.py). Under launch.sh, rank 0 then writes the outcome
file launch.sh reads its exit status from ($MEGALITE_OUTCOME_FILE).

A step reads the device once (loss, gradient sum of squares and the signal flags in one
transfer) and times itself only when it is logged (CUDA events on a GPU), so a GPU
never waits for the host in between; see `train_step`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from megalite.checkpoint import format as ckpt
from megalite.parallel import launch as distributed
from megalite.config import save_yaml
from megalite.data.build import build_data, resolve_with_data
from megalite.data.sampler import BatchSampler, validation_count
from megalite.training.guard import StepGuard
from megalite.training.metrics import (MetricsLogger, console_line, flops_per_token,
                                       memory_stats, mfu, peak_flops)
from megalite.optim.schedule import LRSchedule
from megalite.optim.zero import ZeroOptimizer
from megalite.parallel import comm
from megalite.model.build import build_meta_model, parameter_init
from megalite.parallel.sequence import shard_batch
from megalite.parallel.pipeline.engine import PipelineEngine
from megalite.training.profiling import StepClock, StepProfiler, SyncDebug
from megalite.training.signals import RunSignals, stop_budget_warning
from megalite.training.staging import StagedBatches, read_rows
from megalite.checkpoint.sharding import load_trainer_state, partitioning, save_trainer_state


class Trainer:
    def __init__(self, cfg, resume: str | None = None, topo=None, device: str = "cpu"):
        """`topo`: an existing rank grid (tests build several in one world); by default
        the process group and grid come from torchrun's environment."""
        self.cfg = cfg
        self.topo, self.device = (topo, device) if topo else distributed.setup(cfg)
        self.main = self.topo.rank == 0
        self.data = build_data(cfg)
        resolve_with_data(cfg, self.data, self.device.split(":")[0])
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)
        # Sharded start-up: the model exists on the meta device only until the optimizer
        # gives each rank its buffers and fills just what that rank holds.
        self.model = build_meta_model(cfg, self.topo)
        tp_sp_divisor = self.topo.tp if cfg.parallel.tp_sp else 1
        # Every layout runs through the engine: one stage (pp = 1) is its trivial case.
        self.pipeline = PipelineEngine(self.model, self.topo, tp_sp_divisor)
        # Takes the parameters over: flat buffers, model dtype, fp32 master, grad hooks.
        self.optimizer = ZeroOptimizer(self.model, cfg, self.topo,
                                       init=parameter_init(self.model, cfg))
        self.schedule = LRSchedule.from_config(cfg)
        self.guard = StepGuard.from_config(cfg)
        self.sampler = BatchSampler(len(self.data.train), cfg.train.global_batch_size,
                                    cfg.train.seed, self.topo.dp_rank, self.topo.dp)
        self.step = 0
        self.last_loss = None
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir)
        self.last_saved = self.last_saved_path = None
        if resume:
            self.load(ckpt.resolve_checkpoint(resume, self.ckpt_dir))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            save_yaml(cfg, self.run_dir / "config.yaml")
        cuda = self.device.startswith("cuda")
        device_name = torch.cuda.get_device_name() if cuda else "cpu"
        self.metrics = MetricsLogger(self.run_dir, enabled=self.main, device=device_name,
                                     tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                                     wandb_project=cfg.log.wandb_project, run_name=cfg.run.name,
                                     config=cfg.to_dict())
        self.profiler = StepProfiler(cfg.log.profile_steps, self.run_dir, self.device,
                                     self.topo.rank)
        self.metrics.truncate_after(self.step)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        peak = peak_flops(device_name if cuda else None, cfg.log.peak_tflops)
        self.peak = peak * self.topo.world_size if peak else None
        self.batches = StagedBatches(self.data.train, self.sampler, self.device)
        self.clock = StepClock(self.device)
        self._sync_debug = SyncDebug(cuda and os.environ.get("MEGALITE_SYNC_DEBUG") == "1")
        self._groups = list({id(g): g for g in self.topo.groups}.values())

    # ---- one step -----------------------------------------------------------------
    def _batch(self, dataset, indices):
        return shard_batch(read_rows(dataset, indices, self.device), self.topo, self.cfg)

    def _mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        """Average a per-rank loss over dp x sp on the device, so every rank logs and
        decides alike (read to the host with the step's other scalars)."""
        value = value.detach().clone().reshape(1).to(torch.float64)
        comm.all_reduce(value, self.topo.dp_sp_group)
        return value / self.topo.dp_sp_group.size

    def _comm_counters(self) -> tuple[dict, float, float]:
        """(bytes per group, seconds blocked in pipeline p2p, seconds blocked in the
        other collectives) settled so far, on this rank."""
        p2p = sum(g.seconds["p2p"] for g in self._groups)
        return ({g.name: sum(g.bytes.values()) for g in self._groups}, p2p,
                sum(sum(g.seconds.values()) for g in self._groups) - p2p)

    def _memory(self) -> dict:
        """This rank's memory stats plus the largest over all ranks (`*_max`): the rank
        that runs out first is the one that matters. Every rank must call it."""
        stats = memory_stats(self.device)
        keys = [k for k, v in stats.items() if v is not None]
        peak = self.topo.all_reduce(
            torch.tensor([float(stats[k]) for k in keys], device=self.topo.device), op="max")
        return {**stats, **{f"{k}_max": int(v) for k, v in zip(keys, peak.tolist())}}

    def train_step(self, signals: RunSignals | None = None, timed: bool = True) -> dict:
        """One optimizer update. Besides loss, norm and throughput, the record splits the
        step time on this rank into compute (forward + backward), pipeline (blocked in
        p2p: the bubble plus transfers), comm (blocked in any other collective: the
        communication not hidden behind compute) and optimizer (clip, AdamW, write-back)
        and gives the bytes this rank moved through each group. `signals`' stop and save
        requests become flags every rank agrees on in this step (`record["stop"]`,
        `record["save"]`).

        The host reads the device once: loss, gradient sum of squares and stop flag in
        one transfer, from which the guard, the loss scaler and the clipping decide.
        `timed=False` leaves the timings out: on CUDA reading them waits for the GPU,
        so the loop times only the steps it logs."""
        with self._sync_debug.step():
            return self._train_step(signals, timed)

    def _train_step(self, signals, timed: bool) -> dict:
        cfg, clock = self.cfg, self.clock
        comm.settle(self._groups, read=False)  # what validation or a save left
        clock.start()
        bytes0, p2p0, comm0 = self._comm_counters()
        offloaded0 = self.model.offload.bytes_offloaded
        lr = self.schedule(self.step + 1)
        self.model.train()
        indices, rows = self.batches.next_step()
        self.optimizer.zero_grad()
        loss_sum = self.forward_backward(self.micro_batches(indices), rows)
        clock.mark()
        cut = comm.marks(self._groups)
        stop, save = bool(signals and signals.stop_requested), bool(signals and signals.save_requested)
        if save:
            signals.saved()  # taken into this step; a later SIGUSR1 asks again
        # filled on the device (a host tensor copied over would be a transfer more)
        flags = [torch.full((), float(f), dtype=torch.float64, device=self.topo.device)
                 for f in (stop, save)]
        # all are sums over the whole grid: one reduction (equal on every rank after it)
        grid_sums = self.topo.all_reduce(
            torch.stack([self.optimizer.local_grad_sum_squares(), *flags]))
        scalars = torch.cat([self._mean_over_replicas(loss_sum), grid_sums])
        with self._sync_debug.allowed():
            loss, sum_squares, stopping, saving = scalars.tolist()  # the step's one transfer
        grad_norm, found_inf = self.optimizer.set_norm(sum_squares)
        # An fp16 overflow is the loss scaler's business: skipped, scale lowered, not
        # a spike. In bf16/fp32 a non-finite gradient is the guard's "nan_grad".
        skip = self.guard.check(loss, grad_norm,
                                overflow=found_inf and self.optimizer.scaler is not None)
        if skip is None:
            self.optimizer.step(lr)
        else:
            self.optimizer.skip()
        self.step += 1
        self.last_loss = loss
        clock.mark()
        self.batches.stage_next()  # read and copy while the GPU runs the update
        record = {"step": self.step, "epoch": self.sampler.epochs_consumed, "loss": loss,
                  "lr": lr, "grad_norm": grad_norm, "skipped": self.guard.skipped,
                  "skip_reason": skip, "stop": stopping > 0, "save": saving > 0,
                  **({"loss_scale": self.optimizer.loss_scale} if self.optimizer.scaler else {}),
                  **({"offload_bytes": self.model.offload.bytes_offloaded - offloaded0}
                     if self.model.offload.enabled else {})}
        if not timed:
            return record
        with self._sync_debug.allowed():
            fb_time, rest = clock.intervals()
        comm.settle(self._groups, cut)
        _, p2p1, comm1 = self._comm_counters()
        comm.settle(self._groups)
        bytes2, p2p2, comm2 = self._comm_counters()
        step_time = fb_time + rest
        tokens_per_s = cfg.train.global_batch_size * cfg.train.seq_len / step_time
        split = {"time_compute": fb_time - (p2p1 - p2p0) - (comm1 - comm0),
                 "time_pipeline": p2p2 - p2p0, "time_comm": comm2 - comm0,
                 "time_optimizer": rest - (p2p2 - p2p1) - (comm2 - comm1)}
        return {**record, "tokens_per_s": tokens_per_s, "step_time": step_time,
                "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak), **split,
                "comm_bytes": {g: bytes2[g] - bytes0[g] for g in bytes2 if bytes2[g] > bytes0[g]}}

    def micro_batches(self, indices) -> list:
        mbs = self.cfg.train.micro_batch_size
        return [indices[i:i + mbs] for i in range(0, len(indices), mbs)]

    def forward_backward(self, micro_batches, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Accumulate the gradients of the mean loss over `micro_batches` (lists of sample
        indices; `rows`: their token rows on the device, in that order, if already
        staged); returns that loss on every rank of the pipeline."""
        # Every micro-batch has the same token count, so the mean of per-micro-batch
        # means is the mean over the global batch: each gradient is averaged once.
        weight, opt = 1.0 / len(micro_batches), self.optimizer
        if rows is None:
            batches = [self._batch(self.data.train, micro) for micro in micro_batches]
        else:
            batches = [shard_batch(part, self.topo, self.cfg)
                       for part in rows.split([len(m) for m in micro_batches])]
        scale = opt.loss_scale  # fp16: folded into the weight the engine applies
        # The data-parallel buckets reduce during the last backward (ZeRO 0/1 overlap).
        loss_sum = self.pipeline.run(self.cfg.parallel.schedule, batches,
                                     [weight * scale] * len(batches),
                                     final_backward=lambda: opt.micro_batch(is_last=True))
        # The loss exists on the last stage only; the sum hands it to every stage.
        return comm.all_reduce(loss_sum, self.topo.pp_group) / scale

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over a fixed slice of the validation split, shared out over dp ranks."""
        self.model.eval()
        mbs, dp = self.cfg.train.micro_batch_size, self.topo.dp
        count = validation_count(len(self.data.val), self.cfg.train.eval_batches, mbs, dp)
        mine = list(range(self.topo.dp_rank, count, dp))
        batches = [self._batch(self.data.val, mine[start:start + mbs])
                   for start in range(0, len(mine), mbs)]
        total = self.pipeline.run("forward", batches, [len(b[0]) for b in batches])
        comm.all_reduce(total, self.topo.pp_group)
        self.model.train()
        return self._mean_over_replicas(total / len(mine)).item()

    # ---- the loop -----------------------------------------------------------------
    def train(self, signals: RunSignals | None = None) -> int:
        """Run to train.steps (or a stop). `signals`: handlers installed by the caller
        (megalite.train does it before start-up, so a stop then is not lost)."""
        cfg = self.cfg
        print(f"[megalite] run directory: {self.run_dir}  device: {self.device}  "
              f"params: {self.num_params():,}", flush=True)
        self._print_memory_report()
        start_step, started = self.step, time.time()
        last_save_time = time.time()
        self._check_stop_fits()
        step_timed = stopped = False
        with contextlib.ExitStack() as stack:
            if signals is None:
                signals = stack.enter_context(RunSignals(cfg.run.stop_window_s))
            if self.step == 0 and cfg.train.eval_every:
                record = {"step": 0, "epoch": 0.0, "val_loss": self.validate(),
                          "lr": self.schedule(1), **self._memory()}
                self.metrics.log(record)
                print(console_line(record, cfg.train.steps, 0.0), flush=True)
            while self.step < cfg.train.steps:
                with self.profiler.step(self.step + 1):
                    record = self.train_step(signals, timed=self._logs(self.step + 1))
                stopping, saving = record.pop("stop"), record.pop("save")
                if "step_time" in record and not step_timed:  # the first timed step
                    step_timed = True
                    self._stop_warning(record["step_time"])
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    record["val_loss"] = self.validate()
                if self._logs(self.step):
                    record.update(self._memory())
                    self.metrics.log(record)
                    print(console_line(record, cfg.train.steps, time.time() - started,
                                       start_step), flush=True)
                due_minutes = (cfg.checkpoint.every_minutes
                               and time.time() - last_save_time >= 60 * cfg.checkpoint.every_minutes)
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or due_minutes \
                        or (saving and not stopping):
                    self.save()
                    last_save_time = time.time()
                if stopping:  # every rank saw the same flag in this step's transfer
                    stopped = signals.stop_requested or "a stop signal to another rank"
                    break
            if self.last_saved != self.step:
                self.save()
        self.metrics.close()
        if stopped:
            print(f"[megalite] {stopped}: stopped cleanly after step {self.step}; resume with "
                  f"--resume_from_checkpoint latest", flush=True)
        self._write_outcome("stopped" if stopped else "finished")
        print(f"[megalite] run directory: {self.run_dir}  checkpoint: {self.last_saved_path}",
              flush=True)
        return 0

    def num_params(self) -> int:
        """Parameters of the whole model (unpadded global shapes), whatever the layout."""
        return sum(math.prod(info["shape"]) for info in partitioning(self.cfg.model).values())

    def _print_memory_report(self) -> None:
        """Every rank's parameter/gradient/optimizer bytes next to the ZeRO formula, in its
        own log (rank 0's also on the console)."""
        r = self.optimizer.memory_report()
        terms = "  ".join(f"{t} {r[f'{t}_bytes'] / 2**20:.2f} MiB (formula "
                          f"{r[f'{t}_formula_bytes'] / 2**20:.2f} + padding "
                          f"{r[f'{t}_padding_bytes'] / 2**20:.2f})"
                          for t in ("params", "grads", "optimizer"))
        print(f"[megalite] rank {self.topo.rank} memory: zero {r['zero']} over {r['shards']} "
              f"ranks, psi {r['psi']:,}: {terms}", flush=True)

    def _logs(self, step: int) -> bool:
        """Whether `step` writes a metrics record (and so is timed)."""
        t = self.cfg.train
        return (step % self.cfg.log.every == 0 or step == t.steps
                or bool(t.eval_every and step % t.eval_every == 0))

    # ---- checkpoints ---------------------------------------------------------------
    def _check_stop_fits(self) -> None:
        """Estimate how long a save takes (this rank's share of a checkpoint over the
        write speed measured now, every rank writing at once as in a save) and warn when
        a stop could not fit torchrun's and Slurm's 30 s (training/signals.py)."""
        opt = self.optimizer
        share = opt.memory_report()["optimizer_bytes"]
        if opt.stage == 0:  # every rank holds everything and writes 1/(dp x sp) of it
            share //= self.topo.dp_sp_group.size
        if self.topo.dp_sp_group.rank == 0:  # the model weights of this (stage, TP rank)
            share += sum(p.numel() for p in opt.layout.params) * opt.model_dtype.itemsize
        probe = max(min(share, 64 << 20), 1 << 20)
        seconds = share / ckpt.measure_write_speed(self.ckpt_dir, probe)
        worst = torch.tensor([seconds, float(share)], dtype=torch.float64, device=self.topo.device)
        self.save_estimate = self.topo.all_reduce(worst, "max").tolist()  # (s, bytes)
        self._stop_warned = False
        self._stop_warning(None)

    def _stop_warning(self, step_s: float | None) -> None:
        """Print the stop-budget warning (once; again with the step time when known)."""
        seconds, share = self.save_estimate
        warning = stop_budget_warning(seconds, int(share), step_s)
        if warning and self.main and not self._stop_warned:
            print(warning, flush=True)
        self._stop_warned |= warning is not None

    def _write_outcome(self, status: str) -> None:
        """Rank 0, after the last commit: what the run did, for launch.sh's exit status
        (a clean stop exits 0 whatever torchrun's status after the signals)."""
        path = os.environ.get("MEGALITE_OUTCOME_FILE")
        if path and self.main:
            ckpt.write_text_atomic(Path(path), json.dumps(
                {"status": status, "step": self.step, "checkpoint": str(self.last_saved_path)}))

    def save(self) -> Path:
        """Every rank writes its own shards (checkpoint/sharding.py); rank 0 commits the index."""
        meta = {"consumed_samples": self.sampler.state_dict()["consumed_samples"],
                "sampler": self.sampler.state_dict(), "loss": self.last_loss,
                "tokenizer": str(self.data.tokenizer.path),
                "schedule": self.schedule.state_dict(), "guard": self.guard.state_dict(),
                "scaler": self.optimizer.scaler and self.optimizer.scaler.state_dict(),
                "config": self.cfg.to_dict()}
        path = save_trainer_state(self, meta)
        self.last_saved, self.last_saved_path = self.step, path
        return path

    def load(self, path: Path) -> None:
        """Restore everything from a checkpoint written in any layout; every check runs
        before any state changes."""
        index = load_trainer_state(self, path)
        self.schedule.load_state_dict(index["schedule"], strict=False)
        if self.optimizer.scaler is not None and index.get("scaler"):
            self.optimizer.scaler.load_state_dict(index["scaler"])
        self.sampler.load_state_dict(index["sampler"])
        self.guard.load_state_dict(index["guard"])
        self.step = index["step"]
        self.last_loss = index["loss"]
        self.last_saved, self.last_saved_path = self.step, path
        print(f"[megalite] resumed from {path} at step {self.step}", flush=True)
