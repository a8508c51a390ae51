"""Sample text from a checkpoint, to see what a model learned.

    python tools/generate.py RUN_DIR|CHECKPOINT_DIR --prompt "def main(" \
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 20] [--greedy] [--seed 0]

RUN_DIR uses its latest checkpoint; the model config and tokenizer come from the
checkpoint's index.json.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.checkpoint import format as ckpt  # noqa: E402
from megalite.cli import run_main  # noqa: E402
from megalite.config import config_from_dict  # noqa: E402
from megalite.data.tokenizer import Tokenizer  # noqa: E402
from megalite.model.transformer import Transformer  # noqa: E402
from megalite.model.sampling import generate  # noqa: E402


def generate_main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = ckpt.find_checkpoint(args.path)
    index = ckpt.read_index(path)
    cfg = config_from_dict(index["config"])
    model = Transformer(cfg.model)
    ckpt.load_model_weights(model, path, index)
    tokenizer = Tokenizer(index["tokenizer"])
    ids = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, greedy=args.greedy,
                   seed=args.seed, eos_id=tokenizer.eos_id)
    print(args.prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(generate_main))
