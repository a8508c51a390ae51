"""tools/gpu_check.sh and tools/bench_gpu_train.py, on a machine without a GPU.

- Without CUDA the check says it needs a CUDA GPU, exits 0 and writes nothing.
- Its stage plumbing (background tests, budgets, one output folder of at most 8 files,
  the repo's BENCHMARKS.md left as it was, exit 1 when a stage fails while the later
  ones still run) is run in a copy of the script whose `python3` is a fake that answers
  each stage's command the way the real one does on a GPU.
- bench_gpu_train's plain PyTorch model is what megalite's Trainer is measured against,
  so it must be the same model: the same parameter names and shapes as megalite's
  Transformer for the benchmarked 1.1B config (both built on the meta device), and with
  megalite's weights loaded, the same loss and gradients on CPU.
"""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite.config import ModelConfig
from megalite.model.init import init_parameters
from megalite.model.transformer import Transformer
from megalite.parallel import fused

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
OUTPUTS = {"summary.txt", "tests.log", "train_resume.log", "train_metrics.jsonl",
           "bench_gpu_train.log", "bench_kernels.log", "BENCHMARKS.md"}

# Stands in for python3 on a GPU machine: each stage's command gets the output the real
# one gives (tables, metrics rows, appended sections); FAKE_FAIL names a stage to fail.
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$*" in
  "-c import torch; print(torch.cuda.is_available())") echo True ;;
  "-") cat >/dev/null; echo "python 3 (fake), torch (fake), using FakeGPU" ;;
  "- "*) exec "$REAL_PYTHON" "$@" ;;
  *"-m pytest"*) echo "3 passed in 0.10s"; [ "${FAKE_FAIL:-}" != tests ] ;;
  *"-m megalite.preflight"*) echo 1 ;;
  *"-m megalite.train"*)
    run=$(printf '%s\n' "$@" | sed -n 's/^--run.dir=//p')
    mkdir -p "$run"
    if [[ "$*" == *resume_from_checkpoint* ]]; then
      echo "[megalite] resumed from $run/checkpoints/step_0000010 at step 10"; steps="15 20"
    else
      steps="5 10"
    fi
    for s in $steps; do
      printf '{"step": %s, "loss": 7.5, "device": "FakeGPU", "tokens_per_s": 1e5, "mfu": 0.01}\n' \
        "$s" >>"$run/metrics.jsonl"
    done ;;
  *bench_gpu_train.py*)
    [ "${FAKE_FAIL:-}" != bench_train ] || { echo "Traceback: fake failure"; exit 1; }
    table="| implementation | params |
|---|---|
| megalite | 1.100B |"
    echo "$table"; echo "## Training throughput, GPU: FakeGPU" >>"${3}"; echo "$table" >>"${3}" ;;
  *bench_kernels.py*)
    echo "| kernel | shape | triton ms | eager ms |"
    echo "| rms_norm | [8192, 4096] | 0.100 | 0.200 |"
    echo "## Kernels: FakeGPU" >>BENCHMARKS.md ;;
  *) echo "fake python: unexpected $*" >&2; exit 3 ;;
esac
"""


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_train",
                                                  ROOT / "tools" / "bench_gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the real check")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "from_env")}
    proc = subprocess.run(["bash", str(SCRIPT), "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def fake_check(tmp_path, fail=""):
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    (repo / "tools" / "gpu_check.sh").write_text(SCRIPT.read_text())
    (repo / "BENCHMARKS.md").write_text("# Benchmarks\n")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "FAKE_FAIL": fail,
           "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(repo / "tools" / "gpu_check.sh"), str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return proc, repo, tmp_path / "out"


def test_gpu_check_stages_write_one_folder_and_leave_the_repo_alone(tmp_path):
    proc, repo, out = fake_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    summary = (out / "summary.txt").read_text()
    for stage in ("tests", "train", "bench_train", "bench_kernels"):
        assert any(line.startswith(stage + " ") and " PASS " in line
                   for line in summary.splitlines()), summary
    assert "resumed at step 10" in summary and "overall: PASS" in summary
    assert "| megalite | 1.100B |" in summary  # the training table, in the summary too
    rows = (out / "BENCHMARKS.md").read_text()
    assert "## Training throughput, GPU: FakeGPU" in rows and "## Kernels: FakeGPU" in rows
    assert (repo / "BENCHMARKS.md").read_text() == "# Benchmarks\n"
    log = (out / "tests.log").read_text()
    assert log.count("3 passed") == 4  # four pytest processes, each logged
    assert "pytest (attention_bf16: tests/test_kernels.py -k attention and dtype2): ok" in log
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("gpu_check.")] == []


def test_gpu_check_failed_stage_exits_1_and_later_stages_still_run(tmp_path):
    proc, repo, out = fake_check(tmp_path, fail="bench_train")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()
              if line.split() and line.split()[0] in ("tests", "train", "bench_train",
                                                      "bench_kernels")}
    assert status == {"tests": "PASS", "train": "PASS", "bench_train": "FAIL",
                      "bench_kernels": "PASS"}
    assert "overall: FAIL" in summary
    assert "## Kernels: FakeGPU" in (out / "BENCHMARKS.md").read_text()


def test_plain_model_has_megalite_parameters_at_the_benchmarked_size():
    bench = load_bench()
    m = bench.model_config(2048)
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.ffn_hidden_size,
            m.vocab_size, m.tie_embeddings) == (2048, 22, 32, 4, 5632, 32000, False)
    with torch.device("meta"):  # shapes only, no memory
        plain = bench.PlainLlama(m)
        ours = Transformer(dataclasses.replace(m, kernels="torch", attention="sdpa"))
    assert shapes(plain) == fused.stored_shapes(ours.named_parameters())  # q, k, v apart
    assert 1.0e9 < sum(p.numel() for p in plain.parameters()) < 1.2e9


def test_plain_model_computes_megalites_loss_and_gradients_on_cpu():
    bench = load_bench()
    m = ModelConfig(preset="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=96, vocab_size=61, max_seq_len=24, tie_embeddings=False,
                    kernels="torch", attention="sdpa")
    ours = Transformer(m)
    init_parameters(ours, seed=3, std=0.02)
    plain = bench.PlainLlama(m)
    # strict: the same names and shapes as megalite stores (its q/k/v, gate/up fused)
    plain.load_state_dict(fused.stored_tensors(ours.named_parameters()))
    tokens = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(0))
    losses = [model(tokens[:, :-1], tokens[:, 1:]) for model in (plain, ours)]
    assert math.isfinite(losses[0].item()) and abs(losses[0].item() - math.log(61)) < 0.5
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for loss in losses:
        loss.backward()
    ours_grads = {}
    for name, p in ours.named_parameters():
        grads = fused.split_global(p, p.grad) if fused.is_fused(p) else [p.grad]
        ours_grads.update(zip([stored for stored, _, _ in fused.parts(name, p)], grads))
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, ours_grads[name], rtol=1e-4, atol=1e-6, msg=name)
