"""Import a Hugging Face Llama or GPT-2 model directory as a megalite checkpoint.

    python tools/import_hf.py HF_DIR OUT [--tokenizer PATH] [--weights-only]

HF_DIR holds config.json, model.safetensors (or a sharded index) and the tokenizer.
OUT gets step_0000000/, latest, tokenizer/ and config.yaml; continue pretraining with

    python tools/prepare_data.py DATA --tokenizer OUT/tokenizer/tokenizer.json --out prep/d
    ./launch.sh OUT/config.yaml --data.paths=[prep/d] --resume_from_checkpoint OUT
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.cli import run_main  # noqa: E402
from megalite.hf.importer import import_hf  # noqa: E402


def import_main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="Hugging Face model directory")
    parser.add_argument("out", type=Path, help="new directory for the megalite checkpoint")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.json, sentencepiece .model or directory to use instead "
                             "of HF_DIR's own")
    parser.add_argument("--weights-only", action="store_true",
                        help="write no optimizer/trainer state (a smaller checkpoint that "
                             "export and generate read, but --resume_from_checkpoint does not)")
    args = parser.parse_args(argv)
    step_dir = import_hf(args.hf_dir, args.out, args.tokenizer, args.weights_only)
    print(f"imported {args.hf_dir} to {step_dir}\nconfig: {args.out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(import_main))
