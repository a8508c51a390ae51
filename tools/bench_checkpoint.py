"""Checkpoint save / load throughput next to the raw disk speed, measured the same way.

    python tools/bench_checkpoint.py [--gb 3] [--writers 8] [--bucket_mb 25]
                                     [--dir /tmp/megalite_ckpt_bench] [--record]

A synthetic trainer state of about --gb GB, laid out as format 3 stores it for a
data-parallel group of --writers ranks under ZeRO 1 (tp = pp = 1): transformer-shaped
fp32 parameters (hidden 768) in gradient buckets of --bucket_mb MiB
(parallel/grads/buckets.py `BucketLayout`, the trainer's own), each rank holding its
chunk of every bucket's two Adam moments. Saving, as the trainer does: rank 0 writes
each bucket's parameters as boxes (model-00000-BBBB), every rank its chunk of each
bucket's moments as flat pieces (optim-RRRRR-BBBB, a piece per parameter range, with
its sha256), plus its RNG file, through PartWriter and commit (safetensors, fsync,
file and piece sha256, index, atomic rename). Loading, as a resume in the same
layout does: every model tensor read whole, and every rank's flat ranges rebuilt from
the boxes `flat.runs` gives through CheckpointReader.read (files checked before their
first read, each flat piece against its own sha256), then compared with what was
saved. Raw disk: the same bytes in the same files written with plain write() + fsync
and read back with read(). The page cache is dropped before each read where the
process may (root on Linux); otherwise the read numbers are from memory and the table
says so.
"""

import argparse
import datetime
import os
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

import torch  # noqa: E402

from megalite.checkpoint import flat  # noqa: E402
from megalite.checkpoint import format as ckpt  # noqa: E402
from megalite.parallel.grads.buckets import BucketLayout  # noqa: E402

HIDDEN = 768
LAYER = {"attn.qkv.weight": (HIDDEN, 3 * HIDDEN), "attn.proj.weight": (HIDDEN, HIDDEN),
         "mlp.up.weight": (4 * HIDDEN, HIDDEN), "mlp.down.weight": (HIDDEN, 4 * HIDDEN),
         "norm1.weight": (HIDDEN,), "norm2.weight": (HIDDEN,)}
MOMENTS = ("exp_avg", "exp_avg_sq")
BYTES_PER_PARAM = 12  # fp32 parameter and two fp32 moments


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


class State:
    """The synthetic parameters, their bucket layout and each rank's moment shards."""

    def __init__(self, gb: float, writers: int, bucket_mb: float):
        per_layer = sum(torch.Size(s).numel() for s in LAYER.values())
        layers = max(1, round(gb * 1e9 / BYTES_PER_PARAM / per_layer))
        self.params = {f"layers.{i}.{n}": torch.randn(s) for i in range(layers)
                       for n, s in LAYER.items()}
        self.names = {id(p): n for n, p in self.params.items()}
        self.layout = BucketLayout(list(self.params.values()), writers,
                                   int(bucket_mb * 2 ** 20 / 4))
        self.writers = writers
        self.shards = [{k: torch.randn(self.layout.shard_size) for k in MOMENTS}
                       for _ in range(writers)]

    def ranges(self, rank: int):
        """(name, param, offset inside the param, offset in the rank's shard, length,
        bucket index) of every range of a parameter inside rank's chunks."""
        return [(self.names[id(p)], p, inside, space, length,
                 self.layout.where[id(p)][0].index)
                for p, inside, _, space, length in self.layout.pieces(rank)]


def plan_files(state: State) -> list[tuple[int, str, list]]:
    """(writing rank, file name, pieces) of every file, in writing order."""
    files = []
    for rank in range(state.writers):
        by_bucket: dict[int, list] = {}
        for name, p, inside, space, length, b in state.ranges(rank):
            info = {"kind": "optim", "shape": list(p.shape), "split_dim": None, "vocab": False}
            where = {"slice_start": [0] * p.dim(), "slice_shape": list(p.shape),
                     "offset": inside}
            by_bucket.setdefault(b, []).extend(
                ckpt.Piece(f"{name}/{k}", state.shards[rank][k][space:space + length], None,
                           info, where) for k in MOMENTS)
        for bucket in state.layout.buckets:
            if rank == 0:
                files.append((rank, f"model-00000-{bucket.index:04d}.safetensors", [
                    ckpt.Piece(state.names[id(p)], p, None, {
                        "kind": "model", "shape": list(p.shape), "split_dim": None,
                        "vocab": False}) for p, _ in bucket.params]))
            files.append((rank, f"optim-{rank:05d}-{bucket.index:04d}.safetensors",
                          by_bucket.get(bucket.index, [])))
        rng = torch.get_rng_state()
        files.append((rank, f"rng-{rank:05d}.safetensors", [
            ckpt.Piece(f"rng/torch_cpu/{rank}", rng, None,
                       {"kind": "rng", "shape": [rng.numel()]})]))
    return files


