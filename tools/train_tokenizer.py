"""Train a lossless sentencepiece BPE tokenizer on text files, directories or .jsonl.

    python tools/train_tokenizer.py data/*.jsonl --out prep/tok --vocab-size 8192

writes prep/tok.model. See megalite/data/tokenizer.py for the settings and why.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.data.corpus import CorpusStats  # noqa: E402
from megalite.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from megalite.errors import MegaliteError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help=".txt/.py/.md/.jsonl files or directories")
    parser.add_argument("--out", required=True, help="model prefix: writes OUT.model")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-mb", type=float, default=32.0,
                        help="train on at most this much text (in input order)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.out[:-len(".model")] if args.out.endswith(".model") else args.out
    start, stats = time.time(), CorpusStats()
    try:
        path = train_tokenizer(args.inputs, out, args.vocab_size,
                               max_train_bytes=int(args.max_mb * 2**20),
                               num_threads=args.threads, stats=stats)
        tokenizer = Tokenizer(path)
    except MegaliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    # Training stops reading at the size cap, so `documents` counts what it read.
    print(f"tokenizer: {path}\nvocab size: {tokenizer.vocab_size}\n"
          f"documents read: {stats.documents}\nskipped non-UTF-8 files: {stats.skipped}\n"
          f"time: {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
