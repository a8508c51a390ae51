"""megalite's sentencepiece tokenizer as a Hugging Face tokenizer, and the copy back.

A megalite tokenizer (tools/train_tokenizer.py) is a sentencepiece BPE model with
identity normalisation, no dummy prefix, whitespace-only pieces and byte fallback.
sentencepiece encodes by starting from characters (unknown ones become <0xNN> byte
pieces) and repeatedly merging the adjacent pair whose union is the vocabulary piece
with the highest score, the leftmost first on a tie. A `tokenizers` BPE model with the
same vocabulary does the same when its merge list holds every split of every normal
piece into two normal pieces, ranked by the score of the piece they make, and when
spaces become "▁" first (a Replace normaliser: sentencepiece's whitespace escaping with
no dummy prefix and no pre-splitting). Byte and control pieces never result from a
merge in either. The decoder undoes it: "▁" -> " ", byte pieces -> bytes.

The special tokens (<unk>, <s>, </s>) are marked special so `skip_special_tokens`
and the HF config know them, and `split_special_tokens` in tokenizer_config.json makes
transformers encode their text ("</s>" inside a source file) as ordinary characters,
as sentencepiece does. No BOS/EOS is added on encode: megalite adds none either.
Every conversion is checked against sentencepiece on a probe text before it is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

from megalite.data.tokenizer import Tokenizer
from megalite.errors import CheckpointError, DataError

SPACE = "\u2581"
# Code-like text that exercises what the conversion must get right: runs of spaces,
# tabs, newlines, digits, characters outside a small vocabulary (byte fallback), a
# literal "▁", special-token text and Windows line ends.
PROBE_TEXT = ('def f(x):\n    """Doc:\tvalue  \u00e9\u00df \u4e2d\u6587 \U0001f600"""\n'
              '\tif x >= 10_000:\r\n        return "</s><s><unk>"  # 2\u2581x\n\n\n'
              '  \u00a0  end\n')
# Beside a tokenizer.json, these name its special tokens (eos, bos, ...).
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _normal_pieces(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}


def sentencepiece_to_hf(model_path: str | Path):
    """The `tokenizers.Tokenizer` equivalent of a megalite sentencepiece BPE model."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = _normal_pieces(sp)
    ranked = []
    for piece, piece_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-sp.get_score(piece_id), piece_id, normal[left], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = sp.id_to_piece(sp.unk_id())
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                                 fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    specials = [i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0]
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in specials])
    tok.encode_special_tokens = True  # as split_special_tokens does in transformers
    _check_equal(sp, tok, model_path)
    return tok


def _check_equal(sp, tok, model_path) -> None:
    expected = sp.encode(PROBE_TEXT)
    got = tok.encode(PROBE_TEXT, add_special_tokens=False).ids
    if got != expected or tok.decode(got, skip_special_tokens=True) != sp.decode(expected):
        raise DataError(f"tokenizer '{model_path}' cannot be converted exactly: it is not a "
                        f"lossless BPE model like those tools/train_tokenizer.py trains "
                        f"(identity normalisation, no dummy prefix, byte fallback). Pass an "
                        f"equivalent tokenizer.json with --tokenizer.")


def _hf_config(names: dict[str, str | None], model_max_length: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", **names,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "split_special_tokens": True, "model_max_length": model_max_length}


def write_hf_tokenizer(tokenizer_path: str | Path, out: Path, model_max_length: int) -> dict:
    """Write the HF tokenizer files for megalite tokenizer `tokenizer_path` (a .model, or
    a tokenizer.json that an import brought in) into `out`; returns the special ids."""
    path = Path(tokenizer_path)
    tokenizer = Tokenizer(path)  # a clear DataError when it is missing or unreadable
    if path.suffix == ".json":
        hf = HFTokenizer.from_file(str(path))
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else _hf_config(
            {"bos_token": hf.id_to_token(tokenizer.bos_id), "eos_token":
             hf.id_to_token(tokenizer.eos_id)}, model_max_length)
        # megalite encoded the training data with special-token text split (data/tokenizer.py).
        config["split_special_tokens"] = True
        shutil.copyfile(path, out / "tokenizer.json")
        if path.with_name("special_tokens_map.json").is_file():
            shutil.copyfile(path.with_name("special_tokens_map.json"),
                            out / "special_tokens_map.json")
    else:
        sentencepiece_to_hf(path).save(str(out / "tokenizer.json"))
        sp = spm.SentencePieceProcessor(model_file=str(path))
        names = {f"{kind}_token": sp.id_to_piece(i) if i >= 0 else None for kind, i in
                 (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                  ("pad", sp.pad_id()))}
        config = _hf_config(names, model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return {"bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
            "eos_token_id": tokenizer.eos_id}


def copy_tokenizer(source: Path, out: Path) -> Path:
    """Copy a tokenizer (an HF model directory, a tokenizer.json with the config files
    beside it, or a sentencepiece .model) into `out`; returns the file megalite loads."""
    if source.is_dir():
        found = [source / n for n in ("tokenizer.json", "tokenizer.model")
                 if (source / n).is_file()]
        if not found:
            raise CheckpointError(f"'{source}' has no tokenizer.json or tokenizer.model. Pass "
                                  f"the tokenizer with --tokenizer PATH (a tokenizer.json or a "
                                  f"sentencepiece .model).")
        source = found[0]
    elif not source.is_file():
        raise CheckpointError(f"tokenizer '{source}' does not exist; pass a tokenizer.json, a "
                              f"sentencepiece .model or a directory holding one.")
    out.mkdir(parents=True, exist_ok=True)
    names = SIDE_FILES if source.suffix == ".json" else ()
    for name in names:
        if source.with_name(name).is_file():
            shutil.copyfile(source.with_name(name), out / name)
    path = out / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model")
    shutil.copyfile(source, path)
    Tokenizer(path)  # fails here, not in prepare_data, when it cannot be used
    return path
