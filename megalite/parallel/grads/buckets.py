"""Flat parameter layout for bucketed reduction and ZeRO sharding.

`BucketLayout` places every local parameter in one flat index space, in reverse
registration order (roughly the order backward produces gradients), cut into buckets
of about `parallel.bucket_mb`. Each bucket is padded to a multiple of
`group_size * ALIGN` elements so that it splits into equal contiguous chunks, one per
dp x sp rank: rank r owns chunk r of every bucket. Its shard (of gradients under
ZeRO 2/3, of master weights and moments under ZeRO 1-3) is the concatenation of its
chunks in bucket order. The layout is the same on every TP rank (TP shards have equal
shapes), and a tied embedding sits alone in its own bucket so that its chunk is the
same on both pipeline stages that hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALIGN = 64  # elements: each rank's chunk of a bucket is a multiple of this (256 B in fp32)


# ---- layout --------------------------------------------------------------------------
@dataclass(eq=False)
class Bucket:
    index: int
    start: int  # offset of the bucket in the flat index space
    size: int = 0  # padded length, a multiple of group_size * ALIGN
    params: list = field(default_factory=list)  # (param, flat offset), in buffer order
    numel: int = 0  # unpadded length

    def chunk_size(self, group_size: int) -> int:
        return self.size // group_size


class BucketLayout:
    """Where each parameter lives in the flat buffer and which chunks a rank owns.

    `units`: lists of parameters that must share one bucket each (ZeRO 3 gathers one
    unit per layer); otherwise buckets are cut at `bucket_numel`. `isolate`: parameters
    that get a bucket of their own (a tied embedding). `sort_key`: inside a bucket,
    parameters are stably sorted by it (the optimizer groups equal weight decay so one
    AdamW call covers a stretch)."""

    def __init__(self, params: list, group_size: int, bucket_numel: int, units=None,
                 isolate=(), sort_key=None):
        self.group_size = group_size
        self.params = list(params)
        isolated = {id(p) for p in isolate}
        groups: list[list] = []
        if units is not None:
            groups = [list(u) for u in units if u]
        else:
            current, current_numel = [], 0
            for p in self.params:
                if id(p) in isolated:
                    if current:
                        groups.append(current)
                    groups.append([p])
                    current, current_numel = [], 0
                    continue
                current.append(p)
                current_numel += p.numel()
                if current_numel >= bucket_numel:
                    groups.append(current)
                    current, current_numel = [], 0
            if current:
                groups.append(current)
        if sort_key is not None:
            groups = [sorted(group, key=sort_key) for group in groups]
        self.buckets: list[Bucket] = []
        self.where: dict[int, tuple[Bucket, int]] = {}
        multiple = group_size * ALIGN
        start = 0
        for i, group in enumerate(groups):
            bucket = Bucket(i, start)
            offset = start
            for p in group:
                bucket.params.append((p, offset))
                self.where[id(p)] = (bucket, offset)
                offset += p.numel()
            bucket.numel = offset - start
            bucket.size = max(multiple, -(-bucket.numel // multiple) * multiple)
            self.buckets.append(bucket)
            start += bucket.size
        self.total = start
        self.numel = sum(b.numel for b in self.buckets)
        self.padding = self.total - self.numel
        self.shard_size = self.total // group_size

    def chunk(self, bucket: Bucket, rank: int) -> tuple[int, int]:
        """Flat [start, end) of `rank`'s chunk of `bucket`."""
        size = bucket.chunk_size(self.group_size)
        return bucket.start + rank * size, bucket.start + (rank + 1) * size

    def shard_offset(self, bucket: Bucket) -> int:
        """Where `bucket`'s chunk starts in a rank's shard (chunks in bucket order)."""
        return bucket.start // self.group_size

    def segments(self, rank: int | None) -> list[tuple[int, int, int]]:
        """(flat start, length, offset in the rank's space) of what `rank` owns; None: all
        (the rank's space is then the flat space)."""
        if rank is None:
            return [(0, self.total, 0)]
        out = []
        for b in self.buckets:
            start, end = self.chunk(b, rank)
            out.append((start, end - start, self.shard_offset(b)))
        return out

    def pieces(self, rank: int | None) -> list[tuple]:
        """(param, offset inside the flattened param, flat start, offset in the rank's
        space, length) for every part of a parameter inside what `rank` owns."""
        out = []
        for b in self.buckets:
            if rank is None:
                flat_start, flat_end, space = b.start, b.start + b.size, b.start
            else:
                (flat_start, flat_end), space = self.chunk(b, rank), self.shard_offset(b)
            for p, offset in b.params:
                lo, hi = max(offset, flat_start), min(offset + p.numel(), flat_end)
                if lo < hi:
                    out.append((p, lo - offset, lo, space + lo - flat_start, hi - lo))
        return out
