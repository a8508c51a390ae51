"""Corpora that hold one document per record: JSON lines, plain or compressed, and Parquet.

`documents(path, text_field)` streams (name, text) out of one shard, whatever its
format, in bounded memory: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (line by line, through a
streaming decompressor) and `.parquet` (one row group batch at a time, only the text
column read). A shard that cannot be read (truncated, corrupt, not the format its name
says) is a DataError naming the file, and the line or row where the format has them.
Parquet needs pyarrow and .zst needs zstandard, optional extras: their absence is a
DataError saying what to install.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

from megalite.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
RECORD_SUFFIXES = (*JSONL_SUFFIXES, PARQUET_SUFFIX)
PARQUET_BATCH_ROWS = 1024  # rows in memory at a time
READ_BYTES = 1 << 20  # compressed bytes read at a time


def record_format(path: Path) -> str | None:
    """The record format a file name says (one of RECORD_SUFFIXES), or None."""
    name = path.name.lower()
    return next((s for s in sorted(RECORD_SUFFIXES, key=len, reverse=True)
                 if name.endswith(s)), None)


def _optional(module: str, path: Path, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"reading '{path}' needs {extra}, an optional extra megalite does not "
                        f"install by itself: pip install {extra} (or pip install -e .[data]; "
                        f"./launch.sh's environment has it).") from None


class _Truncated(Exception):
    pass


def _zstd_lines(path: Path, zstandard) -> Iterator[bytes]:
    """The lines of a .zst file, frame after frame, read in chunks; a last frame cut
    short raises _Truncated (zstandard's stream reader would just stop)."""
    with open(path, "rb") as raw:
        frame, pending, fed = zstandard.ZstdDecompressor().decompressobj(), b"", False
        while chunk := raw.read(READ_BYTES):
            while chunk:
                pending += frame.decompress(chunk)
                fed = True
                chunk = frame.unused_data if frame.eof else b""
                if frame.eof:  # the next frame starts in what is left
                    frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
        if fed:
            raise _Truncated("the last frame ends before its end")
        if pending:
            yield pending


def _binary_lines(path: Path, kind: str):
    """The file's decompressed lines, and the errors a damaged stream raises."""
    if kind == ".jsonl":
        return open(path, "rb"), ()
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb"), (OSError, EOFError, zlib.error)
    zstandard = _optional("zstandard", path, "zstandard")
    return contextlib.closing(_zstd_lines(path, zstandard)), (zstandard.ZstdError, _Truncated)


def _jsonl(path: Path, kind: str, field: str) -> Iterator[tuple[str, str]]:
    """One document per line. Lines end at "\\n" only: a raw U+2028 or U+0085 inside a
    JSON string is not a break."""
    stream, damaged = _binary_lines(path, kind)
    lineno = 0
    with stream as lines:
        try:
            for lineno, raw in enumerate(lines, start=1):
                yield _jsonl_record(path, lineno, raw, field)
        except damaged as e:
            raise DataError(f"{path}: the {kind} stream is damaged after line {lineno} ({e}); "
                            f"the shard is truncated or corrupt: re-download or remove it."
                            ) from None


def _jsonl_record(path: Path, lineno: int, raw: bytes, field: str) -> tuple[str, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno}: not UTF-8 text; fix or remove the line.") from None
    if not line.strip():
        return f"{path}:{lineno}", ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}). Each line of a JSON lines "
                        f"file must be one JSON object like {{\"{field}\": \"...\"}}; fix or "
                        f"remove the line.") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise DataError(f"{path}:{lineno}: the JSON object has no string field '{field}'. "
                        f"Each line must look like {{\"{field}\": \"...\"}}; fix or remove the "
                        f"line, or name the field with --text-field.")
    return f"{path}:{lineno}", record[field]


def _parquet(path: Path, field: str) -> Iterator[tuple[str, str]]:
    pyarrow = _optional("pyarrow", path, "pyarrow")
    import pyarrow.parquet as pq
    try:
        shard = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"'{path}' is not a readable Parquet file ({e}); the shard is "
                        f"truncated or corrupt: re-download or remove it.") from None
    if field not in shard.schema_arrow.names:
        raise DataError(f"'{path}' has no column '{field}' (its columns: "
                        f"{', '.join(shard.schema_arrow.names)}); name the text column with "
                        f"--text-field.")
    row = 0
    try:
        for batch in shard.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str) and text is not None:
                    raise DataError(f"{path}: row {row}: column '{field}' holds "
                                    f"{type(text).__name__}, not text; name the text column "
                                    f"with --text-field.")
                yield f"{path}:row {row}", text or ""
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read past row {row} ({e}); the shard is truncated "
                        f"or corrupt: re-download or remove it.") from None


def documents(path: Path, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) of every record of a shard, in file order; empty texts included."""
    kind = record_format(path)
    if kind == PARQUET_SUFFIX:
        return _parquet(path, text_field)
    if kind in JSONL_SUFFIXES:
        return _jsonl(path, kind, text_field)
    raise DataError(f"'{path}' is not a record file ({', '.join(RECORD_SUFFIXES)}).")
