"""Finding a checkpoint from what a user passes, and describing / verifying one.

`checkpoint.find_checkpoint` accepts a step directory, a checkpoints directory (its `latest`)
or a run directory (its checkpoints/latest), like tools/generate.py. `inspect_checkpoint`
(tools/inspect_ckpt.py) verifies every file through `checkpoint.read_index` and
describes the checkpoint: step, data position, loss, layout, model, the tensors, and
each file with its size and checksum status. A damaged checkpoint is still described
as far as its index allows, so the report shows which file is bad, and the
CheckpointError comes back with it for the CLI to print.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from megalite.checkpoint import format as ckpt
from megalite.data.tokenizer import file_sha256
from megalite.errors import CheckpointError

INDEX = "index.json"


def _file_status(path: Path, info: dict) -> str:
    """What is wrong with one file, if anything (run once the index check has failed)."""
    if not path.is_file():
        return "MISSING"
    size = path.stat().st_size
    if size != info.get("bytes"):
        return f"TRUNCATED ({size} of {info.get('bytes')} bytes)"
    return "sha256 OK" if file_sha256(path) == info.get("sha256") else "sha256 FAILED"


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _model_line(config: dict) -> str:
    m = config.get("model", {})
    kv = m.get("num_kv_heads") or m.get("num_heads")
    return (f"model: {m.get('preset')}  hidden {m.get('hidden_size')}  layers "
            f"{m.get('num_layers')}  heads {m.get('num_heads')} (kv {kv})  ffn "
            f"{m.get('ffn_hidden_size')}  vocab {m.get('vocab_size')}  max_seq_len "
            f"{m.get('max_seq_len')}  tied embeddings {m.get('tie_embeddings')}")


def describe(path: Path, index: dict, statuses: dict[str, str]) -> list[str]:
    """The report lines of checkpoint `path` with index `index`."""
    tensors = index.get("tensors", {})
    kinds = Counter(entry.get("kind", "?") for entry in tensors.values())
    params = sum(math.prod(e["shape"]) for e in tensors.values() if e.get("kind") == "model")
    loss = index.get("loss")
    config = index.get("config", {})
    train = config.get("train", {})
    layout = index.get("layout") or {}
    lines = [f"checkpoint: {path}",
             f"step: {index.get('step')}  consumed samples: {index.get('consumed_samples')}  "
             f"loss: {'-' if loss is None else f'{loss:.4f}'}",
             f"written: {index.get('timestamp', '?')} on {index.get('hostname', '?')} "
             f"({index.get('hardware', '?')}), torch {index.get('torch_version', '?')}, "
             f"format {index.get('format_version')}",
             _model_line(config) + f"  params {params:,}",
             f"train: seq_len {train.get('seq_len')}  global batch {train.get('global_batch_size')}"
             f"  precision {train.get('precision')}",
             "layout: " + ("  ".join(f"{k}={v}" for k, v in layout.items()) or "-")
             + (f"  (world {index['world_size']})" if "world_size" in index else ""),
             f"tokenizer: {index.get('tokenizer')}",
             f"tensors: {len(tensors)} (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
             + ")",
             "files:"]
    files = index.get("files", {})
    width = max((len(name) for name in files), default=0)
    for name, info in sorted(files.items()):
        lines.append(f"  {name:<{width}}  {_size(info.get('bytes', 0)):>10}  {statuses[name]}")
    return lines


def inspect_checkpoint(path: str | Path) -> tuple[list[str], CheckpointError | None]:
    """(report lines, the verification error or None) for the checkpoint at `path`."""
    step_dir = ckpt.find_checkpoint(path)
    try:
        index = ckpt.read_index(step_dir, verify=True)
    except CheckpointError as error:
        try:  # describe what the index still says, to show which file is bad
            index = json.loads((step_dir / INDEX).read_text())
            statuses = {name: _file_status(step_dir / name, info)
                        for name, info in index["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise error from None
        return describe(step_dir, index, statuses), error
    return describe(step_dir, index, dict.fromkeys(index["files"], "sha256 OK")), None
