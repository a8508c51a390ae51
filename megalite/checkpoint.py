"""Checkpoints: a directory of safetensors files plus `index.json`, written atomically.

Layout of `<checkpoint.dir>/step_NNNNNNN/` (the state after NNNNNNN optimizer updates):

    index.json          step, data position, schedule/guard state, config, provenance,
                        and for every file its sha256 and size, for every tensor its
                        file, dtype and shape
    model.safetensors   parameters by global name (embedding and head unpadded)
    optim.safetensors   optimizer state by "<param name>/<state key>"
    rng.safetensors     RNG states as uint8 tensors (no pickle anywhere)

A save goes to `step_NNNNNNN.tmp-<pid>/`, every file is fsynced, the directory is
renamed into place and only then is `latest` (a one-line text file naming the step
directory) replaced through a rename. A crash at any moment leaves the previous
checkpoint loadable and never a directory that looks complete but is not. Loading
checks every file's presence, size and checksum and every tensor's shape before any
state is touched, and raises CheckpointError naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megalite.errors import CheckpointError

FORMAT_VERSION = 1
INDEX = "index.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def provenance() -> dict:
    """Where and with what a checkpoint was written (for people, not for loading)."""
    hardware = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        hardware = torch.cuda.get_device_name()
    return {"hostname": socket.gethostname(), "hardware": hardware,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_checkpoint(root: str | os.PathLike, step: int, files: dict[str, dict[str, torch.Tensor]],
                    meta: dict, keep: int) -> Path:
    """Write `files` ({file name: {tensor name: tensor}}) and `meta` as step `step`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = {"format_version": FORMAT_VERSION, "step": step, **meta, **provenance(),
             "files": {}, "tensors": {}}
    for fname, tensors in files.items():
        path = tmp / fname
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        _fsync(path)
        index["files"][fname] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for name, t in tensors.items():
            index["tensors"][f"{fname}:{name}"] = {"dtype": str(t.dtype).removeprefix("torch."),
                                                   "shape": list(t.shape)}
    _write_text_atomic(tmp / INDEX, json.dumps(index, indent=1))
    _fsync(tmp)
    if final.exists():  # a re-save of the same step (resume, then stop at once) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop stale temporary directories."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(spec: str, root: str | os.PathLike) -> Path:
    """`latest` -> the step directory `root/latest` names; otherwise a path to a step dir."""
    root = Path(root)
    if spec == "latest":
        pointer = root / LATEST
        if not pointer.is_file():
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint in '{root}' (no '{LATEST}' file). "
                f"Train first, or pass the path of a step_NNNNNNN directory.")
        path = root / pointer.read_text().strip()
    else:
        path = Path(spec)
        if (path / LATEST).is_file() and not (path / INDEX).exists():
            path = path / (path / LATEST).read_text().strip()
    if not (path / INDEX).is_file():
        raise CheckpointError(
            f"'{path}' is not a complete checkpoint: '{INDEX}' is missing (an interrupted save "
            f"leaves only a .tmp directory). Pass a step_NNNNNNN directory that has {INDEX}, "
            f"or 'latest'.")
    return path


def read_index(path: str | os.PathLike, verify: bool = True) -> dict:
    """Read and check a checkpoint's index; with `verify`, also sizes and sha256 of every file."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path / INDEX}' is unreadable or not JSON ({e}); the checkpoint "
                              f"is damaged: resume from an earlier one.") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has format version {index.get('format_version')}, "
                              f"this megalite reads {FORMAT_VERSION}.")
    for fname, info in index["files"].items():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"checkpoint file '{file}' is missing; the checkpoint is "
                                  f"incomplete: resume from an earlier one.")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file '{file}' has {size} bytes, the index says "
                                  f"{info['bytes']}: it is truncated or damaged.")
        if verify and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file '{file}' fails its sha256 check: it is "
                                  f"corrupted. Resume from an earlier checkpoint.")
    return index


def load_tensors(path: str | os.PathLike, fname: str) -> dict[str, torch.Tensor]:
    file = Path(path) / fname
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint file '{file}' cannot be read ({e}).") from None


def check_shapes(index: dict, fname: str, expected: dict[str, torch.Size], what: str) -> None:
    """Fail before loading when the checkpoint holds another model shape."""
    stored = {k.split(":", 1)[1]: tuple(v["shape"]) for k, v in index["tensors"].items()
              if k.startswith(fname + ":")}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(f"the checkpoint's {what} does not match this model: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}. Resume with the config "
                              f"the checkpoint was saved with (its index.json holds it).")
    for name, shape in expected.items():
        if stored[name] != tuple(shape):
            raise CheckpointError(f"the checkpoint's {what} tensor '{name}' has shape "
                                  f"{list(stored[name])}, this model expects {list(shape)}. "
                                  f"Resume with the config the checkpoint was saved with.")


def read_model_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model parameter of a checkpoint as its unpadded global tensor, by global name,
    whatever layout wrote it (the reader for tools: export, generate, inspect)."""
    return load_tensors(path, "model.safetensors")


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, index: dict) -> None:
    """Copy the checkpoint's model tensors into a single-device model after checking shapes."""
    params = dict(model.named_parameters())  # tied weights appear once
    check_shapes(index, "model.safetensors", {n: p.shape for n, p in params.items()}, "model")
    state = read_model_tensors(path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
