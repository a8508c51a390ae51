"""Import a Hugging Face Llama (or GPT-2) model as a megalite checkpoint, to go on training it.

    OUT/step_0000000/          the checkpoint: weights in fp32 under megalite names, and
                               (unless weights_only) zero AdamW moments, an RNG state and
                               the trainer's state at step 0
    OUT/latest
    OUT/tokenizer/             the model's own tokenizer (tokenizer.json + its config, or
                               a sentencepiece tokenizer.model), usable by prepare_data
    OUT/config.yaml            a megalite config of this model with data.tokenizer set

Resuming from a step-0 checkpoint with zero moments and step count 0 is exactly a fresh
start from these weights (AdamW's first update sees the same state as a new optimizer),
so `./launch.sh OUT/config.yaml --data.paths=[...] --resume_from_checkpoint OUT` continues
pretraining the model in any layout (the reader reshards). Weights are read from
safetensors only: pickled pytorch_model.bin files are refused, as everywhere here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megalite.checkpoint import format as ckpt
from megalite.config import Config, ModelConfig, resolve, save_yaml
from megalite.config_checks import validate
from megalite.data.tokenizer import Tokenizer
from megalite.errors import CheckpointError, ConfigError
from megalite.training.guard import StepGuard
from megalite.hf.export import staged_directory
from megalite.hf.names import from_hf, hf_name_map, model_fields_from_hf
from megalite.hf.tokenizer import copy_tokenizer
from megalite.model.transformer import Transformer
from megalite.parallel import fused
from megalite.optim.schedule import LRSchedule

# Buffers, not parameters, that some HF checkpoints store: causal masks, rotary tables.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
OPTIM_FILE_BYTES = 1 << 30


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{hf_dir}' has no config.json: pass a Hugging Face model "
                              f"directory (from save_pretrained or a hub snapshot).") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is unreadable or not JSON ({e}).") from None


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"'{index}' is unreadable or has no weight_map ({e}).") from None
        return [hf_dir / name for name in names]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    if any(hf_dir.glob("*.bin")):
        raise CheckpointError(
            f"'{hf_dir}' holds only pickled PyTorch weights (*.bin), which megalite never "
            f"loads. Convert them once with transformers: AutoModelForCausalLM."
            f"from_pretrained(DIR).save_pretrained(NEW_DIR) writes model.safetensors.")
    raise CheckpointError(f"'{hf_dir}' has no model.safetensors or model.safetensors.index.json.")


def read_hf_weights(hf_dir: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF state dict (fp32) with the names hf/names.py expects, buffers dropped."""
    wanted = {hf for hf, _ in hf_name_map(model_cfg).values()}
    state = {}
    for file in _weight_files(hf_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    # The original GPT-2 checkpoints name the trunk without "transformer.".
                    full = name if name in wanted or model_cfg.preset != "gpt2" else \
                        f"transformer.{name}"
                    if full in wanted:
                        state[full] = f.get_tensor(name).float()
                    elif not (name.endswith(IGNORED_SUFFIXES) or name == "lm_head.weight"):
                        # lm_head.weight: a tied model's file may repeat the embedding.
                        raise CheckpointError(
                            f"'{file}' holds tensor '{name}', which megalite's "
                            f"{model_cfg.preset} model has no place for; this architecture "
                            f"variant cannot be imported.")
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"weights file '{file}' cannot be read ({e}).") from None
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"'{hf_dir}' lacks weights {missing[:4]} (of {len(missing)} "
                              f"missing); the download is incomplete or config.json does not "
                              f"describe these weights.")
    return state


def _check_shapes(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig) -> None:
    with torch.device("meta"):
        expected = fused.stored_shapes(Transformer(model_cfg).named_parameters())
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"HF weight for '{name}' has shape {list(tensors[name].shape)}, "
                                  f"config.json implies {list(shape)}; the weights do not "
                                  f"match the config.")


def _zero_moments(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Zero AdamW moments in files of about OPTIM_FILE_BYTES. Each is an expanded scalar
    until its file is written, so the import never holds more than one file of zeros."""
    files, current, size = {}, {}, 0
    for name, tensor in tensors.items():
        for key in ("exp_avg", "exp_avg_sq"):
            current[f"{name}/{key}"] = torch.zeros((), dtype=torch.float32).expand(tensor.shape)
            size += 4 * tensor.numel()
        if size >= OPTIM_FILE_BYTES:
            files[f"optim-{len(files):05d}.safetensors"], current, size = current, {}, 0
    if current:
        files[f"optim-{len(files):05d}.safetensors"] = current
    return files


def _fresh_trainer_state(cfg: Config, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(files, meta) of a trainer that has made no update yet: what `--resume_from_checkpoint`
    reads (trainer.py `load`, checkpoint/sharding.py), built from the trainer's own classes."""
    rng = {"rng/torch_cpu/0": torch.Generator().manual_seed(cfg.train.seed).get_state()}
    layout = {"tp": 1, "pp": 1, "dp": 1, "sp": 1, "zero": 0, "virtual_stages": 1,
              "stage_layers": "", "vocab_pad_multiple": 1}
    meta = {"sampler": {"consumed_samples": 0},
            "schedule": LRSchedule.from_config(cfg).state_dict(),
            "guard": StepGuard.from_config(cfg).state_dict(), "scaler": None,
            "layout": layout, "world_size": 1, "optimizer_step": 0}
    return {**_zero_moments(tensors), "rng.safetensors": rng}, meta


def import_hf(hf_dir: str | Path, out: str | Path, tokenizer: str | Path | None = None,
              weights_only: bool = False) -> Path:
    """Write the megalite checkpoint directory `out` for HF model directory `hf_dir`;
    returns the step directory. `tokenizer` replaces the model directory's own."""
    hf_dir, out = Path(hf_dir), Path(out).resolve()
    fields = model_fields_from_hf(read_hf_config(hf_dir))
    cfg = Config(model=ModelConfig(**fields))
    cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
    cfg.run.name = out.name
    with staged_directory(out) as tmp:
        tokenizer_file = copy_tokenizer(Path(tokenizer) if tokenizer else hf_dir,
                                        tmp / "tokenizer")
        vocab = Tokenizer(tokenizer_file).vocab_size
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but the model's vocab_size is "
                              f"{cfg.model.vocab_size}; import with the model's own tokenizer.")
        # Recorded where it will be after the rename, so index.json points at a real file.
        cfg.data.tokenizer = str(out / "tokenizer" / tokenizer_file.name)
        validate(cfg)
        save_yaml(cfg, tmp / "config.yaml")  # kernels / attention stay "auto" for the trainer
        resolved = resolve(copy.deepcopy(cfg), vocab, "cpu")  # concrete, as trainers save it
        tensors = from_hf(read_hf_weights(hf_dir, resolved.model), resolved.model)
        _check_shapes(tensors, resolved.model)
        files, meta = {"model.safetensors": tensors}, {}
        if not weights_only:
            state_files, meta = _fresh_trainer_state(resolved, tensors)
            files.update(state_files)
        meta.update(config=resolved.to_dict(), tokenizer=cfg.data.tokenizer, consumed_samples=0,
                    loss=None, source={"hf_dir": str(hf_dir.resolve()),
                                       "model_type": fields["preset"]})
        ckpt.save_checkpoint(tmp, 0, files, meta, keep=1)
    return ckpt.resolve_checkpoint("latest", out)
