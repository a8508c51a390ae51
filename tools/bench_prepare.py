"""Data-preparation throughput: MB/s of text and tokens/s, by number of workers.

    python tools/bench_prepare.py [--mb 1024] [--workers 1,2] [--format jsonl] [--record]

Generates a corpus of about --mb MB (JSON lines of 400 words drawn from a fixed 3,000-word
list: 8,192 such documents repeated in a seeded order, the same corpus on every machine) in a temporary folder, trains a 4,096
piece tokenizer on its first 32 MB, then runs tools/prepare_data.py on it with each
worker count, as users run it, and prints a table: seconds, MB/s of text, tokens/s and
the peak resident memory of the main process (which reads, splits and writes; the
workers only encode). --format jsonl.zst or parquet writes the corpus in that format.
--record writes the table to BENCHMARKS.md.
"""

import argparse
import json
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

WORDS = [f"w{i}" for i in range(3000)] + ["the", "of", "and", "def", "return"]


POOL_DOCUMENTS = 8192  # distinct documents, repeated in a seeded order up to the size


def generate(path: Path, megabytes: float, kind: str) -> int:
    """Write the corpus; returns its text bytes."""
    rng = random.Random(0)
    pool = [" ".join(rng.choices(WORDS, k=400)) for _ in range(POOL_DOCUMENTS)]
    texts, total = [], 0
    while total < megabytes * 2 ** 20:
        texts.append(pool[rng.randrange(POOL_DOCUMENTS)])
        total += len(texts[-1])
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), path)
        return total
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    if kind == "jsonl.zst":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return total


def run(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    probe = ("import resource, subprocess, sys\n"
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "assert done.returncode == 0, done.stdout + done.stderr\n"
             "print(done.stdout)\n"
             "print('peak_mb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "tools/prepare_data.py",
                           str(corpus), "--tokenizer", str(tokenizer), "--out", str(out),
                           "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr)
    summary = json.loads(Path(f"{out}.json").read_text())
    tokens = summary["train_tokens"] + summary["val_tokens"]
    peak = float(re.search(r"peak_mb ([\d.]+)", done.stdout)[1])
    return {"workers": workers, "seconds": seconds, "mb_s": summary["text_bytes"] / 2**20 / seconds,
            "tokens_s": tokens / seconds, "tokens": tokens, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "jsonl.zst", "parquet"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from megalite.data.tokenizer import train_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / f"corpus.{args.format}"
        text_bytes = generate(corpus, args.mb, args.format)
        sample = tmp / "sample.jsonl"
        generate(sample, min(32, args.mb), "jsonl")
        tokenizer = train_tokenizer([sample], tmp / "tok", 4096)
        rows = [run(corpus, tokenizer, tmp / f"out{w}" / "data", int(w))
                for w in args.workers.split(",")]
    lines = [f"| workers | seconds | MB/s of text | tokens/s | peak RSS, main process |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['seconds']:.1f} | {r['mb_s']:.2f} | {r['tokens_s']:,.0f} | "
              f"{r['peak_mb']:.0f} MB |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.record:
        from tools.benchmarks import record_section
        cpu = platform.processor() or platform.machine()
        record_section(
            f"## Data preparation (tools/bench_prepare.py)\n\n"
            f"`python tools/bench_prepare.py --mb {args.mb:g} --format {args.format} --record`, "
            f"{time.strftime('%Y-%m-%d')}, {cpu}, {len(__import__('os').sched_getaffinity(0))} "
            f"cores: a generated corpus of {text_bytes / 2**20:,.0f} MB of text "
            f"({rows[0]['tokens']:,} tokens with a 4,096-piece sentencepiece BPE), through "
            f"tools/prepare_data.py. The main process streams the input, splits and writes; "
            f"the workers encode.\n\n{table}\n")


if __name__ == "__main__":
    main()
