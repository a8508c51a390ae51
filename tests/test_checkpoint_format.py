"""Checkpoint format 3 on its own: flat pieces, their checksums, and format 2 still read.

One process builds small checkpoints with PartWriter / commit directly (no trainer, no
process group), as two simulated TP ranks would write them:
- a model tensor stored as boxes, and the optimizer state of two 2-D tensors as flat
  ranges of each TP rank's local slice (a vocabulary tensor whose second slice ends in
  padding rows past the global shape, and a column-split one), cut at offsets that
  are not row-aligned and spread over two bucket files per rank: every box of the
  global tensors reads back exactly;
- one byte flipped inside one flat piece's data: a box touching that piece raises a
  CheckpointError naming the tensor, the offset and the file, boxes elsewhere (even
  another tensor's piece in the same file) still read, and inspect reports the piece;
- a format 2 checkpoint (optimizer state as boxes) still reads and inspects.
"""

import json
import struct

import pytest
import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint.inspect import inspect_checkpoint
from megalite.errors import CheckpointError
from test_data import load_tool

VOCAB, HIDDEN, TP = 10, 6, 2
SLICE_ROWS = 6  # the vocabulary padded to 12 rows: TP rank 1's last two are padding
HEAD = {"kind": "optim", "shape": [VOCAB, HIDDEN], "split_dim": 0, "vocab": True}
DOWN = {"kind": "optim", "shape": [4, 8], "split_dim": 1, "vocab": False}
CUTS = {0: [0, 13, 36], 1: [0, 17, 36]}  # flat ranges of each rank's 36-element slice
PADDING = 999.0  # what the padding rows hold: it must never show in a read


def global_tensors():
    torch.manual_seed(0)
    return {"head.weight": torch.randn(VOCAB, HIDDEN),
            "head.weight/exp_avg": torch.randn(VOCAB, HIDDEN),
            "down.weight/exp_avg": torch.randn(4, 8)}


def head_slice(full, tp_rank):
    """TP rank `tp_rank`'s local slice of the vocabulary tensor, padding rows included."""
    local = torch.full((SLICE_ROWS, HIDDEN), PADDING)
    rows = full[tp_rank * SLICE_ROWS:(tp_rank + 1) * SLICE_ROWS]
    local[:len(rows)] = rows
    return local


def flat_pieces(name, local, slice_start, info, cuts):
    """The optimizer pieces of one local slice: elements [a, b) for each cut."""
    values = local.reshape(-1)
    return [ckpt.Piece(name, values[a:b].clone(), None, info,
                       {"slice_start": slice_start, "slice_shape": list(local.shape),
                        "offset": a}) for a, b in zip(cuts, cuts[1:])]


def write_v3(root, tensors):
    tmp = ckpt.begin_save(root, 5)
    for r in range(TP):
        writer = ckpt.PartWriter(tmp, r)
        rows = [r * SLICE_ROWS, min((r + 1) * SLICE_ROWS, VOCAB)]
        model = [ckpt.Piece("head.weight", tensors["head.weight"][rows[0]:rows[1]],
                            [rows[0], 0], {**HEAD, "kind": "model"})]
        head = flat_pieces("head.weight/exp_avg", head_slice(tensors["head.weight/exp_avg"], r),
                           [r * SLICE_ROWS, 0], HEAD, CUTS[r])
        columns = tensors["down.weight/exp_avg"][:, 4 * r:4 * r + 4]
        down = flat_pieces("down.weight/exp_avg", columns, [0, 4 * r], DOWN, [0, 7, 16])
        writer.add(f"model-{r:05d}-0000.safetensors", model)
        for bucket in range(2):  # one piece of each tensor per bucket file
            writer.add(f"optim-{r:05d}-{bucket:04d}.safetensors", [head[bucket], down[bucket]])
        writer.close()
    return ckpt.commit(root, tmp, 5, {"consumed_samples": 40, "loss": 2.5, "config": {}},
                       keep=2, ranks=range(TP))


def every_box(shape):
    for r0 in range(shape[0]):
        for r1 in range(r0 + 1, shape[0] + 1):
            for c0 in range(shape[1]):
                for c1 in range(c0 + 1, shape[1] + 1):
                    yield [r0, c0], [r1, c1]