def save(files, root: Path, writers: int) -> float:
    t0 = time.perf_counter()
    tmp = ckpt.begin_save(root, 1)
    parts = [ckpt.PartWriter(tmp, rank) for rank in range(writers)]
    for rank, fname, pieces in files:
        parts[rank].add(fname, pieces)
    for part in parts:
        part.close()
    ckpt.commit(root, tmp, 1, {}, keep=1, ranks=range(writers))
    return time.perf_counter() - t0


def load(state: State, root: Path) -> tuple[float, list[dict]]:
    """Seconds to read everything back, and the moment shards it rebuilt."""
    t0 = time.perf_counter()
    reader = ckpt.CheckpointReader(ckpt.resolve_checkpoint("latest", root))
    model = {name: reader.read(name) for name in reader.names("model")}
    shards = [{k: torch.empty(state.layout.shard_size) for k in MOMENTS}
              for _ in range(state.writers)]
    for rank in range(state.writers):
        for name, p, inside, space, length, _ in state.ranges(rank):
            for key in MOMENTS:
                view = shards[rank][key][space:space + length]
                for at, lo, hi in flat.runs([0] * p.dim(), list(p.shape), inside, length,
                                            list(p.shape)):
                    flat.box_view(view, at, lo, hi).copy_(reader.read(f"{name}/{key}", lo, hi))
    seconds = time.perf_counter() - t0
    assert all(torch.equal(model[n], p) for n, p in state.params.items())
    return seconds, shards


def same_moments(state: State, shards: list[dict]) -> bool:
    """Every range the ranks hold came back (the bucket padding is in no range)."""
    return all(torch.equal(shards[r][k][space:space + length],
                           state.shards[r][k][space:space + length])
               for r in range(state.writers) for _, _, _, space, length, _ in state.ranges(r)
               for k in MOMENTS)


def raw_write(files, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for _, fname, pieces in files:
        with open(out / fname, "wb") as f:
            for piece in pieces:
                f.write(piece.value.contiguous().numpy())
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def raw_read(out: Path) -> float:
    t0 = time.perf_counter()
    for path in sorted(out.iterdir()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def record(text: str, args) -> None:
    from tools.benchmarks import record_section
    record_section(f"## Checkpoint save / load (tools/bench_checkpoint.py)\n\nMeasured "
                   f"{datetime.date.today()} on {socket.gethostname()} ({os.cpu_count()} CPU "
                   f"cores, disk under {args.dir.parent}) with `python {' '.join(sys.argv)}`."
                   f"\n\n{text}\n")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--bucket_mb", type=float, default=25.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/megalite_ckpt_bench"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    state = State(args.gb, args.writers, args.bucket_mb)
    files = plan_files(state)
    nbytes = sum(p.value.numel() * p.value.element_size() for _, _, ps in files for p in ps)
    n_flat = sum(p.flat is not None for _, _, ps in files for p in ps)
    raw_w = raw_write(files, args.dir / "raw")
    cold = drop_page_cache()
    raw_r = raw_read(args.dir / "raw")
    shutil.rmtree(args.dir / "raw")
    save_s = save(files, args.dir / "ckpt", args.writers)
    drop_page_cache()
    load_s, shards = load(state, args.dir / "ckpt")
    if not same_moments(state, shards):
        raise SystemExit("the loaded optimizer state differs from the saved one")
    gb = nbytes / 1e9
    rows = [("raw write + fsync", raw_w, raw_w),
            ("megalite save (safetensors, fsync, file + piece sha256, commit)", save_s, raw_w),
            ("raw read", raw_r, raw_r),
            ("megalite load (model boxes + every flat range, sha256 verified)", load_s, raw_r)]
    lines = [f"{gb:.2f} GB ({len(state.params)} parameters in {len(state.layout.buckets)} "
             f"buckets of {args.bucket_mb:g} MiB, dp = {args.writers} writers under ZeRO 1) "
             f"in {len(files)} files, {n_flat} of the pieces flat; reads "
             f"{'after dropping the page cache' if cold else 'from the page cache'}.", "",
             "| operation | seconds | GB/s | of raw |", "|---|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {gb / s:.2f} | {raw / s:.0%} |" for name, s, raw in rows]
    text = "\n".join(lines)
    print(text)
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.record:
        record(text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
