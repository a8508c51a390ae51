"""Which samples each data-parallel rank reads at each step: deterministic and resumable.

The sampler walks one global stream: epoch e is a permutation of all sample indices
drawn from a generator seeded by (seed, e), and epochs follow each other without gaps.
A global batch is the next `global_batch_size` positions of that stream; a batch
that runs past the end of an epoch continues into the next one, so every batch is
full and no sample is dropped. Data-parallel rank r takes the contiguous slice
[r * per_rank, (r + 1) * per_rank) of the global batch, so the union over ranks is the
same batch for any dp size. The whole state is the number of samples consumed, which
makes resuming exact, also in another data-parallel layout. `validation_count` sizes the
fixed slice of the validation split that each validation shares out over the dp ranks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from megalite.errors import ConfigError, DataError


def validation_count(num_samples: int, eval_batches: int, micro_batch_size: int,
                     dp_size: int) -> int:
    """How many validation samples one validation reads: at most `eval_batches`
    micro-batches per dp rank, a multiple of dp_size (equal shares, so the mean over
    ranks is the mean over samples)."""
    count = min(num_samples, eval_batches * micro_batch_size * dp_size)
    count -= count % dp_size
    if count == 0:
        raise ConfigError(f"the validation split has {num_samples} samples, fewer "
                          f"than dp={dp_size}; lower train.seq_len or raise data.val_fraction.")
    return count


class BatchSampler:
    """Yields this dp rank's sample indices of each successive global batch."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0):
        if num_samples < 1:
            raise DataError("the dataset has no samples; prepare more data or lower seq_len.")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ConfigError(f"global batch size {global_batch_size} must be a positive "
                              f"multiple of the data-parallel size {dp_size}.")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.consumed_samples = consumed_samples
        self._cached_epoch, self._cached_order = -1, None

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    @property
    def epochs_consumed(self) -> float:
        """The fraction of the training samples consumed so far (1.0: one epoch)."""
        return self.consumed_samples / self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_epoch, self._cached_order = epoch, rng.permutation(self.num_samples)
        return self._cached_order

    def _positions(self, start: int, count: int) -> list[int]:
        """Sample indices at stream positions [start, start + count)."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.num_samples)
            take = min(count, self.num_samples - offset)
            out += self._order(epoch)[offset:offset + take].tolist()
            start, count = start + take, count - take
        return out

    def peek_indices(self) -> list[int]:
        """This rank's share of the next global batch, leaving the state as it is."""
        return self._positions(self.consumed_samples + self.dp_rank * self.per_rank,
                               self.per_rank)

    def next_indices(self) -> list[int]:
        """This rank's share of the next global batch; advances the state by one batch."""
        indices = self.peek_indices()
        self.consumed_samples += self.global_batch_size
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        num_samples = state.get("num_samples", self.num_samples)
        if num_samples != self.num_samples:
            raise DataError(f"the checkpoint's data sampler walked {num_samples} samples per "
                            f"epoch, this dataset has {self.num_samples}: the data or seq_len "
                            f"changed, so the run cannot resume on the same samples. Resume "
                            f"with the data and seq_len it was trained with.")
        self.consumed_samples = int(state["consumed_samples"])
