"""The preflight runs every worker's start-up check of a config against its layout, its
model and its data (megalite/layout_checks.py), for all ranks, before torchrun starts.

Each mistake a worker would find (heads, kv heads or the MLP not divisible by tp, the
sequence split of tp_sp, ring and all-to-all attention, the pipeline's layer split, ZeRO
sharding, batch sizes against dp and the pipeline, the vocabulary, the validation split,
the profiler steps, a missing metrics sink, a missing GPU) exits 2 from
`python -m megalite.preflight` with the check's own one-paragraph message and no
traceback; a valid layout prints its world size. The last tests show the workers raise
the very same messages: the preflight calls their functions, not copies.
"""

import subprocess
import sys

import pytest
import torch

from megalite import layout_checks
from megalite.cli import parse_args, run_main
from megalite.data.build import build_data
from megalite.errors import ConfigError
from megalite.model.build import build_meta_model
from megalite.parallel.comm import Group
from megalite.parallel.topology import Topology
from megalite.preflight import preflight_main
from megalite.training.trainer import Trainer


def tiny_args(cache, run_dir, *layout):
    """configs/tiny.yaml on the session's prepared corpus (conftest `cache`: same data keys)."""
    return ["configs/tiny.yaml", "--data.corpus_max_mb=0.3", "--data.vocab_size=509",
            f"--data.cache_dir={cache}", f"--run.dir={run_dir}", *layout]


def preflight(capsys, cache, tmp_path, *layout) -> tuple[int, str, str]:
    code = run_main(preflight_main, tiny_args(cache, tmp_path, *layout))
    out, err = capsys.readouterr()
    return code, out, err


