"""End-to-end training: loss falls, checkpoints round-trip, a stopped run resumes exactly.

The interrupted-run tests go through the real entry points (`python -m megalite.train`
and `./launch.sh` under torchrun) and compare the losses in metrics.jsonl bit for bit
with an uninterrupted in-process run. Dropout is on so the RNG state must be restored.
"""

import json
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from dist_harness import assert_finished
from megalite.checkpoint import format as ckpt
from parity import prepared_cache
from megalite.cli import parse_args
from megalite.errors import CheckpointError
from megalite.parallel import fused
from megalite.training.trainer import Trainer


def tiny_args(cache, run_dir, steps=12, extra=()):
    return ["--model.hidden_size=64", "--model.num_layers=2", "--model.num_heads=4",
            "--model.num_kv_heads=2", "--model.dropout=0.1", "--train.seq_len=32",
            "--train.micro_batch_size=4", "--train.global_batch_size=8", f"--train.steps={steps}",
            "--train.eval_every=4", "--train.eval_batches=2", "--log.every=1",
            "--optim.warmup_steps=2", "--optim.lr=3e-3", "--data.corpus_max_mb=0.3",
            "--data.vocab_size=512", f"--data.cache_dir={cache}", f"--run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory, "data_cache", tiny_args)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in rows}


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    cfg, _ = parse_args(tiny_args(cache, run_dir))
    Trainer(cfg).train()
    return run_dir


def test_loss_falls_and_run_dir_is_complete(reference):
    record = losses(reference)
    assert record[12][1] < record[0][1] - 0.5  # validation loss at the end vs step 0
    assert (reference / "config.yaml").is_file() and (reference / "metrics.csv").is_file()
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_0000012"
    index = ckpt.read_index(reference / "checkpoints" / "step_0000012")
    assert index["step"] == 12 and index["consumed_samples"] == 96
    # every record says how much of the training corpus the run has consumed
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    samples = index["sampler"]["num_samples"]
    assert [r["epoch"] for r in rows] == [r["step"] * 8 / samples for r in rows]
    assert {"hostname", "hardware", "torch_version", "timestamp", "config"} <= set(index)


def test_checkpoint_round_trip(cache, reference, tmp_path):
    cfg, _ = parse_args(tiny_args(cache, tmp_path))
    trainer = Trainer(cfg, resume=str(reference / "checkpoints" / "step_0000012"))
    path = reference / "checkpoints" / "step_0000012"
    stored = ckpt.read_model_tensors(path)
    for name, p in fused.stored_tensors(trainer.model.named_parameters()).items():
        assert torch.equal(p, stored[name]), name
    assert trainer.step == 12 and trainer.sampler.state_dict()["consumed_samples"] == 96
    reader = ckpt.CheckpointReader(path)
    state = trainer.optimizer.state_tensors()
    assert set(state) == set(reader.names("optim"))
    for key, value in state.items():
        assert torch.equal(value, reader.read(key)), key
    assert trainer.optimizer.step_count == 12


def _run_until_signal(args, stop_at):
    """Run the entry point, send SIGINT once step `stop_at` is logged; return exit code."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith(f"step {stop_at}/"):
            proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return proc.returncode, "".join(output)


def test_sigint_at_random_step_then_resume_is_bit_identical(cache, reference, tmp_path):
    stop_at = random.Random().randint(2, 9)
    args = [sys.executable, "-m", "megalite.train", *tiny_args(cache, tmp_path)]
    code, out = _run_until_signal(args, stop_at)
    assert code == 0, out
    assert "Traceback" not in out and "stopped cleanly" in out
    stopped = int((tmp_path / "checkpoints" / "latest").read_text().strip()[5:])
    assert stopped >= stop_at
    done = subprocess.run(args + ["--resume_from_checkpoint", "latest"], capture_output=True,
                          text=True, timeout=120)
    assert_finished(done, tmp_path)
    assert losses(tmp_path) == losses(reference)  # exact float equality, step 0..12


def test_launcher_stop_and_resume(cache, reference, tmp_path):
    """Ctrl-C through ./launch.sh and torchrun: exit 0, no traceback, exact resume."""
    args = ["./launch.sh", "configs/tiny.yaml", *tiny_args(cache, tmp_path)]
    code, out = _run_until_signal(args, 5)
    assert code == 0, out
    assert "Traceback" not in out
    done = subprocess.run(args + ["--resume_from_checkpoint=latest"], capture_output=True,
                          text=True, timeout=180)
    assert_finished(done, tmp_path)
    assert losses(tmp_path) == losses(reference)


def test_launcher_reports_bad_resume_target_before_starting(cache, tmp_path):
    out = subprocess.run(["./launch.sh", "configs/tiny.yaml", *tiny_args(cache, tmp_path),
                          "--resume_from_checkpoint", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "is not a complete checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert "torch.distributed" not in out.stderr  # no worker was started


@pytest.mark.parametrize("damage, message", [
    ("missing", "is missing"), ("truncate", "truncated"), ("corrupt", "sha256"),
    ("no_index", "not a complete checkpoint"),
])
def test_damaged_checkpoint_gives_clear_error(cache, reference, tmp_path, damage, message):
    step_dir = tmp_path / "step_0000012"
    shutil.copytree(reference / "checkpoints" / "step_0000012", step_dir)
    target = sorted(step_dir.glob("optim-*.safetensors"))[0]  # format 3: one per bucket
    if damage == "missing":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (step_dir / "index.json").unlink()
    cfg, _ = parse_args(tiny_args(cache, tmp_path / "run"))
    with pytest.raises(CheckpointError, match=message):
        Trainer(cfg, resume=str(step_dir))


def test_other_model_shape_is_rejected_before_loading(cache, reference, tmp_path):
    cfg, _ = parse_args(tiny_args(cache, tmp_path, extra=["--model.hidden_size=128"]))
    with pytest.raises(CheckpointError, match="shape"):
        Trainer(cfg, resume=str(reference / "checkpoints" / "step_0000012"))


def test_interrupted_save_leaves_previous_checkpoint_loadable(cache, reference, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    half = root / "step_0000013.tmp"  # what a save killed mid-way leaves
    half.mkdir()
    (half / "model-00000.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint("latest", root).name == "step_0000012"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(str(half), root)


def test_generate_tool_samples_from_a_run(reference):
    args = [sys.executable, "tools/generate.py", str(reference), "--prompt", "def ",
            "--max-new-tokens", "12", "--greedy"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def ") and len(first.stdout) > len("def \n")
    again = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert again.stdout == first.stdout  # greedy decoding is deterministic
    missing = subprocess.run([sys.executable, "tools/generate.py", str(reference / "nothing")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize("layout", [
    ["--parallel.dp=2", "--parallel.zero=3", "--train.precision=bf16",
     "--train.recompute=full", "--model.dropout=0"],
    ["--parallel.pp=2", "--parallel.dp=2", "--parallel.zero=2", "--train.precision=fp16",
     "--train.micro_batch_size=2", "--optim.offload=cpu"],
    ["--parallel.tp=2", "--parallel.sp=2", "--parallel.tp_sp=true", "--parallel.zero=1",
     "--train.recompute=selective", "--model.dropout=0"],
], ids=["dp2-zero3-bf16-full", "pp2-dp2-zero2-fp16-offload", "tp2-sp2-zero1-selective"])
def test_launcher_runs_layout_precision_combinations(cache, tmp_path, layout):
    out = subprocess.run(["./launch.sh", "configs/tiny.yaml", *tiny_args(cache, tmp_path, steps=3),
                          "--train.eval_every=0", *layout],
                         capture_output=True, text=True, timeout=300)
    assert_finished(out, tmp_path)
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert final[-1]["step"] == 3 and final[-1]["loss"] == final[-1]["loss"]  # finite
    assert ckpt.resolve_checkpoint("latest", tmp_path / "checkpoints").name == "step_0000003"
