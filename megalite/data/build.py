"""From a Config to ready datasets: the default corpus cache and weighted data paths.

Two steps, because they run in different processes. `prepare_default_data` runs
once, before any training worker starts (the launcher calls it): with no
`data.paths` it trains a tokenizer on the embedded stdlib corpus and prepares the
token files into a cache directory keyed by everything that shapes them, reusing a
complete one. `build_data` runs in every worker and only opens what exists; it never
prepares, so ranks cannot race to write the same files. `resolve_with_data` then fills
the config's automatic sizes from the tokenizer, in every worker and in the preflight;
`tokenizer_vocab_size` gives the vocabulary alone (the estimator's), reading no data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megalite.config import Config, resolve
from megalite.data.corpus import stdlib_files, stdlib_root
from megalite.data.dataset import BlendedDataset, TokenDataset
from megalite.data.prepare import FORMAT_VERSION, load_summary, output_paths, prepare
from megalite.data.tokenizer import Tokenizer, file_sha256, train_tokenizer
from megalite.errors import ConfigError, DataError

DEFAULT_PREFIX_NAME = "stdlib"
DEFAULT_TOKENIZER_NAME = "tokenizer"
# The default corpus split is fixed so that changing train.seed does not re-prepare.
DEFAULT_SPLIT_SEED = 0


@dataclass
class DataBundle:
    train: TokenDataset | BlendedDataset
    val: TokenDataset | BlendedDataset
    tokenizer: Tokenizer
    vocab_size: int


def _default_files(cfg: Config) -> list[Path]:
    return stdlib_files(int(cfg.data.corpus_max_mb * 2**20))


def default_data_dir(cfg: Config) -> Path:
    """The cache directory of the default corpus, named by a hash of what shapes it."""
    root = stdlib_root()
    key = {
        "files": [(p.relative_to(root).as_posix(), p.stat().st_size) for p in _default_files(cfg)],
        "vocab_size": cfg.data.vocab_size,
        "corpus_max_mb": cfg.data.corpus_max_mb,
        "val_fraction": cfg.data.val_fraction,
        "format": FORMAT_VERSION,
        "tokenizer": file_sha256(_given_tokenizer(cfg)) if cfg.data.tokenizer else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.data.cache_dir) / f"{DEFAULT_PREFIX_NAME}-{digest}"


def _given_tokenizer(cfg: Config) -> Path:
    path = Path(cfg.data.tokenizer)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer='{cfg.data.tokenizer}' does not exist. Set it to a "
                          f"sentencepiece .model file, or leave it empty to train one on the "
                          f"default corpus.")
    return path


def prepare_default_data(cfg: Config) -> tuple[Path, Path | None]:
    """Make sure the data of `cfg` exists; returns (tokenizer path, default prefix).

    With `data.paths` set the data was prepared by the user and nothing is done: the
    prefix is None and the tokenizer is the one build_data will use. Otherwise the
    stdlib corpus is tokenized into the cache (only when no complete copy is there).
    """
    if cfg.data.paths:
        return _tokenizer_for_paths(cfg, parse_data_paths(cfg.data.paths)), None
    tokenizer_given = bool(cfg.data.tokenizer)
    directory = default_data_dir(cfg)
    prefix = directory / DEFAULT_PREFIX_NAME
    tokenizer = (Path(cfg.data.tokenizer) if tokenizer_given
                 else directory / f"{DEFAULT_TOKENIZER_NAME}.model")
    if output_paths(prefix)["json"].is_file() and tokenizer.is_file():
        return tokenizer, prefix
    files = _default_files(cfg)
    if not tokenizer_given:
        train_tokenizer(files, directory / DEFAULT_TOKENIZER_NAME, cfg.data.vocab_size,
                        num_threads=max(1, cfg.data.workers))
    prepare(files, tokenizer, prefix, val_fraction=cfg.data.val_fraction,
            workers=cfg.data.workers, seed=DEFAULT_SPLIT_SEED)
    return tokenizer, prefix


def parse_data_paths(paths: list) -> list[tuple[float, str]]:
    """["0.7", "a", "0.3", "b"] or ["a", "b"] (equal weights) -> [(weight, prefix), ...]."""
    def as_weight(item) -> float | None:
        try:
            return float(item)
        except (TypeError, ValueError):
            return None

    items = list(paths)
    example = "data.paths: [0.7, prep/a, 0.3, prep/b] or [prep/a, prep/b]"
    if not items:
        raise ConfigError(f"data.paths is empty; {example}.")
    if as_weight(items[0]) is None:
        numbers = [str(i) for i in items if as_weight(i) is not None]
        if numbers:
            raise ConfigError(f"data.paths={items} mixes weights {numbers} with unweighted "
                              f"prefixes; give a weight before every prefix or none: {example}.")
        return [(1.0 / len(items), str(i)) for i in items]
    pairs = list(zip(items[0::2], items[1::2]))
    if len(items) % 2 or any(as_weight(w) is None or as_weight(p) is not None for w, p in pairs):
        raise ConfigError(f"data.paths={items} is not a list of weight, prefix pairs; "
                          f"{example}.")
    if any(as_weight(w) <= 0 for w, _ in pairs):
        raise ConfigError(f"data.paths={items} has a weight <= 0; weights must be positive.")
    return [(as_weight(w), str(p)) for w, p in pairs]


def _tokenizer_for_paths(cfg: Config, weighted: list[tuple[float, str]]) -> Path:
    """data.tokenizer, or the one every prefix was prepared with (which must agree)."""
    summaries = {prefix: load_summary(prefix) for _, prefix in weighted}
    hashes = {s["tokenizer_sha256"] for s in summaries.values()}
    if len(hashes) > 1:
        used = ", ".join(f"{p}: {s['tokenizer']}" for p, s in summaries.items())
        raise DataError(f"the prefixes in data.paths were prepared with different tokenizers "
                        f"({used}); prepare all of them with one tokenizer.")
    if cfg.data.tokenizer:
        path = _given_tokenizer(cfg)
        if file_sha256(path) not in hashes:
            raise DataError(f"data.tokenizer='{path}' is not the tokenizer the data in "
                            f"data.paths was prepared with; use that one or re-prepare.")
        return path
    return Path(next(iter(summaries.values()))["tokenizer"])


def _blend(weighted: list[tuple[float, str]], split: str, seq_len: int):
    datasets = [TokenDataset(prefix, split, seq_len) for _, prefix in weighted]
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, [w for w, _ in weighted])


def build_data(cfg: Config) -> DataBundle:
    """Open the train/val datasets and the tokenizer of cfg; prepares nothing."""
    if cfg.data.paths:
        weighted = parse_data_paths(cfg.data.paths)
        tokenizer_path = _tokenizer_for_paths(cfg, weighted)
    else:
        directory = default_data_dir(cfg)
        prefix = directory / DEFAULT_PREFIX_NAME
        if not output_paths(prefix)["json"].is_file():
            raise DataError(f"the default corpus has not been prepared in {directory}. Run "
                            f"`python tools/prepare_data.py --config CONFIG` (or ./launch.sh, "
                            f"which prepares it) before starting the workers.")
        weighted = [(1.0, str(prefix))]
        tokenizer_path = (_given_tokenizer(cfg) if cfg.data.tokenizer
                          else directory / f"{DEFAULT_TOKENIZER_NAME}.model")
    tokenizer = Tokenizer(tokenizer_path)
    train = _blend(weighted, "train", cfg.train.seq_len)
    val = _blend(weighted, "val", cfg.train.seq_len)
    if train.vocab_size != tokenizer.vocab_size:
        raise DataError(f"the data was prepared with a vocabulary of {train.vocab_size} but the "
                        f"tokenizer {tokenizer_path} has {tokenizer.vocab_size}; re-prepare the "
                        f"data with this tokenizer.")
    return DataBundle(train=train, val=val, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)


def tokenizer_vocab_size(cfg: Config) -> tuple[int, str]:
    """(vocabulary size, where it came from) of the tokenizer `cfg` names, reading no
    data: data.tokenizer's; else the tokenizer data.paths were prepared with; else the
    default corpus's tokenizer, once trained, or data.vocab_size, the size it is trained
    to (a small corpus may give fewer pieces: an upper bound)."""
    if cfg.data.tokenizer:
        path = _given_tokenizer(cfg)
    elif cfg.data.paths:
        path = _tokenizer_for_paths(cfg, parse_data_paths(cfg.data.paths))
    else:
        path = default_data_dir(cfg) / f"{DEFAULT_TOKENIZER_NAME}.model"
        if not path.is_file():
            return cfg.data.vocab_size, (f"data.vocab_size (the default tokenizer, not yet "
                                         f"trained)")
    return Tokenizer(path).vocab_size, f"the tokenizer {path}"


def resolve_with_data(cfg: Config, data: DataBundle, device: str) -> Config:
    """config.resolve with the tokenizer's vocabulary (the workers and the preflight both
    call it, so both see the same sizes); a given model.vocab_size must hold it."""
    resolve(cfg, data.vocab_size, device)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {data.vocab_size}; raise it or leave it 0.")
    return cfg
