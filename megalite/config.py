"""Typed run configuration: YAML file + `--section.key=value` overrides + validation.

A config is a tree of dataclasses, one per section (model, parallel, train, optim,
data, checkpoint, log, run). `load_config` reads a YAML file (or the embedded
defaults) and the files it builds on (a top-level `base: other.yaml`, relative to the
file: a model's dimensions written once, layouts on top), applies command-line
overrides, converts every value to the field's type and validates the combination
(config_checks.py), so that a mistake fails before any work starts with a
`ConfigError` that names the key, the value and the fix. In two halves where the
number of ranks is not known yet (the preflight): `read_config`, then
`finish_config(cfg, world_size)`, which decides parallel.dp=auto. `resolve` fills the
values left to "auto" (sizes from the model preset and the tokenizer) so the config
written to the run directory is concrete.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megalite.config_checks import closest, validate
from megalite.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


# A boolean that may also be left "auto": true/false become bools as they are read, and
# resolve() decides "auto", so code downstream only ever sees a bool.
AutoBool = "bool | auto"
# A count that may be left "auto": parallel.dp, which the number of ranks started decides
# (finish_config); after load_config it is an int.
AutoInt = "int | auto"


@dataclass
class ModelConfig:
    preset: str = "llama"  # llama | gpt2
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads
    ffn_hidden_size: int = 0  # 0: llama 8/3*h rounded up to 64, gpt2 4*h
    vocab_size: int = 0  # 0: taken from the tokenizer
    max_seq_len: int = 0  # 0: train.seq_len (size of gpt2's learned positions)
    dropout: float = 0.0
    attention: str = "auto"  # eager | sdpa | triton | auto
    kernels: str = "auto"  # torch | triton | auto
    tie_embeddings: AutoBool = "auto"  # true | false | auto (gpt2 ties, llama does not)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: AutoInt = 1  # auto: world / (tp x pp x sp), so a run resumes on fewer ranks
    sp: int = 1
    sp_mode: str = "ring"  # ring | all_to_all
    tp_sp: bool = False
    zero: int = 0
    zero_shard: int = 0  # dp x sp ranks one ZeRO shard spans (0: all); fewer: hybrid sharding
    bucket_mb: float = 25.0  # gradient bucket size for the dp x sp reduction (MiB)
    overlap_grad_reduce: bool = True  # start each bucket's reduction while backward goes on
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved 1F1B needs > 1)
    stage_layers: str = ""  # explicit layers per virtual stage, e.g. "1,3"; "" splits evenly
    vocab_pad_multiple: int = 1  # under tp the vocabulary pads to a multiple of tp * this
    timeout_s: float = 600.0  # how long a collective waits before failing with its group's name


@dataclass
class TrainConfig:
    steps: int = 100
    seq_len: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 8
    precision: str = "fp32"  # fp32 | bf16 | fp16 | fp64 (float64 everywhere: tests, debugging)
    grad_dtype: str = "fp32"  # fp32 | bf16 | fp16; fp64 runs reduce in fp64
    loss_scale_init_pow: int = 16  # fp16: the loss scale starts at 2**this
    loss_scale_window: int = 1000  # fp16: steps without overflow before the scale doubles
    loss_scale_hysteresis: int = 2  # fp16: overflows tolerated before the scale halves
    loss_scale_min: float = 1.0  # fp16: the scale never drops below this
    recompute: str = "none"  # none | selective | full
    offload_activations: bool = False  # blocks' saved tensors in host memory until backward
    seed: int = 1234
    deterministic: bool = False
    eval_every: int = 50  # validation every N steps (and at step 0); 0 disables
    eval_batches: int = 4
    guard_spike_factor: float = 0.0  # skip a step whose loss exceeds factor * running mean; 0 off
    guard_window: int = 20  # steps in the running mean of the spike guard
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    schedule: str = "cosine"  # constant | cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    offload: str = "none"  # none | cpu


@dataclass
class DataConfig:
    # Prepared dataset prefixes, optionally weighted: ["0.7", "a/prefix", "0.3", "b/prefix"]
    # or plain prefixes. Empty: the embedded default corpus (Python's standard library).
    paths: list = field(default_factory=list)
    tokenizer: str = ""  # sentencepiece model; empty: trained on the default corpus
    vocab_size: int = 4096  # for a tokenizer trained on the default corpus
    corpus_max_mb: float = 8.0  # size cap of the default corpus
    val_fraction: float = 0.02
    cache_dir: str = "data_cache"
    workers: int = 2


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <run.dir>/checkpoints
    every: int = 0  # save every N steps (0: only at the end and on a stop signal)
    every_minutes: float = 0.0
    keep: int = 3


@dataclass
class LogConfig:
    every: int = 10
    profile_steps: list = field(default_factory=list)  # torch profiler trace of these steps
    peak_tflops: float = 0.0  # dense peak per device for MFU; 0: known GPU table, absent on CPU
    tensorboard: bool = False  # also write scalars to <run.dir>/tensorboard (pip install tensorboard)
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; wandb login or WANDB_MODE=offline)
    wandb_project: str = "megalite"  # W&B project; runs are named and grouped by run.name


@dataclass
class RunConfig:
    dir: str = ""  # empty: runs/<config name>
    name: str = ""
    # stop signals within this many seconds of the first are one request; a later one
    # kills at once (training/signals.py)
    stop_window_s: float = 10.0
    # torchrun restarts the workers after a failure this many times; a restart resumes
    # from the latest checkpoint (a user error, exit 2, never restarts)
    max_restarts: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.tp * p.pp * p.dp * p.sp

    @property
    def grad_accum_steps(self) -> int:
        t = self.train
        return t.global_batch_size // (t.micro_batch_size * self.parallel.dp)


def _sections() -> dict:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def _convert(key: str, value, typ):
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if typ in ("AutoBool", "AutoInt"):
        if isinstance(value, str) and value.lower() == "auto":
            return "auto"
        plain = "bool" if typ == "AutoBool" else "int"
        try:
            return _convert(key, value, plain)
        except ConfigError:
            words = "true, false or auto" if plain == "bool" else "a whole number or auto"
            raise ConfigError(f"config key '{key}' got {value!r}; give {words}, "
                              f"e.g. --{key}=auto.") from None
    typ = {"int": int, "float": float, "bool": bool, "str": str, "list": list}.get(typ, typ)
    bad = ConfigError(f"config key '{key}' got {value!r}, which is not a valid {typ.__name__}. "
                      f"Give a {typ.__name__} value, e.g. --{key}={_example(typ)}.")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise bad from None
    if typ is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if typ is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise bad
        return [str(v) if not isinstance(v, (int, float)) else v for v in value]
    if typ is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise bad


def _example(typ) -> str:
    return {int: "8", float: "0.001", bool: "true", str: "name", list: "[a,b]"}[typ]


def _apply(cfg: Config, key: str, value) -> None:
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}' in '{key}'.{closest(section, sections)}")
    obj = getattr(cfg, section)
    fields = {f.name: f.type for f in dataclasses.fields(obj)}
    if name not in fields:
        full = [f"{section}.{n}" for n in fields]
        raise ConfigError(f"unknown config key '{key}'.{closest(key, full)}")
    setattr(obj, name, _convert(key, value, fields[name]))


def _flatten(data: dict, source: str) -> list[tuple[str, object]]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"(model:, train:, ...), got {type(data).__name__}.")
    items = []
    for section, values in data.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, "
                              f"got {values!r}.{closest(str(section), _sections())}")
        items += [(f"{section}.{k}", v) for k, v in values.items()]
    return items


def _file_items(path: Path, including: tuple) -> list[tuple[str, object]]:
    """A YAML file's (key, value) pairs in the order they apply: those of its `base:` file
    first (a path relative to this file's folder; bases nest), then its own."""
    if not path.is_file():
        within = f" (the base of '{including[-1]}')" if including else ""
        raise ConfigError(f"config file '{path}'{within} does not exist. Pass an existing YAML "
                          f"file (see configs/) or none for the default.")
    if path.resolve() in including:
        chain = " -> ".join(str(p) for p in (*including, path.resolve()))
        raise ConfigError(f"config files include each other in a loop: {chain}; remove a "
                          f"'base:' key.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    base = data.pop("base", None) if isinstance(data, dict) else None
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base: {base!r}' must be the path of another config file "
                          f"(relative to this one), e.g. base: models/llama-3-8b.yaml.")
    inherited = _file_items(path.parent / base, (*including, path.resolve())) if base else []
    return inherited + _flatten(data, str(path))


def read_config(path: str | os.PathLike | None = None, overrides=()) -> Config:
    """YAML (default: configs/tiny.yaml; with its `base:` files) plus overrides, converted
    but not yet validated: parallel.dp may still be "auto" (finish_config decides it)."""
    path = Path(path) if path else DEFAULT_CONFIG
    cfg = Config()
    for key, value in _file_items(path, ()) + list(overrides):
        _apply(cfg, key, value)
    if not cfg.run.name:
        cfg.run.name = path.stem
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / cfg.run.name)
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = str(Path(cfg.run.dir) / "checkpoints")
    return cfg


