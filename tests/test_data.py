"""Tests of the data pipeline: tokenizer, corpus, preparation, datasets, sampler, build."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalite.config import Config
from megalite.data import build as build_module
from megalite.data import prepare as prepare_module
from megalite.data.build import build_data, parse_data_paths, prepare_default_data
from megalite.data.corpus import (STDLIB_EXCLUDED_DIRS, CorpusStats, iter_documents,
                                  stdlib_files, stdlib_root)
from megalite.data.dataset import BlendedDataset, TokenDataset, blend_assignment
from megalite.data.prepare import output_paths, prepare
from megalite.data.sampler import BatchSampler
from megalite.data.tokenizer import Tokenizer, train_tokenizer
from megalite.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent
VOCAB = 400


@pytest.fixture(scope="module")
def corpus_files():
    return stdlib_files(200_000)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus_files):
    path = train_tokenizer(corpus_files, tmp_path_factory.mktemp("tok") / "tok", VOCAB)
    return Tokenizer(path)


def write_corpus(root: Path) -> list[str]:
    """A small corpus of every input kind; returns the documents it should yield, in order."""
    docs = {
        "a.txt": "first document\n\twith a tab\n",
        "b.md": "# title\n\n  indented  text   \r\nend",
        "sub/c.py": "def f(x):\n    return x * 2  # é 世界\n",
    }
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, newline="")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "notes.bin").write_bytes(b"\x00\x01ignored: not a text suffix")
    (root / "e.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')  # not UTF-8: skipped whole
    # A raw U+2028 inside a JSON string is not a line break.
    lines = [{"text": "jsonl one\n"}, {"text": "jsonl\u2028two", "id": 7}]
    jsonl = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\r\n\n"
    (root / "d.jsonl").write_text(jsonl, newline="")
    return [docs["a.txt"], docs["b.md"], lines[0]["text"], lines[1]["text"], docs["sub/c.py"]]


@pytest.fixture()
def prepared(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = write_corpus(corpus)
    summary = prepare([corpus], tokenizer.path, tmp_path / "out" / "data", val_fraction=0.3,
                      workers=1, seed=3)
    return tmp_path / "out" / "data", summary, docs


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_stdlib_files(tokenizer, corpus_files):
    unseen = stdlib_files(3_000_000)[-4:]
    for path in corpus_files + unseen:
        text = path.read_text()
        assert tokenizer.decode(tokenizer.encode(text)) == text, path


@pytest.mark.parametrize("text", [
    "", " ", "\n", "\n\n\n", "a\nb", "\ttab\t\t", "    leading", "trailing   ", "x\r\ny\r\n",
    "héllo wörld 世界 🎉 ∑", "  two\n\n    blank lines  \n\t\n", "</s> <s> <unk> literal",
    "a\u00a0b\u200bc", "ﬁ ① Ｆｕｌｌ", "0123456789 1e-5"])
def test_tokenizer_round_trips_tricky_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_id not in ids  # literal "</s>" is text, never the control token


def test_tokenizer_properties_and_errors(tokenizer, tmp_path):
    assert tokenizer.vocab_size == VOCAB
    assert 0 <= tokenizer.eos_id < VOCAB and tokenizer.eos_id != tokenizer.bos_id
    assert tokenizer.decode(np.array(tokenizer.encode("np ids"), dtype=np.int64)) == "np ids"
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_train_tokenizer_is_deterministic_and_atomic(tmp_path, corpus_files):
    a = train_tokenizer(corpus_files[:3], tmp_path / "a", 400, max_train_bytes=50_000)
    b = train_tokenizer(corpus_files[:3], tmp_path / "b", 400, max_train_bytes=50_000)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(corpus_files[:1], tmp_path / "c", 100)
    with pytest.raises(DataError, match="raise vocab_size"):
        train_tokenizer(corpus_files, tmp_path / "c", 270)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text"):
        train_tokenizer([tmp_path / "empty"], tmp_path / "c", 400)


# ---------------------------------------------------------------- corpus

def test_stdlib_files_are_sorted_capped_and_exclude_tests():
    root = stdlib_root()
    files = stdlib_files(1_000_000)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and files == stdlib_files(1_000_000)
    assert sum(p.stat().st_size for p in files) <= 1_000_000
    assert all(not STDLIB_EXCLUDED_DIRS & set(Path(r).parts[:-1]) for r in rel)
    everything = stdlib_files(10**12)
    assert not any("/test/" in f"/{p.relative_to(root).as_posix()}" for p in everything)
    assert everything[:len(files)] == files and len(everything) > len(files)
    assert len(stdlib_files(1)) == 1


def test_iter_documents_reads_every_kind_and_skips_non_utf8(tmp_path):
    expected = write_corpus(tmp_path)
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path], stats))
    assert [text for _, text in docs] == expected
    jsonl = tmp_path / "d.jsonl"
    assert [name for name, _ in docs[2:4]] == [f"{jsonl}:1", f"{jsonl}:2"]
    assert stats.skipped_files == [str(tmp_path / "e.jsonl"), str(tmp_path / "latin1.txt")]
    assert stats.documents == 5
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents([tmp_path / "nope"]))


@pytest.mark.parametrize("bad", ["not json", '{"txt": "x"}', "[1, 2]", '{"text": 5}'])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + bad + "\n")
    with pytest.raises(DataError, match=f"{path}:2"):
        list(iter_documents([path]))
    with pytest.raises(DataError, match=f"{path}:2"):  # not hidden inside sentencepiece
        train_tokenizer([path], tmp_path / "tok", 400)


# ---------------------------------------------------------------- prepare

def split_documents(tokenizer, tokens: np.ndarray, starts: np.ndarray) -> list[str]:
    ends = list(starts[1:]) + [len(tokens)]
    assert all(tokens[e - 1] == tokenizer.eos_id for e in ends)
    return [tokenizer.decode(tokens[s:e - 1]) for s, e in zip(starts, ends)]


def test_prepare_writes_complete_outputs(prepared, tokenizer):
    prefix, summary, docs = prepared
    paths = output_paths(prefix)
    assert json.loads(paths["json"].read_text()) == summary
    assert summary["documents"] == 5 and summary["skipped_files"] == 2
    assert summary["train_documents"] >= 1 and summary["val_documents"] >= 1
    assert summary["dtype"] == "uint16" and summary["vocab_size"] == VOCAB
    assert not list(prefix.parent.glob("*.tmp"))
    json_time = paths["json"].stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= json_time for p in paths.values())
    texts = []
    for split in ("train", "val"):
        tokens = np.fromfile(paths[f"{split}.bin"], dtype="<u2")
        starts = np.load(paths[f"{split}.idx"], allow_pickle=False)
        assert starts.dtype == np.int64 and len(tokens) == summary[f"{split}_tokens"]
        split_texts = split_documents(tokenizer, tokens, starts)
        order = [docs.index(t) for t in split_texts]
        assert order == sorted(order)  # each split keeps the input order
        texts += split_texts
    assert sorted(texts) == sorted(docs)


def test_prepare_is_deterministic_across_workers(prepared, tokenizer, tmp_path):
    prefix, summary, _ = prepared
    again = prepare([tmp_path / "corpus"], tokenizer.path, tmp_path / "w2", val_fraction=0.3,
                    workers=2, seed=3)
    for key in ("train.bin", "val.bin", "train.idx", "val.idx"):
        assert (output_paths(prefix)[key].read_bytes()
                == output_paths(tmp_path / "w2")[key].read_bytes())
    assert again["train_tokens"] == summary["train_tokens"]


def test_prepare_rejects_empty_and_single_document_corpora(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="0 document"):
        prepare([tmp_path / "empty"], tokenizer.path, tmp_path / "out1", workers=1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(DataError, match="1 non-UTF-8"):
        prepare([tmp_path / "bad"], tokenizer.path, tmp_path / "out2", workers=1)
    (tmp_path / "one.txt").write_text("only one")
    with pytest.raises(DataError, match="at least 2"):
        prepare([tmp_path / "one.txt"], tokenizer.path, tmp_path / "out3", workers=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_interrupted_prepare_leaves_nothing_that_looks_complete(prepared, tokenizer, monkeypatch):
    prefix, _, _ = prepared
    calls = []

    def encode_then_die(text):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(text)

    real_encode = prepare_module._encode
    monkeypatch.setattr(prepare_module, "_encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([prefix.parent.parent / "corpus"], tokenizer.path, prefix, workers=1)
    assert not output_paths(prefix)["json"].exists()  # the old marker went first
    assert not list(prefix.parent.glob("*.tmp"))
    with pytest.raises(DataError, match="prepare_data.py"):
        TokenDataset(prefix, "train", 4)
    # A stray temporary file from a killed run is not taken for the real thing.
    stray = prefix.parent / "other.train.bin.123.tmp"
    stray.write_bytes(b"\x01\x00" * 100)
    with pytest.raises(DataError, match="missing or incomplete"):
        TokenDataset(prefix.parent / "other", "train", 4)


# ---------------------------------------------------------------- datasets

def test_token_dataset_packs_the_stream(prepared):
    prefix, summary, _ = prepared
    raw = np.fromfile(output_paths(prefix)["train.bin"], dtype="<u2")
    ds = TokenDataset(prefix, "train", 8)
    assert len(ds) == (len(raw) - 1) // 8 and ds.num_tokens == len(raw) and ds.vocab_size == VOCAB
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (9,)
        assert np.array_equal(sample, raw[i * 8:i * 8 + 9])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(DataError, match="fewer than one sample"):
        TokenDataset(prefix, "train", len(raw))
    with open(output_paths(prefix)["train.bin"], "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="records"):
        TokenDataset(prefix, "train", 8)


def test_blend_assignment_tracks_weights_at_every_prefix():
    weights = [0.5, 0.3, 0.2]
    dataset_ids, sample_ids = blend_assignment(weights, 2000)
    n = np.arange(1, 2001)
    for d, w in enumerate(weights):
        taken = np.cumsum(dataset_ids == d)
        assert np.abs(taken - w * n).max() <= 1.0
        assert np.array_equal(sample_ids[dataset_ids == d], np.arange(taken[-1]))


def test_blended_dataset_mixes_and_cycles(prepared):
    prefix, _, _ = prepared
    a, b = TokenDataset(prefix, "train", 4), TokenDataset(prefix, "val", 4)
    blend = BlendedDataset([a, b], [3, 1])
    assert len(blend) == len(a) + len(b) and blend.weights == [0.75, 0.25]
    assert abs(np.sum(blend.dataset_ids == 1) - 0.25 * len(blend)) <= 1
    assert blend.sample_ids[blend.dataset_ids == 0].max() >= len(a)  # a is too short: it cycles
    for i in range(len(blend)):
        source = (a, b)[blend.dataset_ids[i]]
        assert np.array_equal(blend[i], source[blend.sample_ids[i] % len(source)])
    with pytest.raises(DataError, match="positive"):
        BlendedDataset([a, b], [1, 0])


# ---------------------------------------------------------------- sampler

def take(sampler, steps):
    return [sampler.next_indices() for _ in range(steps)]


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    batches = take(BatchSampler(12, 4, seed=5), 6)
    assert batches == take(BatchSampler(12, 4, seed=5), 6)
    assert batches != take(BatchSampler(12, 4, seed=6), 6)
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(12)) and first != second


def test_sampler_wraps_into_next_epoch_without_dropping():
    sampler = BatchSampler(10, 4, seed=0)
    stream = sum(take(sampler, 5), [])
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert sampler.state_dict() == {"consumed_samples": 20, "epoch": 2, "num_samples": 10}


def test_sampler_resumes_exactly():
    full = take(BatchSampler(50, 8, seed=1), 20)
    first = BatchSampler(50, 8, seed=1)
    take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchSampler(50, 8, seed=1)
    resumed.load_state_dict(state)
    assert take(resumed, 13) == full[7:]
    assert take(BatchSampler(50, 8, seed=1, consumed_samples=56), 13) == full[7:]
    with pytest.raises(DataError, match="changed"):
        BatchSampler(49, 8, seed=1).load_state_dict(state)


@pytest.mark.parametrize("dp_size", [2, 4, 8])
def test_sampler_dp_slices_union_to_the_dp1_batch(dp_size):
    reference = take(BatchSampler(37, 8, seed=2), 12)
    ranks = [take(BatchSampler(37, 8, seed=2, dp_rank=r, dp_size=dp_size), 12)
             for r in range(dp_size)]
    for step, batch in enumerate(reference):
        assert sum((ranks[r][step] for r in range(dp_size)), []) == batch
    with pytest.raises(ConfigError):
        BatchSampler(37, 8, seed=2, dp_size=3)


# ---------------------------------------------------------------- build

def test_parse_data_paths():
    assert parse_data_paths(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_data_paths([3, "a", 1, "b"]) == [(3.0, "a"), (1.0, "b")]
    assert parse_data_paths(["a", "b"]) == [(0.5, "a"), (0.5, "b")]
    malformed = (["0.7", "a", "0.3"], ["a", "0.3"], ["0.5", "0.5"], ["0", "a"], ["1", "a", "b"])
    for bad in malformed:
        with pytest.raises(ConfigError, match="data.paths"):
            parse_data_paths(bad)


def small_config(tmp_path) -> Config:
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.corpus_max_mb = 0.1
    cfg.data.vocab_size = 400
    cfg.data.workers = 1
    cfg.train.seq_len = 32
    return cfg


def test_build_default_data_is_cached(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    with pytest.raises(DataError, match="not been prepared"):
        build_data(cfg)
    tokenizer_path, prefix = prepare_default_data(cfg)
    outputs = [tokenizer_path] + list(output_paths(prefix).values())
    mtimes = [p.stat().st_mtime_ns for p in outputs]

    def fail(*args, **kwargs):
        raise AssertionError("the cached data was prepared again")

    monkeypatch.setattr(build_module, "prepare", fail)
    monkeypatch.setattr(build_module, "train_tokenizer", fail)
    assert prepare_default_data(cfg) == (tokenizer_path, prefix)
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    bundle = build_data(cfg)
    assert bundle.vocab_size == bundle.tokenizer.vocab_size == bundle.train.vocab_size == 400
    assert len(bundle.train) > len(bundle.val) >= 1 and bundle.train[0].shape == (33,)
    cfg.data.vocab_size = 420  # another vocabulary is another cache entry
    with pytest.raises(DataError, match="not been prepared"):
        build_data(cfg)
    cfg.data.tokenizer = str(tmp_path / "missing.model")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_data(cfg)


def test_build_blends_weighted_paths(prepared, tokenizer, tmp_path):
    prefix, _, _ = prepared
    cfg = Config()
    cfg.train.seq_len = 4
    cfg.data.paths = ["0.7", str(prefix), "0.3", str(prefix)]
    bundle = build_data(cfg)
    assert isinstance(bundle.train, BlendedDataset) and isinstance(bundle.val, BlendedDataset)
    assert bundle.tokenizer.path.resolve() == tokenizer.path.resolve()
    assert prepare_default_data(cfg) == (bundle.tokenizer.path, None)
    cfg.data.paths = [str(prefix)]
    assert isinstance(build_data(cfg).train, TokenDataset)
    cfg.data.paths = [str(tmp_path / "missing")]
    with pytest.raises(DataError, match="prepare_data.py"):
        build_data(cfg)


# ---------------------------------------------------------------- command-line tools

def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus)
    tool = load_tool("prepare_data")
    assert tool.main([str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "p"),
                      "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "5 documents" in out and "skipped non-UTF-8 files: 2" in out
    assert Tokenizer(tmp_path / "p.tokenizer.model").vocab_size == 400
    assert tool.main([str(tmp_path / "nope"), "--out", str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err.startswith("error: input")


def test_cli_errors_have_no_traceback(tmp_path):
    for tool in ("prepare_data", "train_tokenizer"):
        result = subprocess.run(
            [sys.executable, f"tools/{tool}.py", str(tmp_path / "nope"), "--out", "x"],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        assert result.returncode == 2 and result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr
