"""A rank's memory peaks outside the step follow its shard: start-up, checkpoint save
and load (ZeRO 3, dp 2 and 4, and hybrid sharding at dp 4 over blocks of 2).

Start-up (sharded construction): its peak is its own share of the state, so it shrinks
as 1/dp. Save and load (format 3): what they add above the resident size is bounded by
the largest bucket, not by the model: the owner writes its flat ranges without any
gather, ZeRO 3 gathers one unit at a time for the model weights, one file (one bucket)
is serialised or mapped at a time. Before format 3 a save all-gathered the Adam moments
(8 bytes per local parameter here) on every rank.

Measured as the kernel sees it, in fresh processes (tools/bench_memory.py: VmHWM from
/proc, reset through /proc/self/clear_refs, above the resident size before the model
is built). The bound is the design's: the state the optimizer holds (measured from its
tensors, exactly proportional to 1/N) plus the start-up transient, a few INIT_PIECE
pieces being drawn and cast, plus a fixed allowance for the Python objects of the
model (the zero-filled moments and gradients are not even resident yet: the kernel
hands out zero pages on first write). Building the whole local model first (4 bytes per parameter) and a full fp32
flat copy (4 more), as start-up did before, is far above it at dp 4 (8 bytes per
parameter against a 4-byte state).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.optim.zero import INIT_PIECE

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
# values drawn, scaled and cast for one piece (fp32): at most four copies at once
TRANSIENT = 4 * INIT_PIECE * 4
OBJECTS = 32 * MIB  # modules, parameters' metadata, the layout's tables, allocator slack


def _measure(tmp_path, dp: int) -> dict:
    out = tmp_path / f"dp{dp}.json"
    subprocess.run([sys.executable, "tools/bench_memory.py", "--dp", str(dp), "--hidden", "512",
                    "--layers", "4", "--zero", "3", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=1200, capture_output=True)
    return {(run["zero_shard"]): run["ranks"] for run in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peaks")
    return {dp: _measure(tmp, dp) for dp in (2, 4)}


def test_zero3_peaks_outside_the_step_follow_the_shard(runs):
    states = {}
    for dp, by_shard in runs.items():
        for shard, ranks in by_shard.items():
            for rank, r in ranks.items():
                where = f"dp {dp}, zero_shard {shard or dp}, rank {rank}"
                assert r["peak_build"] <= r["total_bytes"] + TRANSIENT + OBJECTS, (
                    f"{where}: start-up peak {r['peak_build'] / MIB:.1f} MiB for "
                    f"{r['total_bytes'] / MIB:.1f} MiB of state")
                assert r["peak_build"] <= r["peak_step"], f"{where}: start-up above the step"
                # the unit gathered for the model weights, one file's tensors and bytes
                bound = 2 * r["largest_bucket_bytes"] + OBJECTS
                for what in ("save", "load"):
                    assert r[f"{what}_transient"] <= bound, (
                        f"{where}: the {what} adds {r[f'{what}_transient'] / MIB:.1f} MiB, "
                        f"more than two buckets ({bound / MIB:.1f} MiB with slack)")
            states[(dp, shard)] = ranks["0"]["total_bytes"]
    # the peak follows the shard: lower at dp 4 than at dp 2, and hybrid sharding at dp 4
    # over blocks of 2 holds what full sharding at dp 2 holds
    assert runs[4][0]["0"]["peak_build"] < runs[2][0]["0"]["peak_build"]
    assert states[(4, 0)] < states[(2, 0)] == states[(4, 2)]
