"""Corpora as people ship them (megalite/data/records.py): the same documents as .jsonl,
.jsonl.gz, .jsonl.zst and .parquet, or a folder of such shards, give byte-identical
token files with 1 and 2 workers; a damaged shard is an error naming it and nothing
half-written is left; a corpus prepares in memory that does not grow with its size.
"""

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megalite.data.prepare import output_paths, prepare
from megalite.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["def main():\n    return 42\n", "Ünïcödé text, \u4e2d\u6587, \U0001f600 and tabs\t",
        "", "a line with a U+2028\u2028inside", "short", "x" * 5000,
        *[f"document {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(40)]]


@pytest.fixture(scope="module")
def tokenizer(launch_cache):
    return next(Path(launch_cache).glob("*/tokenizer.model"))


def write_shards(folder: Path, docs, field="text") -> dict[str, Path]:
    """The documents in each format (the JSON lines formats split over two shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)]
    half = len(lines) // 2
    out = {"jsonl": folder / "all.jsonl"}
    out["jsonl"].write_text("".join(lines))
    with gzip.open(folder / "all.jsonl.gz", "wt") as f:
        f.write("".join(lines))
    out["jsonl.gz"] = folder / "all.jsonl.gz"
    out["jsonl.zst"] = folder / "all.jsonl.zst"
    out["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
    out["parquet"] = folder / "all.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), out["parquet"],
                   row_group_size=7)
    shards = folder / "shards"
    shards.mkdir()
    (shards / "part-000.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(lines[:half]).encode()))
    pq.write_table(pa.table({field: docs[half:]}), shards / "part-001.parquet")
    out["folder"] = shards
    return out


def token_files(prefix: Path) -> dict[str, bytes]:
    return {key: path.read_bytes() for key, path in output_paths(prefix).items()
            if key != "json"}


def test_every_format_gives_the_same_token_files(tokenizer, tmp_path):
    shards = write_shards(tmp_path / "in", DOCS)
    results = {}
    for kind, path in shards.items():
        for workers in (1, 2):
            prefix = tmp_path / f"{kind}-{workers}" / "out"
            summary = prepare([path], tokenizer, prefix, val_fraction=0.2, workers=workers)
            assert summary["documents"] == len(DOCS) - 1  # the empty one carries no tokens
            results[kind, workers] = token_files(prefix)
    first = results["jsonl", 1]
    assert all(files == first for files in results.values()), [
        key for key, files in results.items() if files != first]


def test_the_text_field_is_chosen(tokenizer, tmp_path):
    shards = write_shards(tmp_path / "in", DOCS[:10], field="content")
    with pytest.raises(DataError, match="no column 'text'.*--text-field"):
        prepare([shards["parquet"]], tokenizer, tmp_path / "a", val_fraction=0.2, workers=1)
    with pytest.raises(DataError, match="all.jsonl.zst:1: .*no string field 'text'"):
        prepare([shards["jsonl.zst"]], tokenizer, tmp_path / "a", val_fraction=0.2, workers=1)
    a = prepare([shards["parquet"]], tokenizer, tmp_path / "a", val_fraction=0.2, workers=1,
                text_field="content")
    assert a["documents"] == 9 and a["text_field"] == "content"


@pytest.mark.parametrize("kind, names", [
    ("parquet", r"all.parquet' is not a readable Parquet file"),
    ("jsonl.zst", r"all.jsonl.zst: the .jsonl.zst stream is damaged after line \d+"),
    ("jsonl.gz", r"all.jsonl.gz: the .jsonl.gz stream is damaged after line \d+")])
def test_a_truncated_shard_names_itself_and_leaves_nothing(kind, names, tokenizer, tmp_path):
    path = write_shards(tmp_path / "in", DOCS * 20)[kind]
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    prefix = tmp_path / "out" / "data"
    with pytest.raises(DataError, match=names):
        prepare([path], tokenizer, prefix, val_fraction=0.2, workers=1)
    assert list((tmp_path / "out").iterdir()) == []  # no token file, no temporary


def test_a_missing_extra_says_what_to_install(tokenizer, tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "in", DOCS[:4])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match="needs pyarrow.*pip install pyarrow"):
        prepare([shards["parquet"]], tokenizer, tmp_path / "a", workers=1)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DataError, match="needs zstandard.*pip install zstandard"):
        prepare([shards["jsonl.zst"]], tokenizer, tmp_path / "a", workers=1)


def _generated_corpus(path: Path, megabytes: int) -> None:
    words = [f"w{i}" for i in range(3000)] + ["the", "of", "and", "def", "return"]
    rng = random.Random(0)
    with open(path, "w") as f:
        written = 0
        while written < megabytes << 20:
            line = json.dumps({"text": " ".join(rng.choices(words, k=400))}) + "\n"
            f.write(line)
            written += len(line)


def _peak_rss_mb(argv) -> float:
    """Peak resident memory (MB) of a command, measured by a parent that runs nothing else."""
    probe = ("import resource, subprocess, sys\n"
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "assert done.returncode == 0, done.stdout + done.stderr\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def test_a_50mb_corpus_prepares_in_memory_that_does_not_grow_with_it(tokenizer, tmp_path):
    """tools/prepare_data.py, one worker (the main process does everything), on corpora of
    5 and 50 MB: the peak resident memory differs by less than 20 MB, 45% of the 45 MB
    more text. What does grow is 8 bytes of offsets per document (0.2 MB here)."""
    peaks = {}
    for megabytes in (5, 50):
        corpus = tmp_path / f"corpus{megabytes}.jsonl"
        _generated_corpus(corpus, megabytes)
        peaks[megabytes] = _peak_rss_mb([
            sys.executable, "tools/prepare_data.py", str(corpus), "--tokenizer", str(tokenizer),
            "--out", str(tmp_path / f"out{megabytes}" / "data"), "--workers", "1"])
    assert peaks[50] - peaks[5] < 20, peaks
