"""Checkpoint save / load throughput next to the raw disk speed, measured the same way.

    python tools/bench_checkpoint.py [--gb 3] [--files 8] [--dir /tmp/megalite_ckpt_bench] [--record]

Writes a synthetic trainer state of about --gb GB (fp32 parameters plus two Adam
moments, as `--files` writers of a layout would hold them: each file its own slices)
through the project's format (checkpoint.write_part + commit: safetensors, fsync,
sha256, index, atomic rename), then reads every tensor back through CheckpointReader
(checksum verified before the first read of each file). Raw disk: the same bytes
written with plain write() + fsync into as many files, and read back with read(). The
page cache is dropped before each read where the process may (root on Linux);
otherwise the read numbers are from memory and the table says so.
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

import torch  # noqa: E402

from megalite.checkpoint import format as ckpt  # noqa: E402

ROWS = 4096  # each parameter a [ROWS, cols] fp32 matrix


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def synthetic_state(gb: float, files: int) -> list[dict]:
    """Per writer: {name: tensor} of parameters and their two moments."""
    per_file = int(gb * 1e9 / 4 / files)
    cols = max(1, per_file // 3 // ROWS // 8)  # 8 parameters per writer, x3 with moments
    out = []
    for w in range(files):
        tensors = {}
        for i in range(8):
            name = f"layers.{w * 8 + i}.weight"
            tensors[name] = torch.randn(ROWS, cols)
            tensors[name + "/exp_avg"] = torch.randn(ROWS, cols)
            tensors[name + "/exp_avg_sq"] = torch.rand(ROWS, cols)
        out.append(tensors)
    return out


def save(state, root: Path) -> float:
    t0 = time.perf_counter()
    tmp = ckpt.begin_save(root, 1)
    for rank, tensors in enumerate(state):
        model = [ckpt.Piece(n, t, info={"kind": "model", "shape": list(t.shape)})
                 for n, t in tensors.items() if "/" not in n]
        optim = [ckpt.Piece(n, t, info={"kind": "optim", "shape": list(t.shape)})
                 for n, t in tensors.items() if "/" in n]
        ckpt.write_part(tmp, rank, {f"model-{rank:05d}.safetensors": model,
                                    f"optim-{rank:05d}.safetensors": optim})
    ckpt.commit(root, tmp, 1, {}, keep=1, ranks=range(len(state)))
    return time.perf_counter() - t0


def load(root: Path) -> float:
    t0 = time.perf_counter()
    path = ckpt.resolve_checkpoint("latest", root)
    reader = ckpt.CheckpointReader(path)
    total = sum(reader.read(n).numel() for n in reader.tensors)
    assert total > 0
    return time.perf_counter() - t0


def raw_write(state, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for rank, tensors in enumerate(state):
        with open(out / f"raw-{rank}.bin", "wb") as f:
            for t in tensors.values():
                f.write(t.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def raw_read(out: Path) -> float:
    t0 = time.perf_counter()
    for path in sorted(out.glob("raw-*.bin")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/megalite_ckpt_bench"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    state = synthetic_state(args.gb, args.files)
    nbytes = sum(t.numel() * 4 for s in state for t in s.values())
    rows = []
    raw_w = raw_write(state, args.dir / "raw")
    cold = drop_page_cache()
    raw_r = raw_read(args.dir / "raw")
    shutil.rmtree(args.dir / "raw")
    save_s = save(state, args.dir / "ckpt")
    drop_page_cache()
    load_s = load(args.dir / "ckpt")
    gb = nbytes / 1e9
    rows.append(("raw write + fsync", raw_w, gb / raw_w))
    rows.append(("megalite save (safetensors, fsync, sha256, commit)", save_s, gb / save_s))
    rows.append(("raw read", raw_r, gb / raw_r))
    rows.append(("megalite load (sha256 verify + read every tensor)", load_s, gb / load_s))
    lines = [f"{gb:.2f} GB in {args.files} files ({args.files} writers' shards), "
             f"reads {'after dropping the page cache' if cold else 'from the page cache'}.", "",
             "| operation | seconds | GB/s |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {rate:.2f} |" for name, s, rate in rows]
    text = "\n".join(lines)
    print(text)
    shutil.rmtree(args.dir, ignore_errors=True)
    if args.record:
        path = ROOT / "BENCHMARKS.md"
        title = "## Checkpoint save / load (tools/bench_checkpoint.py)"
        body = (f"{title}\n\nMeasured {datetime.date.today()} on {socket.gethostname()} "
                f"({os.cpu_count()} CPU cores, disk under {args.dir.parent}) with "
                f"`python {' '.join(sys.argv)}`.\n\n{text}\n")
        old = path.read_text()
        if title in old:
            start = old.index(title)
            end = old.find("\n## ", start + len(title))
            old = old[:start] + old[end + 1:] if end != -1 else old[:start]
        path.write_text(old.rstrip() + "\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
