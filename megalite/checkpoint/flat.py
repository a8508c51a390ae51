"""Flattened ranges of a tensor slice as boxes of the global tensor: format 3's pieces.

A ZeRO rank owns flat ranges of its TP-local parameters (parallel/grads/buckets.py), so
format 3 stores its optimizer state as it holds it: a piece is elements [offset, offset
+ length) of a row-major slice of shape `slice_shape` that sits at `slice_start` in the
global tensor (Megatron's distributed checkpoints call these flattened ranges). `runs`
turns such a range into at most three boxes of the global tensor (a partial first row,
whole rows, a partial last row), each with where its elements start inside the range,
and drops the rows past the global shape (the vocabulary padding a TP rank may hold).
The checkpoint reader assembles any box from pieces with it, and the trainer fills its
own flat ranges from any box with it, so writer and reader layouts are independent.
Parameters are 1-D or 2-D (tensor parallelism splits rows or columns).
"""

from __future__ import annotations

import hashlib
import math

import torch


def runs(slice_start, slice_shape, offset: int, length: int,
         global_shape) -> list[tuple[int, list[int], list[int]]]:
    """[(offset inside the range, global start, global stop)] of elements [offset, offset +
    length) of the slice; each box's elements are contiguous in the range, row-major."""
    if len(slice_shape) > 2:
        raise ValueError(f"flat pieces cover 1-D and 2-D tensors, not shape {slice_shape}")
    cols = math.prod(slice_shape[1:])
    end = offset + length
    boxes = []  # (at, first row, last row (exclusive), first col, last col)
    at = offset
    if at % cols and at < end:  # a partial first row
        row, col = divmod(at, cols)
        stop = min(cols, col + end - at)
        boxes.append((at, row, row + 1, col, stop))
        at += stop - col
    if end // cols > at // cols:  # whole rows
        boxes.append((at, at // cols, end // cols, 0, cols))
        at = end // cols * cols
    if at < end:  # a partial last row
        boxes.append((at, at // cols, at // cols + 1, 0, end - at))
    out = []
    for at, r0, r1, c0, c1 in boxes:
        r0, r1 = r0 + slice_start[0], min(r1 + slice_start[0], global_shape[0])
        if r1 <= r0:
            continue  # all padding
        if len(slice_shape) == 1:
            out.append((at - offset, [r0], [r1]))
        else:
            c = slice_start[1]
            out.append((at - offset, [r0, c0 + c], [r1, c1 + c]))
    return out


def box_view(flat: torch.Tensor, at: int, start, stop) -> torch.Tensor:
    """The box [start, stop) whose elements begin at `at` of the 1-D `flat`, shaped."""
    shape = [b - a for a, b in zip(start, stop)]
    return flat[at:at + math.prod(shape)].view(shape)


def sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes (any dtype: bf16 has no numpy type, so as uint8)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def intersect(start_a, stop_a, start_b, stop_b):
    """The common box of two boxes, or None."""
    lo = [max(a, b) for a, b in zip(start_a, start_b)]
    hi = [min(a, b) for a, b in zip(stop_a, stop_b)]
    return None if any(h <= low for low, h in zip(lo, hi)) else (lo, hi)


def region(box_start, lo, hi) -> tuple:
    """Index of box [lo, hi) inside a tensor that holds the box starting at `box_start`."""
    return tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, box_start))
