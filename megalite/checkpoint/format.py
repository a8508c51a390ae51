"""Checkpoint format: sharded safetensors files plus `index.json`, committed atomically.

Layout of `<checkpoint.dir>/step_NNNNNNN/` (the state after NNNNNNN optimizer updates;
docs/checkpoint-format.md has the full description):

    index.json              step, data position, schedule / guard / loss-scaler state,
                            layout, config, provenance; every file's sha256 and size;
                            every tensor's kind, dtype, global shape, split dimension and
                            the pieces that hold it: boxes of the global tensor (file,
                            start, stop) or flat ranges of a TP-local slice (file, key,
                            slice start and shape, offset, length, the piece's sha256)
    model-RRRRR-BBBB.safetensors  parameters (boxes) written by global rank RRRRR, one
                            file per gradient bucket BBBB
    optim-RRRRR-BBBB.safetensors  fp32 Adam moments (and master weights under bf16/fp16)
                            as the flat ranges rank RRRRR holds (format 3)
    rng-RRRRR.safetensors   that rank's RNG states as uint8 tensors (no pickle anywhere)

Tensors are stored under their global names, unpadded; `CheckpointReader.read`
assembles any box of any tensor from whatever pieces cover it (checkpoint/flat.py maps
a flat range to boxes), so any layout reads any other's. Format 2 (optimizer state in
boxes too, one file per rank and kind) still reads.
The trainer's choice of who writes what is in megalite/checkpoint/sharding.py.

Saving: `begin_save` (rank 0) makes `step_NNNNNNN.tmp/`; every writer adds its files
and a `part-RRRRR.json` describing them (`write_part`, fsynced); `commit` (rank 0)
merges the parts into index.json, fsyncs, renames the directory into place and only
then replaces `latest` (a one-line file naming the step directory) through a rename.
A crash or kill at any moment leaves the previous checkpoint loadable and never a
directory that looks complete but is not (no index.json, or a .tmp name). Loading
checks every file's presence and size up front and each file's sha256 before its
first read, and raises CheckpointError naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megalite.checkpoint import flat
from megalite.data.tokenizer import file_sha256
from megalite.errors import CheckpointError
from megalite.parallel import fused

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: optimizer state in boxes only
INDEX = "index.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
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


# ---- writing ---------------------------------------------------------------------------
class Piece:
    """A box [start, stop) of global tensor `name` held by `value` (the box's contents);
    or, with `flat` = {"slice_start", "slice_shape", "offset"}, the 1-D `value` is the
    flat range [offset, offset + numel) of the slice of that shape at slice_start
    (format 3's optimizer-state pieces: checkpoint/flat.py)."""

    def __init__(self, name: str, value: torch.Tensor, start=None, info: dict | None = None,
                 flat: dict | None = None):
        self.name, self.value = name, value.detach()
        self.start = list(start) if start is not None else [0] * value.dim()
        self.info = info or {}  # kind, global shape, split_dim, vocab (see write_part)
        self.flat = flat

    def key(self) -> str:
        """The name inside its file: a flat piece's carries its offset."""
        return f"{self.name}#{self.flat['offset']}" if self.flat else self.name

    def entry(self, fname: str) -> dict:
        """How the index finds this piece."""
        if self.flat:
            return {"file": fname, "key": self.key(), **self.flat,
                    "length": self.value.numel(), "sha256": flat.sha256(self.value)}
        stop = [s + n for s, n in zip(self.start, self.value.shape)]
        return {"file": fname, "start": self.start, "stop": stop}


def measure_write_speed(root: str | os.PathLike, nbytes: int) -> float:
    """Bytes per second of writing (and syncing) a file of `nbytes` under `root`, as a
    save would; the file is removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write-speed-{os.getpid()}"
    data = os.urandom(min(nbytes, 1 << 20))
    started = time.perf_counter()
    try:
        with open(probe, "wb") as f:
            for written in range(0, nbytes, len(data)):
                f.write(data[:nbytes - written])
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)
    return nbytes / max(time.perf_counter() - started, 1e-6)


def staging_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{step_dir_name(step)}.tmp"


def begin_save(root: str | os.PathLike, step: int) -> Path:
    """(One process.) A fresh, empty staging directory for step `step`."""
    tmp = staging_dir(Path(root), step)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    tmp.mkdir(parents=True)
    return tmp


class PartWriter:
    """One process's share of a save: files written one at a time as they are added (so
    a caller can bound what it holds to one file's tensors), then the part-RRRRR.json
    that describes them. Each piece's `info` gives "kind" (model|optim|rng) and "shape"
    (the global shape); "split_dim"/"vocab" say how a layout cuts it (sharding.py)."""

    def __init__(self, tmp: Path, rank: int):
        self.tmp, self.rank = Path(tmp), rank
        self.part = {"files": {}, "tensors": {}}

    def add(self, fname: str, pieces: list[Piece]) -> None:
        if not pieces:
            return
        path = self.tmp / fname
        save_file({p.key(): p.value.contiguous().cpu() for p in pieces}, str(path))
        _fsync(path)
        self.part["files"][fname] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for p in pieces:
            entry = self.part["tensors"].setdefault(p.name, {
                **p.info, "dtype": str(p.value.dtype).removeprefix("torch."), "pieces": []})
            entry["pieces"].append(p.entry(fname))

    def close(self) -> None:
        write_text_atomic(self.tmp / f"part-{self.rank:05d}.json", json.dumps(self.part))


def write_part(tmp: Path, rank: int, files: dict[str, list[Piece]]) -> None:
    """Write this process's files ({file name: pieces}) and its part-RRRRR.json."""
    writer = PartWriter(tmp, rank)
    for fname, pieces in files.items():
        writer.add(fname, pieces)
    writer.close()


def commit(root: str | os.PathLike, tmp: Path, step: int, meta: dict, keep: int,
           ranks: range) -> Path:
    """(One process, after every rank's `write_part`.) Merge the parts of `ranks` into
    index.json, rename the staging directory into place, point `latest` at it, prune."""
    root = Path(root)
    index = {"format_version": FORMAT_VERSION, "step": step, **meta, **provenance(),
             "files": {}, "tensors": {}}
    for rank in ranks:
        path = tmp / f"part-{rank:05d}.json"
        if not path.is_file():
            raise CheckpointError(f"rank {rank} did not finish writing its part of checkpoint "
                                  f"step {step} ('{path}' is missing); nothing was committed.")
        part = json.loads(path.read_text())
        index["files"].update(part["files"])
        for name, entry in part["tensors"].items():
            known = index["tensors"].setdefault(name, {**entry, "pieces": []})
            known["pieces"] += entry["pieces"]
        path.unlink()
    write_text_atomic(tmp / INDEX, json.dumps(index, indent=1))
    _fsync(tmp)
    final = root / step_dir_name(step)
    if final.exists():  # a re-save of the same step (resume, then stop at once) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def save_checkpoint(root: str | os.PathLike, step: int, files: dict[str, dict[str, torch.Tensor]],
                    meta: dict, keep: int) -> Path:
    """One process writes whole global tensors, {file name: {tensor name: tensor}}; the
    file name's prefix before "." or "-" is the tensors' kind (model.safetensors: model).
    For tools (import, reshard --consolidate) and tests."""
    tmp = begin_save(root, step)
    write_part(tmp, 0, {fname: [Piece(n, t, info={"kind": fname.split(".")[0].split("-")[0],
                                                  "shape": list(t.shape)})
                                for n, t in tensors.items()]
                        for fname, tensors in files.items()})
    return commit(root, tmp, step, meta, keep, range(1))


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop other staging directories."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp" not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---- reading ---------------------------------------------------------------------------
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


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory, or the latest checkpoint of a run or checkpoints directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist. Pass a run directory, its checkpoints/ "
                              f"directory or a step_NNNNNNN directory.")
    if (path / INDEX).is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            return resolve_checkpoint("latest", root)
    return resolve_checkpoint(str(path), path)  # raises: names the missing index.json


