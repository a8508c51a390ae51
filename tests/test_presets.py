"""The model and layout presets in configs/: `base:` composition, each layout passing
the preflight (data pointed at the embedded corpus), estimated to fit an 80 GB GPU as
its header says, a shrunken copy of each model training 2 steps on CPU ranks, and
`tools/estimate.py --plan --write` round-tripping through the preflight.
"""

import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from launching import Launch
from megalite.config import load_config, read_config
from megalite.errors import ConfigError
from megalite.planning.estimate import estimate, prepare
from megalite.planning.planner import LAYOUT_KEYS, USABLE_FRACTION, Cluster, layout_of, plan
from megalite.preflight import preflight_main

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = sorted(p.name for p in (ROOT / "configs").glob("*-*gpu.yaml"))
MODELS = sorted(p.stem for p in (ROOT / "configs" / "models").glob("*.yaml"))
# the cluster each layout was planned for, from its name: GPUs -> (gpus per node, nodes)
CLUSTERS = {"1gpu": (1, 1), "2gpu": (2, 1), "8gpu": (8, 1), "64gpu": (8, 8)}
GIB = 2 ** 30


def embedded_data(cache, run_dir):
    """The data keys that point a preset at a small embedded corpus whose validation
    split holds one sequence of 8192 tokens."""
    return ["--data.paths=[]", "--data.tokenizer=", f"--data.cache_dir={cache}",
            "--data.vocab_size=512", "--data.corpus_max_mb=1", "--data.val_fraction=0.2",
            f"--run.dir={run_dir}"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from parity import prepared_cache
    return prepared_cache(tmp_path_factory, "preset_data",
                          lambda c, r: ["configs/tiny.yaml", *embedded_data(c, r)])


def test_base_files_compose(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text("model: {hidden_size: 64, num_heads: 4}\n"
                                                "train: {steps: 5}\n")
    (tmp_path / "mid.yaml").write_text("base: models/m.yaml\ntrain: {steps: 7, seq_len: 32}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\nmodel: {num_layers: 3}\n")
    cfg = load_config(tmp_path / "top.yaml", [("train.steps", "9")])
    m, t = cfg.model, cfg.train
    assert (m.hidden_size, m.num_heads, m.num_layers, t.seq_len, t.steps) == (64, 4, 3, 32, 9)
    assert cfg.run.name == "top"  # the file given, not its base
    (tmp_path / "loop.yaml").write_text("base: top2.yaml\n")
    (tmp_path / "top2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="include each other in a loop"):
        read_config(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml' \(the base of .*lost.yaml'\) does "
                                          r"not exist"):
        read_config(tmp_path / "lost.yaml")
    (tmp_path / "bad.yaml").write_text("base: [a, b]\n")
    with pytest.raises(ConfigError, match="must be the path of another config file"):
        read_config(tmp_path / "bad.yaml")


def test_the_presets_are_the_published_models():
    def model(name):
        return load_config(ROOT / "configs" / "models" / f"{name}.yaml").model
    sizes = {name: (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads or m.num_heads,
                    m.ffn_hidden_size, m.vocab_size, m.tie_embeddings, m.rope_theta)
             for name in MODELS for m in [model(name)]}
    assert sizes == {
        "gpt2-small": (12, 768, 12, 12, 3072, 50257, True, 10000.0),
        "gpt2-medium": (24, 1024, 16, 16, 4096, 50257, True, 10000.0),
        "llama-3.2-1b": (16, 2048, 32, 8, 8192, 128256, True, 500000.0),
        "llama-3-8b": (32, 4096, 32, 8, 14336, 128256, False, 500000.0),
        "llama-3-70b": (80, 8192, 64, 8, 28672, 128256, False, 500000.0)}
    assert {path.split("-")[0] for path in LAYOUTS} == {"gpt2", "llama"}
    assert "llama-3-8b-1gpu.yaml" not in LAYOUTS and "llama-3-70b-8gpu.yaml" not in LAYOUTS


def _cluster(layout_file: str) -> Cluster:
    gpus, nodes = CLUSTERS[layout_file.rsplit("-", 1)[1][:-5]]
    return Cluster(gpus_per_node=gpus, nodes=nodes)


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_fits_80gb_as_its_header_says(name):
    cfg = load_config(ROOT / "configs" / name, [("train.device", "cuda")])
    result = estimate(prepare(cfg))
    assert result["memory_bytes"]["total"] <= 80 * GIB * USABLE_FRACTION
    # the planner, asked again for this very layout, still says what the header says
    layout = layout_of(cfg)
    chosen, = plan(prepare(cfg, check=False), _cluster(name), 1,
                   only={k: (layout[k],) for k in LAYOUT_KEYS})
    header = (ROOT / "configs" / name).read_text()
    said = re.search(r"Estimated ([\d.]+) GiB per GPU.*?and ([\d.]+) s per step",
                     " ".join(header.replace("#", " ").split()))
    assert said, header
    assert float(said[1]) == round(chosen["memory_bytes"]["total"] / GIB, 1)
    assert float(said[2]) == round(chosen["step_time"]["total"], 2)
    start = re.search(r"Start:\s*#\s*(.*)", header)[1]
    assert name in start and ("sbatch" in start) == (_cluster(name).nodes > 1)


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_passes_the_preflight(name, cache, tmp_path, monkeypatch):
    for var in ("NNODES", "NPROC_PER_NODE", "SLURM_NNODES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)
    out = io.StringIO()
    # a real corpus's validation split holds dp x micro-batch rows; this small one cannot
    no_eval = ["--train.eval_every=0"]
    with redirect_stdout(out):
        assert preflight_main([f"configs/{name}", *embedded_data(cache, tmp_path),
                               *no_eval]) == 0
    gpus, nodes = _cluster(name).gpus_per_node, _cluster(name).nodes
    assert out.getvalue().splitlines()[0] == str(gpus * nodes)


def shrunk(name: str) -> list[str]:
    """Overrides that shrink a layout preset to tiny sizes and at most 8 CPU ranks with
    the same structure: GQA ratio, tying, the parallel dimensions used (2 of each at
    most), the schedule and its virtual stages, the ZeRO stage."""
    cfg = load_config(ROOT / "configs" / name)
    m, p = cfg.model, cfg.parallel
    ratio = m.num_heads // (m.num_kv_heads or m.num_heads)
    heads = 4 * ratio if ratio > 1 else 4
    tp, pp, dp, sp = min(p.tp, 2), min(p.pp, 2), min(p.dp, 2), min(p.sp, 2)
    return [f"--model.hidden_size={8 * heads}", f"--model.num_heads={heads}",
            f"--model.num_kv_heads={heads // ratio}", "--model.ffn_hidden_size=0",
            "--model.vocab_size=0", f"--model.num_layers={2 * pp * p.virtual_stages}", "--model.max_seq_len=0",
            f"--parallel.tp={tp}", f"--parallel.pp={pp}", f"--parallel.dp={dp}",
            f"--parallel.sp={sp}",
            f"--parallel.tp_sp={str(p.tp_sp and tp > 1).lower()}", "--parallel.zero_shard=0",
            "--train.seq_len=32", "--train.micro_batch_size=1",
            f"--train.global_batch_size={dp * pp}", "--train.steps=2", "--train.eval_every=0",
            "--optim.warmup_steps=1", "--checkpoint.every=0", "--log.every=1"]


def _distinct_shrunken_models() -> list[str]:
    """One model per distinct shrunken copy (GPT-2 small and medium shrink alike)."""
    seen = {}
    for model in MODELS:
        seen.setdefault(tuple(shrunk(f"{model}-64gpu.yaml")), model)
    return sorted(seen.values())


@pytest.mark.parametrize("model", _distinct_shrunken_models())
def test_a_shrunken_copy_of_each_model_trains_on_cpu(model, cache, tmp_path):
    name = f"{model}-64gpu.yaml"  # every model has one: the most parallel layout
    run = Launch(["./launch.sh", f"configs/{name}", *embedded_data(cache, tmp_path),
                  *shrunk(name)])
    assert run.finish() == 0, run.output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    resolved = load_config(tmp_path / "config.yaml")
    preset = load_config(ROOT / "configs" / name)
    assert resolved.model.tie_embeddings == preset.model.tie_embeddings
    assert resolved.parallel.zero == preset.parallel.zero


def test_plan_write_round_trips_through_the_preflight(cache, tmp_path, monkeypatch):
    target = tmp_path / "planned.yaml"
    args = ["configs/tiny.yaml", "--model.vocab_size=512", "--train.global_batch_size=32",
            "--plan", "--gpus-per-node", "4", "--write", str(target)]
    done = subprocess.run([sys.executable, "tools/estimate.py", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    written = load_config(target)
    assert written.train.global_batch_size == 32 and written.model.vocab_size == 512
    assert written.world_size == 4
    again = subprocess.run([sys.executable, "tools/estimate.py", *args], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and "exists already" in again.stderr  # never replaced
    for var in ("NNODES", "NPROC_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    out = io.StringIO()
    with redirect_stdout(out):
        assert preflight_main([str(target), *embedded_data(cache, tmp_path / "run")]) == 0
    assert out.getvalue().splitlines()[0] == "4"
