"""Export a checkpoint as a Hugging Face model directory (config, weights, tokenizer).

    python tools/export_hf.py RUN_DIR|CHECKPOINT_DIR OUT [--dtype fp32|bf16|fp16] \
        [--tokenizer PATH]

`transformers` then loads OUT with AutoModelForCausalLM / AutoTokenizer.from_pretrained
(llama -> LlamaForCausalLM, gpt2 -> GPT2LMHeadModel). RUN_DIR uses its latest
checkpoint; the weights keep the checkpoint's dtype unless --dtype is given.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.cli import run_main  # noqa: E402
from megalite.hf.export import DTYPES, export_hf  # noqa: E402


def export_main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="run, checkpoints or step directory")
    parser.add_argument("out", type=Path, help="new directory for the Hugging Face model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="convert the weights")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer to use instead of the one index.json records")
    args = parser.parse_args(argv)
    out = export_hf(args.checkpoint, args.out, args.dtype, args.tokenizer)
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(export_main))
