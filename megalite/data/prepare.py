"""Data preparation: documents -> token files that training memory-maps.

For a prefix P this writes
  P.train.bin, P.val.bin          the token stream, each document followed by eos
                                  (raw little-endian uint16, or uint32 for vocabularies
                                  of 65536 and more)
  P.train.idx.npy, P.val.idx.npy  int64 start offset of every document in the stream
  P.json                          what was written and from what; written last, so its
                                  presence is the marker of a complete preparation

Encoding runs in worker processes that each load the tokenizer once; documents are
handed out in bounded batches and collected in input order, so the output does not
depend on the number of workers. Every file is written under a temporary name and
renamed when complete, and an old P.json is removed first: an interrupted run never
leaves files that look complete.
"""

from __future__ import annotations

import array
import itertools
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from megalite.data.corpus import CorpusStats, iter_documents
from megalite.data.tokenizer import Tokenizer, file_sha256
from megalite.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Documents handed to the pool at a time: bounds memory on large corpora while
# giving every worker plenty to do.
BATCH_DOCUMENTS = 512

_worker_tokenizer: Tokenizer | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def output_paths(prefix: str | Path) -> dict[str, Path]:
    prefix = str(prefix)
    paths = {"json": Path(f"{prefix}.json")}
    for split in SPLITS:
        paths[f"{split}.bin"] = Path(f"{prefix}.{split}.bin")
        paths[f"{split}.idx"] = Path(f"{prefix}.{split}.idx.npy")
    return paths


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode(text: str) -> np.ndarray:
    ids = _worker_tokenizer.encode(text)
    ids.append(_worker_tokenizer.eos_id)
    return np.asarray(ids, dtype=token_dtype(_worker_tokenizer.vocab_size))


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _encoded(texts: Iterable[str], tokenizer_path: Path, workers: int) -> Iterator[np.ndarray]:
    """Token arrays (eos appended) of the texts, in input order."""
    if workers <= 1:
        _init_worker(str(tokenizer_path))
        yield from map(_encode, texts)
        return
    # spawn, not fork: the caller may already run torch threads, which fork can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
        for batch in _batches(texts, BATCH_DOCUMENTS):
            yield from pool.imap(_encode, batch, chunksize=max(1, len(batch) // (4 * workers)))


class _SplitWriter:
    """Appends documents of one split to a temporary .bin and remembers their offsets."""

    def __init__(self, path: Path):
        self.tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")
        self.starts = array.array("q")  # 8 bytes per document, not a Python int each
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.starts.append(self.tokens)
        self.file.write(ids.tobytes())
        self.tokens += len(ids)


def _write_npy(path: Path, array: np.ndarray) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return tmp


def _with_progress(documents: Iterator[tuple[str, str]], stats: CorpusStats
                   ) -> Iterator[tuple[str, str]]:
    """The documents, with a progress bar on stderr (tqdm) of the text bytes `stats`
    counts as iter_documents yields them."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("[megalite] pip install tqdm for a progress bar (or pip install -e .[data])",
              file=sys.stderr)
        yield from documents
        return
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
              file=sys.stderr, mininterval=1.0) as bar:
        for document in documents:
            bar.update(stats.text_bytes - bar.n)
            yield document


def prepare(inputs: Sequence[str | Path], tokenizer_path: str | Path, out_prefix: str | Path,
            val_fraction: float = 0.02, workers: int = 2, seed: int = 0,
            text_field: str = "text", progress: bool = False) -> dict:
    """Tokenize the documents in `inputs` into train/val token files at `out_prefix`.

    `text_field`: the field (JSON lines) or column (Parquet) that holds the text;
    `progress`: a progress bar on stderr. Streams: memory stays bounded by the batches
    in flight, whatever the corpus size.

    Each document goes to val with probability val_fraction, drawn from a generator
    seeded by `seed` in document order. The decision for the last document waits until
    the end, so that each split can be guaranteed at least one document. Returns the
    summary that is also written to `{out_prefix}.json`.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1).")
    start = time.time()
    tokenizer = Tokenizer(tokenizer_path)
    paths = output_paths(out_prefix)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].unlink(missing_ok=True)
    writers = {split: _SplitWriter(paths[f"{split}.bin"]) for split in SPLITS}
    temporaries = {f"{split}.bin": writers[split].tmp for split in SPLITS}
    stats = CorpusStats()
    rng = np.random.default_rng(seed)
    documents = iter_documents(inputs, stats, text_field)
    texts = (text for _, text in (_with_progress(documents, stats) if progress else documents))
    encoded = _encoded(texts, tokenizer.path, workers)
    pending = None
    try:
        for ids in encoded:
            if pending is not None:
                writers["val" if rng.random() < val_fraction else "train"].add(pending)
            pending = ids
        if stats.documents < 2:
            raise DataError(
                f"the corpus in {[str(p) for p in inputs]} holds {stats.documents} document(s) "
                f"({stats.skipped} non-UTF-8 files skipped); at least 2 are needed, one for "
                f"training and one for validation. Add .txt/.py/.md/.jsonl text.")
        if not writers["val"].starts:
            last = "val"
        elif not writers["train"].starts:
            last = "train"
        else:
            last = "val" if rng.random() < val_fraction else "train"
        writers[last].add(pending)
        for split in SPLITS:
            writers[split].file.close()
            temporaries[f"{split}.idx"] = _write_npy(
                paths[f"{split}.idx"], np.asarray(writers[split].starts, dtype=np.int64))
    except BaseException:
        encoded.close()
        for writer in writers.values():
            writer.file.close()
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
        raise
    for key, tmp in temporaries.items():
        os.replace(tmp, paths[key])
    summary = {
        "format": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_documents": len(writers["train"].starts),
        "val_documents": len(writers["val"].starts),
        "documents": stats.documents,
        "text_bytes": stats.text_bytes,
        "skipped_files": stats.skipped,
        "skipped": stats.skipped_files,
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "inputs": [str(p) for p in inputs],
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "seconds": round(time.time() - start, 3),
    }
    tmp = paths["json"].with_name(f"{paths['json'].name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, paths["json"])
    return summary


def load_summary(prefix: str | Path) -> dict:
    """The .json of a complete preparation, or DataError saying how to make one."""
    path = output_paths(prefix)["json"]
    if not path.is_file():
        raise DataError(f"prepared data '{prefix}' is missing or incomplete (no {path}). "
                        f"Run `python tools/prepare_data.py INPUTS --tokenizer MODEL --out "
                        f"{prefix}` to prepare it.")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}); re-run tools/prepare_data.py "
                        f"for '{prefix}'.") from None
    if summary.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {summary.get('format')!r}, this code reads format "
                        f"{FORMAT_VERSION}; re-run tools/prepare_data.py for '{prefix}'.")
    return summary
