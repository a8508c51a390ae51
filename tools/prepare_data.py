"""Tokenize a corpus into the token files training reads.

    python tools/prepare_data.py data/ --tokenizer prep/tok.model --out prep/mydata
    python tools/prepare_data.py shards/ --text-field content --tokenizer tokenizer.json --out prep/web
    python tools/prepare_data.py data/ --vocab-size 8192 --out prep/mydata
    python tools/prepare_data.py [--config configs/tiny.yaml] [--section.key=value ...]

The first form uses an existing tokenizer; the second also trains one
(OUT.tokenizer.model) on the same inputs; the third, with no inputs, prepares the
embedded default corpus of a config into its cache (what ./launch.sh does first).
Inputs: text files (.txt/.py/.md, one document each) and record shards (.jsonl,
.jsonl.gz, .jsonl.zst, .parquet, one document per record in --text-field), or folders
of them. It streams (memory stays bounded whatever the corpus size), shows a progress
bar and ends with a summary: documents, tokens, MB/s of text and tokens/s. The token
files are the same whatever the input format and the number of workers.
Use the prefix in a config as `data.paths: [OUT]` (or weighted: [0.7, A, 0.3, B]).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.cli import parse_overrides  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.data.build import prepare_default_data  # noqa: E402
from megalite.data.prepare import load_summary, prepare  # noqa: E402
from megalite.data.tokenizer import train_tokenizer  # noqa: E402
from megalite.errors import ConfigError, MegaliteError  # noqa: E402


def _run(args, rest) -> tuple[dict, str]:
    if not args.inputs:
        overrides, flags = parse_overrides(rest)
        if flags:
            raise ConfigError(f"unknown option(s) {', '.join('--' + f for f in flags)}.")
        cfg = load_config(args.config, overrides)
        tokenizer, prefix = prepare_default_data(cfg)
        if prefix is None:
            raise ConfigError("the config sets data.paths, so its data was prepared already; "
                              "pass INPUTS and --out to prepare new data.")
        return load_summary(prefix), str(prefix)
    if rest:
        raise ConfigError(f"unexpected argument(s) {' '.join(rest)}; config overrides "
                          f"(--section.key=value, with '=') only apply when preparing the "
                          f"default corpus, that is without INPUTS.")
    if not args.out:
        raise ConfigError("--out PREFIX is required when INPUTS are given.")
    tokenizer = args.tokenizer
    if not tokenizer:
        tokenizer = train_tokenizer(args.inputs, f"{args.out}.tokenizer", args.vocab_size,
                                    num_threads=max(1, args.workers),
                                    text_field=args.text_field)
        print(f"trained tokenizer {tokenizer}")
    summary = prepare(args.inputs, tokenizer, args.out, val_fraction=args.val_fraction,
                      workers=args.workers, seed=args.seed, text_field=args.text_field,
                      progress=True)
    return summary, args.out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="text files, .jsonl[.gz|.zst] or .parquet "
                                                   "shards, or folders of them")
    parser.add_argument("--text-field", default="text",
                        help="the JSON field or Parquet column that holds each document")
    parser.add_argument("--out", help="output prefix: OUT.{train,val}.bin, OUT.json, ...")
    parser.add_argument("--tokenizer", help="sentencepiece .model (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="vocabulary of the tokenizer trained when --tokenizer is not given")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--config", help="config whose default corpus to prepare (no INPUTS)")
    args, rest = parser.parse_known_args(argv)
    start = time.time()
    try:
        summary, prefix = _run(args, rest)
    except MegaliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    seconds = max(time.time() - start, 1e-9)
    tokens = summary["train_tokens"] + summary["val_tokens"]
    print(f"prepared {prefix}: {summary['documents']} documents "
          f"({summary['train_documents']} train, {summary['val_documents']} val), "
          f"{tokens} tokens ({summary['train_tokens']} train, {summary['val_tokens']} val), "
          f"vocab {summary['vocab_size']} ({summary['dtype']})\n"
          f"skipped non-UTF-8 files: {summary['skipped_files']}\n"
          f"time: {seconds:.1f} s, {summary.get('text_bytes', 0) / 2**20 / seconds:.2f} MB/s "
          f"of text, {tokens / seconds:,.0f} tokens/s with {args.workers} worker(s)")
    for path in summary["skipped"][:10]:
        print(f"  skipped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
