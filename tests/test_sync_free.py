"""A training step reads the device once: every way a tensor's value can reach Python is
counted during real steps, on one process and on gloo layouts, and must happen once.

On a GPU each such read (`item`, `tolist`, `float(t)`, `if t:`, ...) stalls the host
until the device has caught up, so the step batches the scalars its logic needs (loss,
gradient sum of squares, stop flag) into one transfer. On CPU nothing stalls, which is
why the reads are counted instead: a new `.item()` anywhere in the step (trainer,
optimizer, engine, layers, loss) fails here. Syncs inside torch's C++ (a `nonzero`)
do not pass through Python; tools/gpu_check.sh runs steps under CUDA's sync-debug
mode for those.
"""

import traceback

import pytest
import torch

from dist_harness import run_on_ranks
from parity import config_args, prepared_cache, trainer_on_layout
from megalite.parallel.topology import destroy_topology

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


class CountReads:
    """with CountReads() as reads: ...  reads.calls: (method, caller) per value read."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self._originals = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=3)[0]
            self.calls.append((name, f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}"))
            return original(tensor, *args, **kwargs)
        return read

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory, "sync_free")


def count_reads(args):
    topo, trainer = trainer_on_layout(args)
    if topo is None:
        return None
    try:
        trainer.train_step()  # the first step builds what later ones reuse
        counts = []
        for timed in (False, True):
            with CountReads() as reads:
                trainer.train_step(timed=timed)
            counts.append(reads.calls)
        return counts
    finally:
        destroy_topology(topo)


LAYOUTS = [
    [],
    ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp=2", "--parallel.zero=1",
     "--train.global_batch_size=8"],
    ["--parallel.tp=2", "--parallel.sp=2", "--parallel.tp_sp=true", "--parallel.zero=2"],
    ["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.schedule=interleaved",
     "--parallel.dp=2", "--parallel.zero=2", "--train.precision=fp16",
     "--train.grad_dtype=fp32", "--model.num_layers=4"],
    ["--parallel.tp=2", "--parallel.dp=2", "--parallel.zero=3", "--train.recompute=full"],
    ["--parallel.dp=2", "--train.precision=bf16", "--parallel.zero=1", "--optim.offload=cpu"],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda a: " ".join(a) or "one process")
def test_a_step_reads_the_device_once(cache, tmp_path, layout):
    args = config_args(cache, tmp_path / "run", layout=layout)  # the layout's keys win
    results = run_on_ranks(count_reads, args)
    for rank, per_step in enumerate(results):
        if per_step is None:
            continue
        for calls in per_step:
            assert [name for name, _ in calls] == ["tolist"], (rank, calls)