def read_index(path: str | os.PathLike, verify: bool = True) -> dict:
    """Read a checkpoint's index and check every file's presence and size; with
    `verify`, also every file's sha256 (readers otherwise check each file they open)."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path / INDEX}' is unreadable or not JSON ({e}); the checkpoint "
                              f"is damaged: resume from an earlier one.") from None
    if index.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"'{path}' has format version {index.get('format_version')}, "
                              f"this megalite reads versions {list(READABLE_VERSIONS)}.")
    for fname in index["files"]:
        check_file(path, index, fname, checksum=verify)
    return index


def check_file(path: Path, index: dict, fname: str, checksum: bool = True) -> None:
    file, info = Path(path) / fname, index["files"][fname]
    if not file.is_file():
        raise CheckpointError(f"checkpoint file '{file}' is missing; the checkpoint is "
                              f"incomplete: resume from an earlier one.")
    size = file.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(f"checkpoint file '{file}' has {size} bytes, the index says "
                              f"{info['bytes']}: it is truncated or damaged.")
    if checksum and file_sha256(file) != info["sha256"]:
        raise CheckpointError(f"checkpoint file '{file}' fails its sha256 check: it is "
                              f"corrupted. Resume from an earlier checkpoint.")


class CheckpointReader:
    """Assembles any box of any stored tensor from the pieces that hold it."""

    def __init__(self, path: str | os.PathLike, index: dict | None = None):
        self.path = Path(path)
        self.index = index if index is not None else read_index(path, verify=False)
        self.tensors = self.index["tensors"]
        self._verified: dict[str, bool] = {}  # file -> checked (True: its sha256 too)
        # One file open at a time: a safetensors handle maps its file, and the pages read
        # stay resident while it is open, so a streaming load keeps one file's worth.
        self._handle = None  # (file name, handle)
        self._last = None  # ((file, key), the last flat piece read)

    def names(self, kind: str) -> list[str]:
        return [n for n, e in self.tensors.items() if e["kind"] == kind]

    def read(self, name: str, start=None, stop=None) -> torch.Tensor:
        """Global tensor `name`, or its box [start, stop) (lists, one entry per dim)."""
        entry = self.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint '{self.path}' has no tensor '{name}': it was "
                                  f"written for another model or is incomplete.")
        shape = entry["shape"]
        start = list(start) if start is not None else [0] * len(shape)
        stop = list(stop) if stop is not None else list(shape)
        for piece in entry["pieces"]:  # one piece is exactly the box: no copy
            if piece.get("start") == start and piece.get("stop") == stop:
                return self._slice(piece["file"], name, ())
        out = torch.empty([b - a for a, b in zip(start, stop)],
                          dtype=getattr(torch, entry["dtype"]))
        covered = 0
        for piece in entry["pieces"]:
            if "offset" in piece:  # a flat range: up to three boxes of the global tensor
                for at, lo, hi in flat.runs(piece["slice_start"], piece["slice_shape"],
                                            piece["offset"], piece["length"], shape):
                    common = flat.intersect(start, stop, lo, hi)
                    if common is not None:
                        values = flat.box_view(self.flat_piece(piece, name), at, lo, hi)
                        out[flat.region(start, *common)] = values[flat.region(lo, *common)]
                        covered += math.prod(b - a for a, b in zip(*common))
                continue
            common = flat.intersect(start, stop, piece["start"], piece["stop"])
            if common is None:
                continue
            dst = flat.region(start, *common)
            out[dst] = self._slice(piece["file"], name, flat.region(piece["start"], *common))
            covered += out[dst].numel()
        if covered != out.numel():
            raise CheckpointError(f"checkpoint '{self.path}': the pieces of '{name}' cover "
                                  f"{covered} of the {out.numel()} elements asked for; the "
                                  f"index is inconsistent.")
        return out

    def flat_piece(self, piece: dict, name: str) -> torch.Tensor:
        """A flat piece, its own checksum verified (so a load reads only the pieces it
        needs, not whole files); the last one is kept for the next box."""
        ident = (piece["file"], piece["key"])
        if self._last is None or self._last[0] != ident:
            self._last = None  # release the previous piece before reading the next
            # a flat piece has its own checksum: the file's is not needed to trust it
            value = self._file(piece["file"], checksum=False,
                               use=lambda f: f.get_tensor(piece["key"]))
            if flat.sha256(value) != piece["sha256"]:
                raise CheckpointError(
                    f"checkpoint '{self.path}': the piece of '{name}' at flat offset "
                    f"{piece['offset']} ({piece['length']} elements) in file "
                    f"'{piece['file']}' fails its sha256 check: it is corrupted. Resume "
                    f"from an earlier checkpoint.")
            self._last = (ident, value)
        return self._last[1]

    def _slice(self, fname: str, name: str, box: tuple) -> torch.Tensor:
        return self._file(fname, checksum=True,
                          use=lambda f: f.get_slice(name)[box] if box else f.get_tensor(name))

    def _file(self, fname: str, checksum: bool, use):
        """`use(handle)` on file `fname`, checked before its first read."""
        try:
            if fname not in self._verified or (checksum and not self._verified[fname]):
                check_file(self.path, self.index, fname, checksum=checksum)
                self._verified[fname] = checksum
            if self._handle is None or self._handle[0] != fname:
                self._handle = None  # unmap the previous file first
                self._handle = (fname, safe_open(str(self.path / fname), framework="pt"))
            return use(self._handle[1])
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"checkpoint file '{self.path / fname}' cannot be read "
                                  f"({e}).") from None


def read_model_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model parameter of a checkpoint as its unpadded global tensor, by global name,
    whatever layout wrote it (the reader for tools: export, generate, inspect)."""
    reader = CheckpointReader(path)
    return {name: reader.read(name) for name in reader.names("model")}


def check_shapes(index: dict, expected: dict[str, tuple], what: str = "model") -> None:
    """Fail before loading when the checkpoint holds another model shape."""
    stored = {n: tuple(e["shape"]) for n, e in index["tensors"].items() if e["kind"] == what}
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


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, index: dict) -> None:
    """Copy the checkpoint's model tensors into a single-device model after checking shapes."""
    params = dict(model.named_parameters())  # tied weights appear once
    check_shapes(index, fused.stored_shapes(params.items()))
    state = read_model_tensors(path)
    with torch.no_grad():
        for name, p in params.items():  # a fused projection from the parts it is stored as
            p.copy_(fused.joined(name, p, state))
