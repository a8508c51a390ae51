"""The sentencepiece tokenizer: training a lossless BPE model and loading it.

A pretraining tokenizer must give back exactly the text it was fed: code depends on
newlines, tabs, runs of spaces and leading spaces. sentencepiece's defaults are made
for natural-language sentences (NFKC normalisation, whitespace squashing, a dummy
leading space), so training turns all of that off and adds byte fallback, which lets
any character outside the vocabulary travel as raw UTF-8 bytes instead of <unk>.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from megalite.data.corpus import CorpusStats, iter_documents
from megalite.errors import DataError

# sentencepiece reserves unk/bos/eos and byte fallback reserves 256 byte pieces.
MIN_VOCAB_SIZE = 3 + 256 + 1


def _sentences(documents: Iterable[tuple[str, str]], max_sentence_bytes: int,
               max_train_bytes: int) -> Iterator[str]:
    """Cut documents into line-aligned chunks sentencepiece accepts, up to a byte budget.

    Lines keep their "\\n" so the model learns newline pieces ("):\\n", "\\n\\n"); a line
    longer than the chunk size is cut into pieces of max_sentence_bytes // 4 characters,
    which fit whatever their UTF-8 width. The budget keeps training to seconds.
    """
    fed, piece_chars = 0, max(1, max_sentence_bytes // 4)
    for _, text in documents:
        chunk, chunk_bytes = [], 0
        for line in text.splitlines(keepends=True):
            pieces = [line] if len(line.encode()) <= max_sentence_bytes else [
                line[i:i + piece_chars] for i in range(0, len(line), piece_chars)]
            for piece in pieces:
                size = len(piece.encode())
                if chunk and chunk_bytes + size > max_sentence_bytes:
                    yield "".join(chunk)
                    chunk, chunk_bytes = [], 0
                chunk.append(piece)
                chunk_bytes += size
                fed += size
                if fed >= max_train_bytes:
                    yield "".join(chunk)
                    return
        if chunk:
            yield "".join(chunk)


def train_tokenizer(files: Sequence[str | Path], model_prefix: str | Path, vocab_size: int,
                    max_sentence_bytes: int = 4096, max_train_bytes: int = 32 << 20,
                    num_threads: int = 2, stats: CorpusStats | None = None) -> Path:
    """Train a lossless sentencepiece BPE model on the documents in `files`.

    Writes `{model_prefix}.model` atomically (temporary name, then rename) and returns
    its path. Training reads at most `max_train_bytes` of text in input order with
    shuffling off, so the same inputs give the same model.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size} is too small: byte fallback and the special "
                        f"tokens alone take {MIN_VOCAB_SIZE - 1} ids. Use at least "
                        f"{MIN_VOCAB_SIZE} (a few thousand is typical).")
    stats = stats if stats is not None else CorpusStats()
    # Read up front (bounded by max_train_bytes): an input error raised inside
    # sentencepiece's iterator would come back as an opaque RuntimeError.
    sentences = list(_sentences(iter_documents(files, stats), max_sentence_bytes,
                                max_train_bytes))
    if not sentences:
        raise DataError(f"no text to train a tokenizer on in {[str(f) for f in files]} "
                        f"({stats.skipped} non-UTF-8 files skipped). Pass files or "
                        f"directories holding .txt/.py/.md/.jsonl text.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
            split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=max_sentence_bytes, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=num_threads,
            # A small corpus may not hold vocab_size distinct merges; take what it has.
            hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:
        hint = ("raise vocab_size: every character seen in training needs an id of its own"
                if "required_chars" in str(e) else "try a smaller vocab_size or more text")
        raise DataError(f"sentencepiece could not train a tokenizer with vocab_size="
                        f"{vocab_size} ({e}); {hint}.") from None
    out = Path(f"{model_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return out


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Tokenizer:
    """A trained sentencepiece model: text <-> token ids, plus the special ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model '{self.path}' does not exist. Train one with "
                            f"`python tools/train_tokenizer.py FILES --out PREFIX` or set "
                            f"--data.tokenizer to an existing .model file.")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer model '{self.path}' is not a sentencepiece model "
                            f"({e}). Point --data.tokenizer at a .model file written by "
                            f"tools/train_tokenizer.py.") from None
        if self.eos_id < 0:
            raise DataError(f"tokenizer model '{self.path}' has no end-of-sequence token, "
                            f"which separates documents. Retrain it with "
                            f"tools/train_tokenizer.py.")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        # numpy integers are not accepted by sentencepiece's bindings.
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
