"""Data: tokenizer, corpus reading, preparation into token files, datasets, sampler.

The pipeline is: documents (corpus.py) -> sentencepiece ids (tokenizer.py) -> token
files on disk (prepare.py) -> memory-mapped, packed samples (dataset.py) -> the
indices each data-parallel rank reads per step (sampler.py). build.py wires these to
a Config. Only numpy and sentencepiece are needed here, not torch. The prepare()
function is not re-exported: its name would hide the megalite.data.prepare module.
"""

from megalite.data.build import DataBundle, build_data, parse_data_paths, prepare_default_data
from megalite.data.dataset import BlendedDataset, TokenDataset
from megalite.data.sampler import BatchSampler
from megalite.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["BatchSampler", "BlendedDataset", "DataBundle", "TokenDataset", "Tokenizer",
           "build_data", "parse_data_paths", "prepare_default_data", "train_tokenizer"]