def flip_byte(file, key, element):
    """Flip one byte of element `element` of tensor `key` in a safetensors file, found
    through the file's header (8-byte length, JSON with each tensor's data offsets)."""
    data = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + header_len])[key]["data_offsets"]
    at = 8 + header_len + begin + 4 * element + 1  # fp32: a mantissa byte of that element
    assert at < 8 + header_len + end
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def test_flat_pieces_read_back_as_any_box(tmp_path):
    tensors = global_tensors()
    path = write_v3(tmp_path / "ckpt", tensors)
    index = ckpt.read_index(path)
    assert index["format_version"] == 3
    head = index["tensors"]["head.weight/exp_avg"]
    assert {p["offset"] for p in head["pieces"]} == {0, 13, 17}
    assert all("sha256" in p and "length" in p for p in head["pieces"])
    reader = ckpt.CheckpointReader(path, index)
    for name, full in tensors.items():
        assert torch.equal(reader.read(name), full), name
        for start, stop in every_box(full.shape):
            got = reader.read(name, start, stop)
            assert torch.equal(got, full[start[0]:stop[0], start[1]:stop[1]]), (name, start, stop)
    lines, error = inspect_checkpoint(tmp_path / "ckpt")
    assert error is None and "format 3" in "\n".join(lines)
    assert "flat pieces: 8 checked against their own sha256, all OK" in lines


def test_damaged_piece_is_named_and_the_rest_still_reads(tmp_path, capsys):
    tensors = global_tensors()
    path = write_v3(tmp_path / "ckpt", tensors)
    damaged = path / "optim-00001-0001.safetensors"
    flip_byte(damaged, "head.weight/exp_avg#17", 5)  # slice element 22: global row 9
    reader = ckpt.CheckpointReader(path)
    with pytest.raises(CheckpointError, match=r"'head.weight/exp_avg' at flat offset 17 "
                                              r"\(19 elements\) in file "
                                              r"'optim-00001-0001.safetensors'"):
        reader.read("head.weight/exp_avg", [9, 0], [10, 2])
    with pytest.raises(CheckpointError, match="flat offset 17"):
        reader.read("head.weight/exp_avg")
    full = tensors["head.weight/exp_avg"]
    # rank 1's first piece covers slice rows 0-1 and row 2 up to column 5: global 6..8
    assert torch.equal(reader.read("head.weight/exp_avg", [6, 0], [9, 5]), full[6:9, :5])
    assert torch.equal(reader.read("head.weight/exp_avg", [0, 0], [6, 6]), full[:6])
    # the other tensor's piece in the same (now corrupt) file passes its own check
    assert torch.equal(reader.read("down.weight/exp_avg"), tensors["down.weight/exp_avg"])

    lines, error = inspect_checkpoint(path)
    assert isinstance(error, CheckpointError) and "flat offset 17" in str(error)
    report = "\n".join(lines)
    assert "flat pieces: 8 checked against their own sha256, 1 DAMAGED:" in report
    assert ("'head.weight/exp_avg' at flat offset 17, 19 elements, in "
            "optim-00001-0001.safetensors: DAMAGED") in report
    assert sum("flat offset" in line for line in lines) == 1
    file_line = next(line for line in lines if line.startswith("  optim-00001-0001"))
    assert "sha256 FAILED (1 damaged flat piece)" in file_line

    tool = load_tool("inspect_ckpt")
    assert tool.run_main(tool.inspect_main, [str(path)]) == 2
    out, err = capsys.readouterr()
    assert "flat offset 17" in err and "1 DAMAGED" in out and "Traceback" not in err


def test_format_2_checkpoint_still_reads(tmp_path):
    tensors = global_tensors()
    root = tmp_path / "ckpt"
    tmp = ckpt.begin_save(root, 3)
    for r in range(TP):
        rows = [r * SLICE_ROWS, min((r + 1) * SLICE_ROWS, VOCAB)]
        boxes = [ckpt.Piece(n, tensors[n][rows[0]:rows[1]], [rows[0], 0],
                            {**HEAD, "kind": "model" if "/" not in n else "optim"})
                 for n in ("head.weight", "head.weight/exp_avg")]
        ckpt.write_part(tmp, r, {f"model-{r:05d}.safetensors": boxes[:1],
                                 f"optim-{r:05d}.safetensors": boxes[1:]})
    path = ckpt.commit(root, tmp, 3, {"config": {}}, keep=1, ranks=range(TP))
    index_file = path / "index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "format_version": 2}))

    reader = ckpt.CheckpointReader(path)
    assert reader.index["format_version"] == 2
    for name in ("head.weight", "head.weight/exp_avg"):
        assert torch.equal(reader.read(name), tensors[name])
        assert torch.equal(reader.read(name, [5, 1], [8, 4]), tensors[name][5:8, 1:4])
    lines, error = inspect_checkpoint(path)
    assert error is None and "format 2" in "\n".join(lines)
    assert "flat pieces: none (every tensor is stored as boxes)" in lines

    index_file.write_text(json.dumps({**index, "format_version": 1}))
    with pytest.raises(CheckpointError, match="reads versions"):
        ckpt.read_index(path)