# (layout overrides, the key phrase of the message that stops it); tiny.yaml: 6 heads,
# 2 kv heads, ffn 512, 4 layers, seq_len 128, micro-batch 16 = global batch.
MISTAKES = {
    "heads_tp": (["--parallel.tp=4"], "model.num_heads=6 is not divisible by parallel.tp=4"),
    "kv_heads_tp": (["--parallel.tp=3"], "model.num_kv_heads=2 is not divisible by parallel.tp=3"),
    "ffn_tp": (["--parallel.tp=2", "--model.ffn_hidden_size=511"],
               "model.ffn_hidden_size=511 is not divisible by parallel.tp=2"),
    "tp_sp_seq": (["--parallel.tp=2", "--parallel.tp_sp=true", "--train.seq_len=127"],
                  "parallel.tp_sp shards the sequence over tp=2 ranks"),
    "ring_seq": (["--parallel.sp=4", "--train.seq_len=100"],
                 "train.seq_len=100 is not divisible by 2*parallel.sp=8"),
    "all_to_all_seq": (["--parallel.sp=4", "--parallel.sp_mode=all_to_all", "--train.seq_len=126"],
                       "train.seq_len=126 is not divisible by parallel.sp=4"),
    "all_to_all_heads": (["--parallel.sp=4", "--parallel.sp_mode=all_to_all"],
                         "model.num_heads/tp = 6/1 is not divisible by parallel.sp=4"),
    "all_to_all_kv": (["--parallel.sp=3", "--parallel.sp_mode=all_to_all", "--train.seq_len=126"],
                      "model.num_kv_heads/tp = 2/1 is not divisible by parallel.sp=3"),
    "sp_dropout": (["--parallel.sp=2", "--model.dropout=0.1"],
                   "attention dropout across a split sequence is not supported"),
    "pp_layers": (["--parallel.pp=3", "--train.global_batch_size=48"],
                  "model.num_layers=4 is not divisible by pp * virtual_stages = 3 * 1"),
    "virtual_layers": (["--parallel.pp=2", "--parallel.virtual_stages=4",
                        "--parallel.schedule=interleaved", "--train.global_batch_size=32"],
                       "is not divisible by pp * virtual_stages = 2 * 4"),
    "stage_layers": (["--parallel.pp=2", "--parallel.stage_layers=1,2",
                      "--train.global_batch_size=32"], "needs 2 non-negative counts"),
    "stage_layers_format": (["--parallel.pp=2", "--parallel.stage_layers=a,b",
                             "--train.global_batch_size=32"], "must be comma-separated integers"),
    "pp_micro_batches": (["--parallel.pp=2"], "a pipeline needs at least pp"),
    "interleaved_micro_batches": (["--parallel.pp=2", "--parallel.virtual_stages=2",
                                   "--parallel.schedule=interleaved",
                                   "--train.global_batch_size=48"], "in groups of pp"),
    "zero3_pp": (["--parallel.pp=2", "--parallel.zero=3", "--train.global_batch_size=32"],
                 "zero 3 with pp > 1 is not supported"),
    "zero_shard": (["--parallel.dp=2", "--parallel.zero=1", "--parallel.zero_shard=3",
                    "--train.micro_batch_size=8"], "parallel.zero_shard=3 must divide dp x sp = 2"),
    "zero_shard_zero0": (["--parallel.dp=2", "--parallel.zero_shard=1",
                          "--train.micro_batch_size=8"], "ZeRO 0 shards nothing"),
    "batch_dp": (["--parallel.dp=3"], "is not a multiple of micro_batch_size * dp = 16 * 3"),
    "vocab": (["--model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer's 509"),
    "validation_dp": (["--parallel.dp=32", "--train.micro_batch_size=1",
                       "--train.global_batch_size=32"], "samples, fewer than dp=32"),
    "profile_steps": (["--log.profile_steps=[0]"], "log.profile_steps holds 0"),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_each_layout_mistake_exits_2_with_its_paragraph(capsys, cache, tmp_path, name):
    layout, phrase = MISTAKES[name]
    code, out, err = preflight(capsys, cache, tmp_path, *layout)
    assert code == 2, (out, err)
    assert phrase in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert out == "" and "Traceback" not in err


def test_a_missing_metrics_sink_stops_the_preflight(capsys, cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    code, _, err = preflight(capsys, cache, tmp_path, "--log.wandb=true")
    assert code == 2 and "the 'wandb' package is not installed" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_stops_the_preflight(capsys, cache, tmp_path):
    code, _, err = preflight(capsys, cache, tmp_path, "--train.device=cuda")
    assert code == 2 and "no CUDA device is visible" in err


@pytest.mark.parametrize("layout, world", [
    ([], 1),
    (["--parallel.tp=2", "--parallel.tp_sp=true", "--parallel.sp=2", "--parallel.pp=2",
      "--train.micro_batch_size=4", "--train.global_batch_size=32", "--parallel.dp=2",
      "--parallel.zero=1"], 16),
    (["--parallel.pp=2", "--parallel.stage_layers=0,4", "--parallel.sp=3",
      "--parallel.sp_mode=all_to_all", "--model.num_heads=6", "--model.num_kv_heads=3",
      "--train.seq_len=126", "--train.global_batch_size=32"], 6),
])
def test_valid_layouts_pass_and_print_the_world_size(capsys, cache, tmp_path, layout, world):
    code, out, err = preflight(capsys, cache, tmp_path, *layout)
    assert code == 0, err
    lines = out.splitlines()  # for launch.sh: ranks, stop window, run directory, torchrun's
    assert lines == [str(world), "10", str(tmp_path),
                     f"--standalone --nproc_per_node={world} --max_restarts=0"], out


def test_every_pipeline_rank_and_dp_rank_is_checked(cache, tmp_path, monkeypatch):
    seen = {"stage": [], "sampler": []}
    stage, sampler = layout_checks.pipeline_stage, layout_checks.BatchSampler
    monkeypatch.setattr(layout_checks, "pipeline_stage",
                        lambda cfg, pp, r: seen["stage"].append(r) or stage(cfg, pp, r))
    monkeypatch.setattr(layout_checks, "BatchSampler",
                        lambda *a: seen["sampler"].append(a[3]) or sampler(*a))
    cfg, _ = parse_args(tiny_args(cache, tmp_path, "--parallel.pp=4", "--parallel.dp=2",
                                  "--parallel.stage_layers=1,1,0,2", "--train.micro_batch_size=2",
                                  "--train.global_batch_size=16"))
    layout_checks.check_layout(cfg, build_data(cfg))
    assert seen == {"stage": [0, 1, 2, 3], "sampler": [0, 1]}


def test_the_launch_preflight_prints_no_traceback(cache, tmp_path):
    """The issue's case, through the real entry point launch.sh runs."""
    def run(*layout):
        return subprocess.run([sys.executable, "-m", "megalite.preflight",
                               *tiny_args(cache, tmp_path, *layout)],
                              capture_output=True, text=True, timeout=120)
    bad = run("--parallel.tp=4")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "model.num_heads=6 is not divisible by parallel.tp=4" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = run("--parallel.tp=2", "--parallel.dp=2", "--train.micro_batch_size=8")
    assert good.returncode == 0 and good.stdout.splitlines()[0] == "4", good.stderr


# ---- the workers raise the same messages: the preflight calls their check functions
def rank_view(tp: int, sp: int, dp: int, pp: int, rank: int) -> Topology:
    """Rank `rank` of a grid as build_meta_model sees it, with no process group (the
    model's layers only read their groups' sizes and this rank's place)."""
    coords = {"tp": rank % tp, "sp": rank // tp % sp, "dp": rank // (tp * sp) % dp,
              "pp": rank // (tp * sp * dp)}
    sizes = {"tp": tp, "sp": sp, "dp": dp, "pp": pp}

    def group(name, *dims):
        size, index = 1, 0
        for d in dims:
            size, index = size * sizes[d], index * sizes[d] + coords[d]
        return Group(name, tuple(range(size)), index)

    return Topology(tp, sp, dp, pp, rank, group("tp", "tp"), group("sp", "sp"),
                    group("dp", "dp"), group("pp", "pp"), group("dp_sp", "dp", "sp"),
                    group("model_parallel", "pp", "tp"), group("embedding"))


def preflight_message(cache, tmp_path, *layout):
    """(the config, resolved as a worker resolves it, and the preflight's message)."""
    cfg, _ = parse_args(tiny_args(cache, tmp_path, *layout))
    with pytest.raises(ConfigError) as caught:
        layout_checks.check_layout(cfg, build_data(cfg))
    return cfg, str(caught.value)


@pytest.mark.parametrize("layout, grid", [
    (["--parallel.tp=4"], (4, 1, 1, 1)),
    (["--parallel.sp=2", "--model.dropout=0.1"], (1, 2, 1, 1)),
    (["--parallel.tp=2", "--parallel.tp_sp=true", "--train.seq_len=127"], (2, 1, 1, 1)),
])
def test_the_workers_model_build_raises_the_same_message(cache, tmp_path, layout, grid):
    cfg, message = preflight_message(cache, tmp_path, *layout)
    for rank in range(cfg.world_size):
        with pytest.raises(ConfigError) as worker:
            build_meta_model(cfg, rank_view(*grid, rank))
        assert str(worker.value) == message


def test_the_trainer_raises_the_same_vocabulary_message(cache, tmp_path):
    _, message = preflight_message(cache, tmp_path, "--model.vocab_size=100")
    cfg, _ = parse_args(tiny_args(cache, tmp_path, "--model.vocab_size=100"))
    with pytest.raises(ConfigError) as worker:
        Trainer(cfg)
    assert str(worker.value) == message


def test_validation_that_reads_nothing_is_a_config_error(capsys, cache, tmp_path):
    """eval_batches=0 with validation on: caught with the config, before any rank starts
    (it used to surface as "fewer than dp=1" from the workers' validation)."""
    args = ("--train.eval_batches=0", "--train.eval_every=10")
    with pytest.raises(ConfigError) as worker:  # a worker parses the same config
        parse_args(tiny_args(cache, tmp_path, *args))
    assert "train.eval_batches=0 reads nothing" in str(worker.value)
    code, out, err = preflight(capsys, cache, tmp_path, *args)
    assert code == 2 and out == "" and str(worker.value) in err and "Traceback" not in err
