"""Finding a checkpoint from what a user passes, and describing / verifying one.

`checkpoint.find_checkpoint` accepts a step directory, a checkpoints directory (its `latest`)
or a run directory (its checkpoints/latest), like tools/generate.py. `inspect_checkpoint`
(tools/inspect_ckpt.py) verifies every file through `checkpoint.read_index` and, in
format 3, every flat piece (optimizer-state range) against its own sha256, and
describes the checkpoint: step, data position, loss, layout, model, the tensors, each
file with its size and checksum status, and each damaged piece by tensor, flat offset,
length and file. A damaged checkpoint is still described as far as its index allows,
so the report shows which file and which pieces are bad, and the CheckpointError comes
back with it for the CLI to print (a damaged piece's, which says more than its file's).
Format 2 checkpoints have no flat pieces and get the file checks only.
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


class PieceCheck:
    """The outcome of checking every flat piece: how many were checked, how many sit in
    missing or truncated files (not checked: their file's status says why), and the
    damaged ones as (tensor name, index entry, error)."""

    def __init__(self):
        self.checked, self.skipped, self.damaged = 0, 0, []


def check_pieces(step_dir: Path, index: dict, statuses: dict[str, str]) -> PieceCheck:
    """Every flat piece of the index read and checked against its own sha256."""
    result = PieceCheck()
    pieces = sorted(((p["file"], p["offset"], name, p)
                     for name, entry in index.get("tensors", {}).items()
                     for p in entry.get("pieces", []) if "offset" in p),
                    key=lambda x: x[:3])  # file by file: the reader keeps one file open
    reader = ckpt.CheckpointReader(step_dir, index)
    for fname, _, name, piece in pieces:
        if not statuses.get(fname, "").startswith("sha256"):
            result.skipped += 1
            continue
        result.checked += 1
        try:  # the reader's own check, so this reports exactly what a load would raise
            reader.flat_piece(piece, name)
        except CheckpointError as error:
            result.damaged.append((name, piece, error))
    return result


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


def _piece_lines(pieces: PieceCheck) -> list[str]:
    if not (pieces.checked or pieces.skipped):
        return ["flat pieces: none (every tensor is stored as boxes)"]
    line = f"flat pieces: {pieces.checked} checked against their own sha256, "
    line += f"{len(pieces.damaged)} DAMAGED" if pieces.damaged else "all OK"
    if pieces.skipped:
        line += f", {pieces.skipped} not checked (in missing or truncated files)"
    lines = [line + (":" if pieces.damaged else "")]
    for name, piece, _ in pieces.damaged:
        lines.append(f"  '{name}' at flat offset {piece['offset']}, {piece['length']} "
                     f"elements, in {piece['file']}: DAMAGED")
    return lines


def describe(path: Path, index: dict, statuses: dict[str, str],
             pieces: PieceCheck | None = None) -> list[str]:
    """The report lines of checkpoint `path` with index `index`."""
    pieces = pieces or PieceCheck()
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
    damaged = Counter(piece["file"] for _, piece, _ in pieces.damaged)
    width = max((len(name) for name in files), default=0)
    for name, info in sorted(files.items()):
        n = damaged[name]
        note = f" ({n} damaged flat piece{'s' * (n > 1)})" if n else ""
        lines.append(f"  {name:<{width}}  {_size(info.get('bytes', 0)):>10}  "
                     f"{statuses[name]}{note}")
    return lines + _piece_lines(pieces)


def inspect_checkpoint(path: str | Path) -> tuple[list[str], CheckpointError | None]:
    """(report lines, the verification error or None) for the checkpoint at `path`."""
    step_dir = ckpt.find_checkpoint(path)
    try:
        index = ckpt.read_index(step_dir, verify=True)
        statuses, error = dict.fromkeys(index["files"], "sha256 OK"), None
    except CheckpointError as file_error:
        try:  # describe what the index still says, to show which file is bad
            index = json.loads((step_dir / INDEX).read_text())
            statuses = {name: _file_status(step_dir / name, info)
                        for name, info in index["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise file_error from None
        error = file_error
    try:
        pieces = check_pieces(step_dir, index, statuses)
    except (KeyError, TypeError) as e:  # an index too damaged to name its pieces
        raise error or CheckpointError(f"'{step_dir / INDEX}' lists flat pieces it cannot "
                                       f"describe ({e!r}): the index is damaged. Resume "
                                       f"from an earlier checkpoint.") from None
    if pieces.damaged:
        error = pieces.damaged[0][2]
    return describe(step_dir, index, statuses, pieces), error
