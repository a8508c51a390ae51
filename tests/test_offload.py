"""Activation offloading: the same numbers, and every saved activation really moved.

`train.offload_activations` copies what each block saves for backward to host memory
(megalite/model/offload.py). The values round-trip exactly, so training with it gives
bit-identical losses, gradients and weights for recompute none / selective / full (and
dropout, whose masks checkpointing regenerates). The bytes it moved must equal what the
blocks save for backward, measured apart by hooks that only look (distinct storages,
parameters left out), so an offload that does nothing fails; the trainer logs them, and
the estimator moves the blocks' bytes from device to host.
"""

import pytest
import torch

from megalite.config import load_config, resolve
from megalite.model import offload
from megalite.model.build import build_model
from megalite.parallel.topology import build_topology
from megalite.planning.estimate import estimate, layer_items, prepare

VOCAB = 61
# On a GPU (tools/gpu_check.sh runs this file) the side-stream copies are what is tested.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cfg_for(preset: str, recompute: str, offload: bool, dropout: float = 0.0):
    values = {"model.preset": preset, "model.hidden_size": 32, "model.num_layers": 2,
              "model.num_heads": 4, "model.num_kv_heads": 2 if preset == "llama" else 0,
              "model.vocab_size": VOCAB, "model.kernels": "torch", "model.attention": "eager",
              "model.dropout": dropout, "train.seq_len": 16, "train.micro_batch_size": 2,
              "train.global_batch_size": 2, "train.recompute": recompute,
              "train.offload_activations": offload, "train.device": "cpu"}
    return resolve(load_config(None, [(k, str(v)) for k, v in values.items()]), VOCAB, "cpu")


def train(cfg, steps: int = 3):
    """(losses, final parameters, bytes offloaded per step) of a few AdamW steps."""
    torch.manual_seed(0)
    model = build_model(cfg, build_topology(), DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, VOCAB, (steps, 2, 17),
                           generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses, moved = [], []
    for rows in tokens:
        before = model.offload.bytes_offloaded
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        moved.append(model.offload.bytes_offloaded - before)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, moved


CASES = [("llama", "none", 0.0), ("llama", "selective", 0.0), ("llama", "full", 0.0),
         ("gpt2", "full", 0.1), ("gpt2", "none", 0.1)]


@pytest.mark.parametrize("preset, recompute, dropout", CASES)
def test_offloaded_training_is_bit_identical(preset, recompute, dropout):
    losses, params, moved = train(cfg_for(preset, recompute, True, dropout))
    ref_losses, ref_params, ref_moved = train(cfg_for(preset, recompute, False, dropout))
    assert losses == ref_losses
    for name, value in params.items():
        assert torch.equal(value, ref_params[name]), name
    assert ref_moved == [0, 0, 0] and min(moved) > 0


class SavedBytes:
    """Stands in for the model's offload: counts the distinct storages each block saves
    (parameters left out) and keeps them where they are."""

    enabled = True

    def __init__(self):
        self.bytes_offloaded, self._seen, self._hooks = 0, set(), None

    def _pack(self, t):
        if not (t.is_leaf and t.requires_grad) and t.untyped_storage().data_ptr() not in self._seen:
            self._seen.add(t.untyped_storage().data_ptr())
            self.bytes_offloaded += t.untyped_storage().nbytes()
        return t

    def new_chain(self):
        pass

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._seen = set()


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_bytes_moved_are_the_blocks_saved_tensors(recompute):
    cfg = cfg_for("llama", recompute, True)
    _, _, moved = train(cfg, steps=1)
    torch.manual_seed(0)
    model = build_model(cfg_for("llama", recompute, False), build_topology(), DEVICE)
    model.offload = SavedBytes()
    rows = torch.randint(0, VOCAB, (1, 2, 17),
                         generator=torch.Generator().manual_seed(1))[0].to(DEVICE)
    model(rows[:, :-1], rows[:, 1:])
    assert moved == [model.offload.bytes_offloaded] and moved[0] > 0


def test_the_estimator_moves_block_activations_to_the_host():
    on, off = (estimate(prepare(cfg_for("llama", "none", flag))) for flag in (True, False))
    layers = 2 * sum(layer_items(prepare(cfg_for("llama", "none", True))).values())
    assert off["memory_bytes"]["activations"] - on["memory_bytes"]["activations"] == layers
    assert on["stages"][0]["host_activation_bytes"] == layers
    assert off["stages"][0]["host_activation_bytes"] == 0


def test_backward_brings_the_previous_block_back_before_it_is_needed(monkeypatch):
    """When backward first unpacks block k it starts the copy back of block k - 1 (on
    CUDA: on the side stream, under block k's backward), so every block but the last
    is fetched before its first use, and nothing comes back during forward."""
    events = []
    fetch, storage = offload._HostCopy.fetch, offload._HostCopy.storage
    monkeypatch.setattr(offload._HostCopy, "fetch",
                        lambda self: (events.append(("fetch", id(self))), fetch(self))[1])
    monkeypatch.setattr(offload._HostCopy, "storage",
                        lambda self: (events.append(("use", id(self))), storage(self))[1])
    model = build_model(cfg_for("llama", "none", True), build_topology(), DEVICE)
    rows = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss = model(rows[:, :-1], rows[:, 1:])
    assert events == []  # forward only copies out
    last = {id(c) for c in model.offload._last().copies}  # the last block: first in backward
    loss.backward()
    first = {}
    for i, (kind, copy) in enumerate(events):
        first.setdefault((kind, copy), i)
    copies = {copy for _, copy in events}
    late = {c for c in copies if first[("fetch", c)] > first[("use", c)]}
    assert len(copies) > len(last) > 0 and late == last
    del loss  # the graph is gone: so are the blocks' copies (nothing else holds them)
    assert model.offload._last() is None
