"""Token batches on their way to the device: pinned, copied without blocking, one step ahead.

A step's rows are read from the memory-mapped dataset into one host tensor and copied
to the device in one go. On CUDA the host tensor is pinned and the copy is
non-blocking, so neither the read nor the copy waits for the GPU; and the trainer
stages the next step's rows (`stage_next`) right after it has launched the current
step's optimizer update, so they travel while the GPU is still busy. Staging peeks at
the sampler without advancing it, so the sampler's state (what a checkpoint saves) is
always "batches trained on"; a staged batch is used only if the sampler is still where
it was (a resume or a validation changes nothing here, but a loaded checkpoint does).
"""

from __future__ import annotations

import numpy as np
import torch


def read_rows(dataset, indices, device: str) -> torch.Tensor:
    """The [N, S+1] token rows of `indices` as one device tensor, through pinned memory
    on CUDA."""
    tokens = torch.from_numpy(np.stack([dataset[i] for i in indices]))
    if device.startswith("cuda"):
        return tokens.pin_memory().to(device, non_blocking=True)
    return tokens.to(device)


class StagedBatches:
    """This rank's token rows per step, one step staged ahead."""

    def __init__(self, dataset, sampler, device: str):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self._staged = None  # (sampler position it was read at, device tensor)

    def next_step(self) -> tuple[list[int], torch.Tensor]:
        """(this rank's sample indices, their rows on the device); advances the sampler."""
        position = self.sampler.consumed_samples
        indices = self.sampler.next_indices()
        if self._staged is not None and self._staged[0] == position:
            rows = self._staged[1]
        else:
            rows = read_rows(self.dataset, indices, self.device)
        self._staged = None
        return indices, rows

    def stage_next(self) -> None:
        """Start reading and copying the next step's rows."""
        self._staged = (self.sampler.consumed_samples,
                        read_rows(self.dataset, self.sampler.peek_indices(), self.device))
