"""Datasets over prepared token files: GPT-style packed samples and weighted blends.

`TokenDataset` memory-maps one split of a prepared prefix and cuts its token stream
into fixed windows of seq_len + 1 tokens (inputs and shifted targets), ignoring
document boundaries as GPT pretraining does: sample i starts at token i * seq_len, so
consecutive samples share one token and the stream is used without gaps.
`BlendedDataset` mixes several of them by weight, the way Megatron's weighted
data-path lists do. Both are plain index -> array maps; shuffling and sharding across
data-parallel ranks are the sampler's job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from megalite.data.prepare import SPLITS, load_summary, output_paths
from megalite.errors import DataError


class TokenDataset:
    """Samples of seq_len + 1 tokens from `{prefix}.{split}.bin`, as int64 arrays."""

    def __init__(self, prefix: str | Path, split: str, seq_len: int):
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}.")
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be at least 1.")
        self.prefix, self.split, self.seq_len = str(prefix), split, seq_len
        self.meta = load_summary(prefix)
        path = output_paths(prefix)[f"{split}.bin"]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        expected = self.meta[f"{split}_tokens"] * dtype.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise DataError(f"{path} {found}, but {output_paths(prefix)['json']} records "
                            f"{expected} bytes: the preparation was interrupted or its files "
                            f"were mixed. Re-run tools/prepare_data.py for '{prefix}'.")
        self.num_tokens = self.meta[f"{split}_tokens"]
        self.vocab_size = self.meta["vocab_size"]
        self.eos_id = self.meta["eos_id"]
        self._num_samples = (self.num_tokens - 1) // seq_len
        if self._num_samples < 1:
            raise DataError(f"the {split} split of '{prefix}' has {self.num_tokens} tokens, fewer "
                            f"than one sample of seq_len + 1 = {seq_len + 1}. Prepare more text, "
                            f"raise val_fraction (for val) or lower train.seq_len.")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self._num_samples:
            raise IndexError(f"sample {index} out of range for {self._num_samples} samples "
                             f"of {self.prefix}.{self.split}")
        start = index * self.seq_len
        return np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"TokenDataset({self.prefix!r}, {self.split!r}, seq_len={self.seq_len}, "
                f"samples={len(self)}, tokens={self.num_tokens})")


def blend_assignment(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample number within that dataset) for each blended sample.

    Megatron's greedy rule: sample n goes to the dataset furthest behind its target,
    argmax_d (weight_d * (n + 1) - taken_d), ties to the lower index. Each dataset's
    count then stays within one sample of weight * n at every prefix. O(n * datasets)
    once, in plain Python because each choice depends on the previous ones.
    """
    weights = [float(w) for w in weights]
    taken = [0] * len(weights)
    dataset_ids = np.empty(num_samples, dtype=np.int64)
    sample_ids = np.empty(num_samples, dtype=np.int64)
    ids = range(len(weights))
    for n in range(num_samples):
        best = max(ids, key=lambda d: weights[d] * (n + 1) - taken[d])
        dataset_ids[n] = best
        sample_ids[n] = taken[best]
        taken[best] += 1
    return dataset_ids, sample_ids


class BlendedDataset:
    """Several datasets mixed by weight; as long as their lengths together.

    A dataset whose weight asks for more samples than it holds cycles through its
    samples again (in order; the sampler shuffles).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float]):
        if not datasets or len(datasets) != len(weights):
            raise DataError(f"blending needs one weight per dataset, got {len(datasets)} "
                            f"datasets and {len(weights)} weights.")
        if any(not w > 0 for w in weights):
            raise DataError(f"blend weights must be positive, got {list(weights)}.")
        vocab_sizes = {d.vocab_size for d in datasets}
        if len(vocab_sizes) > 1:
            raise DataError(f"blended datasets were tokenized with different vocabularies "
                            f"{sorted(vocab_sizes)}; prepare all of them with one tokenizer.")
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.weights = [w / total for w in weights]
        self.vocab_size = vocab_sizes.pop()
        self.num_tokens = sum(d.num_tokens for d in datasets)
        self.dataset_ids, self.sample_ids = blend_assignment(
            self.weights, sum(len(d) for d in datasets))

    def __len__(self) -> int:
        return len(self.dataset_ids)

    def __getitem__(self, index: int) -> np.ndarray:
        dataset = self.datasets[self.dataset_ids[index]]
        return dataset[self.sample_ids[index] % len(dataset)]

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3g}*{d!r}" for w, d in zip(self.weights, self.datasets))
        return f"BlendedDataset({parts})"
