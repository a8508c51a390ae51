"""Profiling chosen training steps: a torch.profiler trace and a CUDA memory snapshot.

`log.profile_steps` lists optimizer steps (counted from 1, as in metrics.jsonl). The
trainer wraps every step:

    profiler = StepProfiler(cfg.log.profile_steps, run_dir, device, rank)
    with profiler.step(step):       # does nothing unless `step` is listed
        ...one optimizer step...

For a listed step each rank writes, under `<run_dir>/profile/`:

- `step_NNNNNNN_rank_RRRRR.trace.json`: the torch.profiler trace of that step (CPU ops
  and, on CUDA, kernels), in Chrome trace format: open it in https://ui.perfetto.dev
  or chrome://tracing.
- on CUDA, `step_NNNNNNN_rank_RRRRR.memory.pickle`: the caching allocator's history
  during the step, for https://pytorch.org/memory_viz. PyTorch only writes this format
  as a pickle; megalite writes it for that viewer and never loads it. Without CUDA
  there is no allocator history to record, so the snapshot is skipped with a note.

Each listed step is profiled on its own (no warm-up/active schedule): the steps to
look at are the user's choice, and a later step is the way to leave warm-up out.

Also here: `StepClock`, the marks that split a step's time (CUDA events on a GPU, where
host clocks around asynchronous calls measure nothing), and `SyncDebug`, the
sync-debug mode that proves a step waits for the device only where it means to.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from megalite.errors import ConfigError

# Allocator events kept while recording a step's memory history; one step of a large
# model makes tens of thousands, and the ring buffer keeps only the newest.
MEMORY_HISTORY_ENTRIES = 200_000


def parse_profile_steps(profile_steps) -> set[int]:
    """`log.profile_steps` as a set of ints; the config may hold them as strings
    (`--log.profile_steps=5,10`)."""
    steps = set()
    for value in profile_steps or ():
        try:
            step = int(str(value))
        except ValueError:
            step = 0
        if step < 1:
            raise ConfigError(f"log.profile_steps holds {value!r}; it lists optimizer steps, "
                              f"integers >= 1, e.g. --log.profile_steps=[5,20].")
        steps.add(step)
    return steps


class StepProfiler:
    """Records the steps listed in `profile_steps`; a no-op for every other step."""

    def __init__(self, profile_steps, run_dir, device: str = "cpu", rank: int = 0):
        self.steps = parse_profile_steps(profile_steps)
        self.out_dir = Path(run_dir) / "profile"
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.rank = rank
        self.written: list[Path] = []  # every file written, in order
        self._active = None  # (step, torch.profiler.profile) while a step is recorded

    def _path(self, step: int, suffix: str) -> Path:
        return self.out_dir / f"step_{step:07d}_rank_{self.rank:05d}.{suffix}"

    def start(self, step: int) -> None:
        """Begin recording `step` if it is listed."""
        if step not in self.steps or self._active is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Kernel timings where this torch build can trace them (CUPTI), else CPU ops only.
        activities = [a for a in (torch.profiler.ProfilerActivity.CPU,
                                  torch.profiler.ProfilerActivity.CUDA)
                      if a in torch.profiler.supported_activities()
                      and (self.cuda or a == torch.profiler.ProfilerActivity.CPU)]
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        # Shapes and allocations make the trace answer "which op, how big"; Python stacks
        # would multiply its size and the step's time, so they stay off.
        prof = torch.profiler.profile(activities=activities, record_shapes=True,
                                      profile_memory=True)
        prof.start()
        self._active = (step, prof)

    def stop(self) -> None:
        """Finish the step being recorded (if any) and write its files."""
        if self._active is None:
            return
        step, prof = self._active
        self._active = None
        prof.stop()
        trace = self._path(step, "trace.json")
        prof.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self.cuda:
            snapshot = self._path(step, "memory.pickle")
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
            note = f"memory snapshot {snapshot}"
        else:
            note = "CUDA memory snapshot skipped (no CUDA device)"
        print(f"[megalite] rank {self.rank} profiled step {step}: trace {trace}; {note}",
              flush=True)

    @contextlib.contextmanager
    def step(self, step: int):
        """Around one optimizer step; the files are written even if the step raises."""
        self.start(step)
        try:
            yield
        finally:
            self.stop()


class StepClock:
    """Marks inside a step and the time between them. On CPU the host clock; on CUDA
    events on the compute stream: the host returns from asynchronous launches long
    before the work is done, so only the stream knows when a phase ended. Reading
    CUDA marks (`intervals`) waits for the last one, so the trainer reads them only
    on the steps it logs."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []

    def start(self) -> None:
        self.marks = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class SyncDebug:
    """MEGALITE_SYNC_DEBUG=1 on CUDA (tools/gpu_check.sh sets it): each training step
    runs under torch.cuda.set_sync_debug_mode("error"), so any host-device
    synchronisation raises, except inside `allowed()`: the step's one transfer of its
    scalars and, on logged steps, the read of its timings."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextlib.contextmanager
    def _mode(self, inside: str, after: str):
        if not self.enabled:
            yield
            return
        torch.cuda.set_sync_debug_mode(inside)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(after)

    def step(self):
        return self._mode("error", "default")

    def allowed(self):
        return self._mode("default", "error")