def finish_config(cfg: Config, world_size: int | None = None) -> Config:
    """A validated copy of `cfg` with parallel.dp decided for `world_size` ranks (default:
    torchrun's WORLD_SIZE) where it is "auto"."""
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    if p.dp == "auto":
        world = world_size or int(os.environ.get("WORLD_SIZE", "0"))
        if not world:
            raise ConfigError("parallel.dp=auto takes dp from the number of ranks started, "
                              "which only a launch knows; give --parallel.dp=N here.")
        model_ranks = p.tp * p.pp * p.sp
        if world % model_ranks:
            raise ConfigError(
                f"the launch has {world} ranks, but parallel.dp=auto needs a multiple of "
                f"tp x pp x sp = {p.tp} x {p.pp} x {p.sp} = {model_ranks}; start a multiple "
                f"(NPROC_PER_NODE x NNODES) or change the layout.")
        p.dp = world // model_ranks
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides=(),
                world_size: int | None = None) -> Config:
    """Load YAML (default: configs/tiny.yaml), apply overrides, decide dp=auto, validate."""
    return finish_config(read_config(path, overrides), world_size)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (config.yaml, checkpoint index)."""
    cfg = Config()
    for key, value in _flatten(data, "config"):
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def resolve(cfg: Config, vocab_size: int, device: str) -> Config:
    """Fill the automatic values so the written config is concrete."""
    m = cfg.model
    if not m.vocab_size:
        m.vocab_size = vocab_size
    if not m.num_kv_heads:
        m.num_kv_heads = m.num_heads
    if not m.ffn_hidden_size:
        m.ffn_hidden_size = (4 * m.hidden_size if m.preset == "gpt2"
                             else 64 * -(-int(8 * m.hidden_size / 3) // 64))
    if not m.max_seq_len:
        m.max_seq_len = cfg.train.seq_len
    if m.tie_embeddings == "auto":
        m.tie_embeddings = m.preset == "gpt2"
    if m.kernels == "auto":
        m.kernels = "triton" if device == "cuda" else "torch"
    if m.attention == "auto":
        m.attention = "triton" if m.kernels == "triton" else "sdpa"
    if cfg.train.precision == "fp64":
        cfg.train.grad_dtype = "fp64"
    if cfg.train.device == "auto":
        cfg.train.device = device
    return cfg


def save_yaml(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

