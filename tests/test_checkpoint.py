"""Distributed checkpoints: resume in another layout, offline reshard, crash safety.

- Save in (dp2, tp2, pp2, zero1) after 3 steps; resume in (dp1, tp1, pp1), (tp4, pp2),
  (dp4, zero2) and (sp2, tp2, pp2) for 3 steps, save, and resume back in the first
  layout for 2 more: every loss equals the uninterrupted single-process run
  (tests/reference.py) to float64 rounding (rel 1e-9, as the parity tests).
- Offline reshard A -> B -> A gives byte-identical tensors, and B loads in layout B.
- A rank SIGKILLed in the middle of a save (its files written, the index not) leaves
  the previous checkpoint as `latest`; resuming from it continues exactly like the
  uninterrupted run (bit-identical losses).
"""

import json
import subprocess
import sys

import pytest
import torch

from dist_harness import assert_finished, run_on_ranks, torchrun
from megalite.checkpoint import format as ckpt
from megalite.cli import parse_args
from megalite.checkpoint.reshard import reshard
from megalite.parallel.topology import build_topology, destroy_topology
from megalite.training.trainer import Trainer
from reference import reference_run
from parity import FP64_RTOL, config_args

FIRST = dict(dp=2, tp=2, pp=2, zero=1)
OTHERS = [dict(), dict(tp=4, pp=2), dict(dp=4, zero=2, zero_shard=2), dict(sp=2, tp=2, pp=2)]


def layout_args(layout):
    return [f"--parallel.{k}={v}" for k, v in layout.items()]


@pytest.fixture(scope="module")
def reference_losses(cache, tmp_path_factory):
    history, _, _ = reference_run(config_args(cache, tmp_path_factory.mktemp("ref")), 8)
    return [loss for loss, _ in history]


def train_save(args, resume, steps):
    """Runs on every pool rank: resume (or start), train `steps`, save; losses, path."""
    cfg, _ = parse_args(args)
    p = cfg.parallel
    topo = build_topology(p.tp, p.sp, p.dp, p.pp, timeout_s=120, zero_shard=p.zero_shard)
    if topo is None:
        return None
    trainer = Trainer(cfg, resume=resume, topo=topo)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    path = trainer.save()
    destroy_topology(topo)
    return losses, str(path)


def first_result(results):
    return next(r for r in results if r is not None)


