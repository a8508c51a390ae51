"""Export a megalite checkpoint as a Hugging Face model directory.

    OUT/config.json            LlamaForCausalLM or GPT2LMHeadModel (hf/names.py hf_config)
    OUT/model.safetensors      the weights under HF names (hf/names.py to_hf)
    OUT/tokenizer.json         the tokenizer the checkpoint was trained with (hf_tokenizer)
    OUT/tokenizer_config.json

`transformers` loads it with `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)`; the logits and the token ids are megalite's. The
weights keep the dtype the checkpoint stored (a bf16 run exports bf16) unless a dtype is
asked for. The directory is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megalite.checkpoint import format as ckpt
from megalite.config import config_from_dict
from megalite.errors import CheckpointError
from megalite.hf.names import hf_config, hf_name_map, to_hf
from megalite.hf.tokenizer import write_hf_tokenizer
from megalite.optim.zero import DTYPES


@contextlib.contextmanager
def staged_directory(out: Path):
    """Yield a temporary sibling of `out` to fill; it becomes `out` only on success. `out`
    must not exist yet or be empty, so an export never mixes with older files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output '{out}' already exists and is not an empty directory; "
                              f"pass a new directory or remove it first.")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)


def hf_state_dict(path: Path, index: dict, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under HF names, checked against the model's name map."""
    model_cfg = config_from_dict(index["config"]).model
    tensors = ckpt.read_model_tensors(path)
    expected = set(hf_name_map(model_cfg))
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected)[:4], sorted(expected - set(tensors))[:4]
        raise CheckpointError(f"checkpoint '{path}' holds model tensors {extra} its config does "
                              f"not have, or lacks {missing}; the checkpoint is damaged or its "
                              f"index.json config is wrong.")
    state = to_hf(tensors, model_cfg)
    if dtype is not None:
        state = {name: t.to(DTYPES[dtype]) for name, t in state.items()}
    return state


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str | None = None,
              tokenizer: str | Path | None = None) -> Path:
    """Write the HF directory `out` for a checkpoint (step, checkpoints or run directory).
    `dtype`: fp32|bf16|fp16 to convert the weights; `tokenizer`: a path that replaces the
    one recorded in the checkpoint (e.g. after copying a run to another machine)."""
    path = ckpt.find_checkpoint(checkpoint)
    index = ckpt.read_index(path)  # checks every file's checksum first
    model_cfg = config_from_dict(index["config"]).model
    state = hf_state_dict(path, index, dtype)
    tokenizer = tokenizer or index.get("tokenizer")
    if not tokenizer or not Path(tokenizer).is_file():
        raise CheckpointError(f"the checkpoint's tokenizer '{tokenizer}' (recorded in "
                              f"{path / 'index.json'}) does not exist here; pass its current "
                              f"location with --tokenizer PATH.")
    out = Path(out)
    with staged_directory(out) as tmp:
        special_ids = write_hf_tokenizer(tokenizer, tmp, model_cfg.max_seq_len)
        dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
        # transformers 5 reads "dtype", 4.x "torch_dtype".
        config = {**hf_config(model_cfg), **special_ids, "dtype": dtype_name,
                  "torch_dtype": dtype_name}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out
