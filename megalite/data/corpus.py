"""Where raw text comes from: the embedded default corpus and the document reader.

The default corpus is the running Python's standard library (its .py sources), so
the default run needs no download and is the same on every machine with the same
Python. `iter_documents` turns user inputs (text files, directories, Megatron-style
JSON lines, plain or compressed, and Parquet shards) into a deterministic stream of
documents; tokenizer training and data
preparation both read through it so they see exactly the same text.
"""

from __future__ import annotations

import codecs
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from megalite.data import records
from megalite.data.records import RECORD_SUFFIXES, record_format
from megalite.errors import DataError

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIX = ".jsonl"
JSONL_FIELD = "text"
READ_CHUNK_BYTES = 1 << 20  # the UTF-8 check of a file reads this much at a time
# Directory names inside the stdlib that hold tests or third-party packages: tests are
# full of deliberately odd encodings and generated data, packages differ per machine.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests",
                                  "idle_test", "__pycache__"})


@dataclass
class CorpusStats:
    """Counts gathered while reading; the summary of prepare/train reports them."""

    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents yielded
    skipped_files: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int) -> list[Path]:
    """The default corpus: stdlib .py files sorted by relative path, up to max_bytes.

    Files are taken in order and the list stops before the first file that would
    exceed the cap (but holds at least one file), so the same Python and cap always
    give the same list.
    """
    root = stdlib_root()
    candidates = []
    for directory, subdirs, names in os.walk(root):
        # Pruning here keeps the walk out of test/, the largest part of the stdlib.
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
        candidates += [Path(directory, n) for n in names if n.endswith(".py")]
    candidates.sort(key=lambda p: p.relative_to(root).as_posix())
    if not candidates:
        raise DataError(f"no .py files found in the Python standard library at {root}; "
                        f"pass prepared data with --data.paths instead.")
    chosen, total = [], 0
    for path in candidates:
        size = path.stat().st_size
        if chosen and total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def _decode_text(data: bytes) -> str | None:
    """data as text, or None when it is not UTF-8 text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Valid UTF-8 with NUL bytes is a binary file (archives, images), not text.
    return None if "\x00" in text else text


def _is_text_file(path: Path) -> bool:
    """Whether a whole file is UTF-8 text, checked in bounded memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                if "\x00" in decoder.decode(chunk):
                    return False
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly, then the text and record files under each directory, sorted."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and (
                p.suffix in TEXT_SUFFIXES or record_format(p)))
        elif path.is_file():
            yield path
        else:
            raise DataError(f"input '{path}' does not exist. Pass existing files or "
                            f"directories ({', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}).")


def iter_documents(paths: Iterable[str | Path], stats: CorpusStats | None = None,
                   text_field: str = JSONL_FIELD) -> Iterator[tuple[str, str]]:
    """Yield (source_name, text) for every document in paths, in a fixed order.

    A text file is one document; a record file (.jsonl, .jsonl.gz, .jsonl.zst, .parquet:
    data/records.py) holds one document per record in its `text_field` ("text", as
    Megatron's preprocess_data.py). Files that are not UTF-8 text are skipped and
    recorded in `stats`; empty documents are dropped because they carry no tokens.
    """
    stats = stats if stats is not None else CorpusStats()
    for path in _expand(paths):
        if record_format(path):
            # A plain .jsonl is checked before its first line is used: a skipped file
            # yields nothing. Compressed and Parquet shards check each record instead.
            if record_format(path) == JSONL_SUFFIX and not _is_text_file(path):
                stats.skipped_files.append(str(path))
                continue
            docs = records.documents(path, text_field)
        else:
            text = _decode_text(path.read_bytes())
            if text is None:
                stats.skipped_files.append(str(path))
                continue
            docs = [(str(path), text)]
        for name, doc in docs:
            if doc:
                stats.documents += 1
                stats.text_bytes += len(doc.encode("utf-8"))
                yield name, doc
