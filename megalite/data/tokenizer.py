"""The tokenizer: training a lossless sentencepiece BPE model, and loading one.

A pretraining tokenizer must give back exactly the text it was fed: code depends on
newlines, tabs, runs of spaces and leading spaces. sentencepiece's defaults are made
for natural-language sentences (NFKC normalisation, whitespace squashing, a dummy
leading space), so training turns all of that off and adds byte fallback, which lets
any character outside the vocabulary travel as raw UTF-8 bytes instead of <unk>.

`Tokenizer` also opens a Hugging Face `tokenizer.json` (the `tokenizers` library), so
a model imported with tools/import_hf.py keeps its own vocabulary for prepare_data and
training. Its special tokens come from the `tokenizer_config.json` beside it. Either
kind encodes raw text only: no BOS/EOS is added (prepare.py appends the EOS), and the
text of a special token ("</s>" inside a document) is encoded as ordinary text, as
sentencepiece does, so a document cannot forge a document boundary.
"""

from __future__ import annotations

import hashlib
import io
import json
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
                    num_threads: int = 2, stats: CorpusStats | None = None,
                    text_field: str = "text") -> Path:
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
    sentences = list(_sentences(iter_documents(files, stats, text_field), max_sentence_bytes,
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
    """Hex sha256 of a file, read in 4 MiB blocks (checkpoint files may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _HFTokenizer:
    """A Hugging Face tokenizer.json, with the same interface as a SentencePieceProcessor."""

    # Used when no tokenizer_config.json names the special tokens.
    EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
    BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as Backend  # only needed for imported tokenizers

        self._tok = Backend.from_file(str(path))
        self._tok.encode_special_tokens = True  # "</s>" in a document is text (see top)
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._eos = self._special(config.get("eos_token"), self.EOS_NAMES)
        self._bos = self._special(config.get("bos_token"), self.BOS_NAMES)

    def _special(self, named, fallbacks) -> int:
        if isinstance(named, dict):  # a serialised AddedToken
            named = named.get("content")
        for name in [named] if named else fallbacks:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return -1

    def get_piece_size(self) -> int:
        # Added tokens may sit above the model's vocabulary: the largest id decides.
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def eos_id(self) -> int:
        return self._eos

    def bos_id(self) -> int:
        return self._bos

    def encode(self, text: str, out_type=int) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        # sentencepiece prints nothing for control tokens; do the same.
        return self._tok.decode(ids, skip_special_tokens=True)


class Tokenizer:
    """A trained sentencepiece model (.model) or a Hugging Face tokenizer.json: text <->
    token ids, plus the special ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model '{self.path}' does not exist. Train one with "
                            f"`python tools/train_tokenizer.py FILES --out PREFIX` or set "
                            f"--data.tokenizer to an existing .model (or tokenizer.json) file.")
        try:
            self._backend = (_HFTokenizer(self.path) if self.path.suffix == ".json"
                             else spm.SentencePieceProcessor(model_file=str(self.path)))
        except Exception as e:  # tokenizers reports a malformed file as a bare Exception
            kind = "Hugging Face tokenizer.json" if self.path.suffix == ".json" else \
                "sentencepiece model"
            raise DataError(f"tokenizer '{self.path}' is not a {kind} ({e}). Point "
                            f"--data.tokenizer at a .model file written by "
                            f"tools/train_tokenizer.py or a tokenizer.json.") from None
        if self.eos_id < 0:
            raise DataError(f"tokenizer '{self.path}' has no end-of-sequence token, which "
                            f"separates documents. Retrain it with tools/train_tokenizer.py "
                            f"(or name one as eos_token in the tokenizer_config.json beside a "
                            f"tokenizer.json).")

    @property
    def vocab_size(self) -> int:
        return self._backend.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._backend.eos_id()

    @property
    def bos_id(self) -> int:
        return self._backend.bos_id()

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        # numpy integers are not accepted by sentencepiece's bindings.
        return self._backend.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