@pytest.fixture(scope="module")
def first_checkpoint(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("first")
    losses, path = first_result(run_on_ranks(
        train_save, config_args(cache, run, layout=layout_args(FIRST)), None, 3))
    return losses, path


def test_first_layout_matches_reference(first_checkpoint, reference_losses):
    losses, path = first_checkpoint
    assert losses == pytest.approx(reference_losses[:3], rel=FP64_RTOL)
    index = ckpt.read_index(path)
    assert index["layout"]["tp"] == 2 and index["world_size"] == 8
    # every rank wrote its RNG; model slices come from dp = 0 ranks only
    assert len([f for f in index["files"] if f.startswith("rng-")]) == 8
    assert all(int(f[6:11]) % 4 < 2 for f in index["files"] if f.startswith("model-"))


@pytest.mark.parametrize("layout", OTHERS, ids=str)
def test_resume_in_another_layout_and_back(cache, tmp_path, first_checkpoint,
                                           reference_losses, layout):
    _, path = first_checkpoint
    losses, second = first_result(run_on_ranks(
        train_save, config_args(cache, tmp_path / "b", layout=layout_args(layout)), path, 3))
    assert losses == pytest.approx(reference_losses[3:6], rel=FP64_RTOL)
    losses, _ = first_result(run_on_ranks(
        train_save, config_args(cache, tmp_path / "c", layout=layout_args(FIRST)), second, 2))
    assert losses == pytest.approx(reference_losses[6:8], rel=FP64_RTOL)


def test_format_2_checkpoint_resumes(cache, tmp_path, first_checkpoint, reference_losses):
    """Format 2 held the optimizer state as boxes of the global tensors, as reshard writes
    it: marked as version 2, such a checkpoint resumes with the uninterrupted losses."""
    _, path = first_checkpoint
    old = reshard(path, tmp_path / "v2", dict(FIRST))
    index = json.loads((old / "index.json").read_text())
    assert not any("offset" in piece for entry in index["tensors"].values()
                   for piece in entry["pieces"])  # boxes only
    index["format_version"] = 2
    (old / "index.json").write_text(json.dumps(index))
    losses, _ = first_result(run_on_ranks(
        train_save, config_args(cache, tmp_path / "b", layout=layout_args(FIRST)), old, 3))
    assert losses == pytest.approx(reference_losses[3:6], rel=FP64_RTOL)


def all_tensors(path):
    reader = ckpt.CheckpointReader(path)
    return {n: reader.read(n) for n in reader.tensors}


def test_offline_reshard_round_trip_is_byte_identical(cache, tmp_path, first_checkpoint,
                                                      reference_losses):
    _, path = first_checkpoint
    there = reshard(path, tmp_path / "b", dict(tp=4, pp=1, dp=2, zero=2))
    index = ckpt.read_index(there)
    assert index["layout"]["tp"] == 4 and index["config"]["parallel"]["tp"] == 4
    assert {f for f in index["files"] if f.startswith("model-")} == {
        f"model-{r:05d}.safetensors" for r in range(4)}
    back = reshard(there, tmp_path / "a", dict(FIRST))
    original, returned = all_tensors(path), all_tensors(back)
    assert set(original) == set(returned)
    for name, value in original.items():
        assert value.dtype == returned[name].dtype and torch.equal(value, returned[name]), name
    one = reshard(path, tmp_path / "one", {}, consolidate=True)
    assert list(ckpt.read_index(one)["files"]) == ["consolidated.safetensors"]
    # the resharded checkpoint resumes in its own layout like the uninterrupted run
    losses, _ = first_result(run_on_ranks(
        train_save, config_args(cache, tmp_path / "run", layout=layout_args(
            dict(tp=4, dp=2, zero=2))), str(there), 1))
    assert losses == pytest.approx(reference_losses[3:4], rel=FP64_RTOL)


def test_reshard_rejects_a_layout_the_model_cannot_take(tmp_path, first_checkpoint):
    _, path = first_checkpoint
    result = subprocess.run([sys.executable, "tools/reshard.py", path, str(tmp_path / "x"),
                             "--tp", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "tp" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


KILL_DURING_SAVE = """
import os, signal, sys
from megalite.checkpoint import format as checkpoint
close = checkpoint.PartWriter.close
def killed_mid_save(self):
    close(self)
    if self.rank == 1 and self.tmp.name.startswith("step_0000004"):
        os.kill(os.getpid(), signal.SIGKILL)  # files written, part reported, no commit
checkpoint.PartWriter.close = killed_mid_save
from megalite.train import main
sys.exit(main())
"""


def losses_of(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_rank_killed_during_save_leaves_previous_checkpoint(cache, tmp_path):
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    base = [*config_args(cache, tmp_path / "run", layout=["--parallel.dp=2"]),
            "--train.steps=6", "--checkpoint.every=2", "--log.every=1"]
    out = torchrun(str(script), base)
    assert out.returncode != 0
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.resolve_checkpoint("latest", root).name == "step_0000002"
    assert not (root / "step_0000004").exists()
    resumed = torchrun("-m megalite.train", [*base, "--resume_from_checkpoint", "latest"])
    assert_finished(resumed, tmp_path / "run")
    whole = torchrun("-m megalite.train",
                     [*config_args(cache, tmp_path / "whole", layout=["--parallel.dp=2"]),
                      "--train.steps=6", "--log.every=1"])
    assert_finished(whole, tmp_path / "whole")
    after, expected = losses_of(tmp_path / "run"), losses_of(tmp_path / "whole")
    for step in range(3, 7):
        assert after[step] == expected[step], step
