"""Config loading, overrides, validation messages and resolution."""

import subprocess
import sys

import pytest
import yaml

from megalite.cli import parse_args
from megalite.cli import parse_overrides
from megalite.config import config_from_dict, load_config, resolve, save_yaml
from megalite.errors import ConfigError


def test_default_config_loads_with_names_and_dirs():
    cfg = load_config()
    assert cfg.model.preset == "llama"
    assert cfg.run.name == "tiny" and cfg.run.dir == "runs/tiny"
    assert cfg.checkpoint.dir == "runs/tiny/checkpoints"


def test_overrides_convert_types_and_last_wins():
    cfg, flags = parse_args(["--train.steps=7", "--optim.lr", "1e-3", "--train.deterministic=TRUE",
                             "--train.steps=9", "--resume_from_checkpoint", "latest"],
                            known_flags=("resume_from_checkpoint",))
    assert cfg.train.steps == 9 and cfg.optim.lr == 1e-3 and cfg.train.deterministic is True
    assert flags == {"resume_from_checkpoint": "latest"}


def test_list_override():
    cfg = load_config(overrides=[("data.paths", "[0.5,a,0.5,b]")])
    assert cfg.data.paths == [0.5, "a", 0.5, "b"]


@pytest.mark.parametrize("override, words", [
    (("train.stesp", "3"), ["train.stesp", "train.steps"]),
    (("trian.steps", "3"), ["trian", "train"]),
    (("train.steps", "many"), ["train.steps", "many", "int"]),
    (("train.deterministic", "yes"), ["train.deterministic", "bool"]),
    (("model.preset", "lama"), ["model.preset", "lama", "llama"]),
    (("train.global_batch_size", "12"), ["global_batch_size", "12", "multiple"]),
    (("model.num_heads", "5"), ["hidden_size", "num_heads"]),
    (("optim.min_lr", "1.0"), ["min_lr"]),
])
def test_bad_values_name_key_value_and_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for w in words:
        assert w in str(err.value)


def test_gqa_must_divide_heads():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config(overrides=[("model.num_kv_heads", "4")])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="section 'model'"):
        load_config(bad)


def test_cli_rejects_unknown_flags_and_dangling_values():
    with pytest.raises(ConfigError, match="unknown flag"):
        parse_args(["--steps=3"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.steps"])


def test_resolved_config_is_concrete_and_round_trips(tmp_path):
    cfg = resolve(load_config(), vocab_size=1000, device="cpu")
    m = cfg.model
    assert m.vocab_size == 1000 and m.num_kv_heads == 2 and m.ffn_hidden_size % 64 == 0
    assert m.kernels == "torch" and m.attention == "sdpa" and m.tie_embeddings is False
    save_yaml(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_train_entry_prints_message_without_traceback():
    out = subprocess.run([sys.executable, "-m", "megalite.train", "--train.stesp=3"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Did you mean 'train.steps'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides, words", [
    ([("parallel.pp", "3")], ["num_layers=4", "pp * virtual_stages", "stage_layers"]),
    ([("parallel.pp", "2"), ("parallel.stage_layers", "1,2")], ["stage_layers", "summing to"]),
    ([("parallel.pp", "2"), ("parallel.stage_layers", "a,b")], ["comma-separated"]),
    ([("parallel.pp", "2"), ("train.micro_batch_size", "16")], ["fewer than parallel.pp"]),
    ([("parallel.pp", "2"), ("parallel.virtual_stages", "2")], ["schedule=interleaved"]),
    ([("parallel.pp", "2"), ("parallel.schedule", "interleaved")], ["virtual_stages > 1"]),
    ([("parallel.pp", "2"), ("parallel.schedule", "interleaved"), ("parallel.virtual_stages", "2"),
      ("train.micro_batch_size", "2"), ("train.global_batch_size", "6"),
      ("model.num_layers", "8")], ["not a multiple of parallel.pp"]),
])
def test_bad_pipeline_layouts_are_rejected(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    for w in words:
        assert w in str(err.value)


def test_explicit_stage_layers_are_accepted():
    cfg = load_config(overrides=[("parallel.pp", "2"), ("parallel.stage_layers", "1,3"),
                                 ("train.micro_batch_size", "8")])
    assert cfg.parallel.stage_layers == "1,3"


def test_default_launch_config_is_3d_parallel():
    """./launch.sh with no config trains configs/default.yaml: pp x tp x dp on 8 ranks."""
    cfg = load_config("configs/default.yaml")
    p = cfg.parallel
    assert (p.pp, p.tp, p.dp) == (2, 2, 2)
    assert cfg.train.global_batch_size // (p.dp * cfg.train.micro_batch_size) >= p.pp
