"""The point-to-point the code really posts completes under NCCL's rules, for every layout.

gloo forgives what NCCL does not (see nccl_sim.py for the rules). Here real gloo runs of
the pipeline engine and of ring attention record every batch they post through a
patched torch.distributed, and `nccl_sim.simulate` replays the records under NCCL's
rules: every (schedule, pp, v, m) the config accepts up to pp = 8, v = 4, m = 4 pp,
validation passes, ring attention alone and inside pipelines. Every recorded tag is 0:
nothing relies on tags (and the layout-parity cases, which run the same code, are
therefore tag-0 runs: a message delivered to the wrong receive would show as a wrong
loss there). Also: the simulator's own verdicts on hand-made records, and the start-up
that lets NCCL create every communicator before the first p2p batch.
"""

import itertools
import re
from pathlib import Path

import pytest
import torch

from dist_harness import run_on_ranks
from megalite.config import load_config, resolve
from megalite.errors import ConfigError
from megalite.model.build import build_model
from megalite.parallel import launch
from megalite.parallel.pipeline.engine import PipelineEngine
from megalite.parallel.pipeline.schedules import most_waiting
from megalite.parallel.sequence import shard_batch
from megalite.parallel.topology import build_topology, destroy_topology
from nccl_sim import Op, P2PViolation, Recorder, simulate

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64


# ---- the simulator's verdicts -----------------------------------------------------------
def _op(kind, peer, shape=(2, 3), group=(0, 1)):
    return Op(kind, group, peer, shape, "torch.float32", 0)


def test_mirrored_batches_complete():
    exchange = {0: [[_op("send", 1), _op("recv", 1)]], 1: [[_op("send", 0), _op("recv", 0)]]}
    assert simulate(exchange) == 2


def test_send_waiting_for_its_receiver_deadlocks():
    """Both ranks send first and receive in a later batch: gloo's non-blocking sends get
    through, NCCL's sends wait for receives that are queued behind them."""
    crossed = {0: [[_op("send", 1)], [_op("recv", 1)]], 1: [[_op("send", 0)], [_op("recv", 0)]]}
    with pytest.raises(P2PViolation, match=r"deadlocks(.|\n)*rank 0 at batch 0 of 2: send with 1"):
        simulate(crossed)


def test_an_op_without_partner_and_a_size_mismatch_fail():
    with pytest.raises(P2PViolation, match="send #1 from 0 to 1 never meets a partner"):
        simulate({0: [[_op("send", 1)], [_op("send", 1)]], 1: [[_op("recv", 0)]]})
    with pytest.raises(P2PViolation, match="receive #0 on 1 from 0 never meets"):
        simulate({0: [], 1: [[_op("recv", 0)]]})
    with pytest.raises(P2PViolation, match=r"is \(2, 3\) .* is \(3, 2\)"):
        simulate({0: [[_op("send", 1)]], 1: [[_op("recv", 0, shape=(3, 2))]]})


def test_messages_pair_in_posting_order_not_by_tag():
    """Tags are ignored: the first send meets the first receive even if the tags say
    otherwise, so a size difference between them is a mismatch."""
    sends = [Op("send", (0, 1), 1, (4,), "torch.float32", 7), Op("send", (0, 1), 1, (8,), "torch.float32", 9)]
    recvs = [Op("recv", (0, 1), 0, (8,), "torch.float32", 9), Op("recv", (0, 1), 0, (4,), "torch.float32", 7)]
    with pytest.raises(P2PViolation, match=r"send #0 from 0 to 1 .* is \(4,\) .* is \(8,\)"):
        simulate({0: [sends], 1: [recvs]})


# ---- start-up ---------------------------------------------------------------------------
def test_nccl_process_group_is_bound_to_the_rank_device():
    options = launch.process_group_options("cuda:3", 60)
    assert options["backend"] == "nccl" and options["device_id"] == torch.device("cuda:3")
    assert options["timeout"].total_seconds() == 60
    assert launch.process_group_options("cpu", 60)["backend"] == "gloo"


def _calls_after_start_up():
    topo = build_topology(tp=2, sp=1, dp=2, pp=2, timeout_s=60)
    try:
        return {g.name: g.calls for g in topo.groups if g.pg is not None}
    finally:
        destroy_topology(topo)


def test_every_group_runs_one_collective_at_start_up():
    """So NCCL has every communicator before a pipeline's first p2p batch, which only
    two members of the pp group post."""
    for calls in run_on_ranks(_calls_after_start_up):
        assert calls and set(calls.values()) == {1}, calls


def test_comm_posts_point_to_point_only_in_batches():
    """A lone isend/irecv may run on a separate NCCL communicator, unordered with the
    batched ones between the same ranks: comm.py names isend/irecv only inside P2POp."""
    source = (ROOT / "megalite/parallel/comm.py").read_text()
    assert not re.search(r"dist\.(send|recv)\(", source)
    for use in re.finditer(r"dist\.(isend|irecv)\b", source):
        line = source[source.rfind("\n", 0, use.start()) + 1:source.find("\n", use.start())]
        assert "P2POp(" in line, line


# ---- the recorded matrix ----------------------------------------------------------------
def tiny(**values) -> object:
    base = {"model.hidden_size": 16, "model.num_heads": 2, "model.num_kv_heads": 2,
            "model.vocab_size": VOCAB, "model.kernels": "torch", "model.attention": "eager",
            "train.seq_len": 8, "train.micro_batch_size": 1, "train.device": "cpu"}
    cfg = load_config(None, [(k, str(v)) for k, v in {**base, **values}.items()])
    return resolve(cfg, VOCAB, "cpu")


def pipeline_cases(pp: int) -> list[tuple]:
    """Every (schedule, v, m) the config accepts at this pp, up to v = 4, m = 4 pp."""
    cases = []
    for schedule, v, m in itertools.product(("gpipe", "1f1b", "interleaved"), range(1, 5),
                                            range(1, 4 * pp + 1)):
        try:
            tiny(**{"model.num_layers": pp * v, "parallel.pp": pp, "parallel.virtual_stages": v,
                    "parallel.schedule": schedule, "train.global_batch_size": m})
        except ConfigError:
            continue
        cases.append((schedule, v, m))
    return cases + [("forward", 1, pp + 1), ("forward", 2, 2 * pp)]


def record(layout: dict, cases: list[tuple]):
    """On every pool rank: {case: this rank's recorded batches} for one step of each case
    through the real engine (None off the layout)."""
    p = {k: layout.get(k, 1) for k in ("tp", "sp", "dp", "pp")}
    topo = build_topology(p["tp"], p["sp"], p["dp"], p["pp"], timeout_s=120)
    if topo is None:
        return None
    out = {}
    try:
        for v in sorted({v for _, v, _ in cases}):
            cfg = tiny(**{"model.num_layers": p["pp"] * v, "parallel.pp": p["pp"],
                          "parallel.tp": p["tp"], "parallel.sp": p["sp"],
                          "parallel.virtual_stages": v, "train.global_batch_size": p["pp"],
                          **layout.get("extra", {}),
                          "parallel.schedule": "interleaved" if v > 1 else "1f1b"})
            model = build_model(cfg, topo, "cpu")
            engine = PipelineEngine(model, topo, p["tp"] if cfg.parallel.tp_sp else 1)
            gen = torch.Generator().manual_seed(0)
            for case in [c for c in cases if c[1] == v]:
                schedule, _, m = case
                rows = [torch.randint(0, VOCAB, (1, cfg.train.seq_len + 1), generator=gen)
                        for _ in range(m)]
                with Recorder() as rec:
                    engine.run(schedule, [shard_batch(r, topo, cfg) for r in rows], [1 / m] * m)
                model.zero_grad(set_to_none=True)
                out[case] = rec.batches, engine.peak_waiting
        out["sp_group"] = topo.sp_group.ranks
    finally:
        destroy_topology(topo)
    return out


def check(results: list, cases: list[tuple], pp: int = 1) -> None:
    for case in cases:
        schedule, v, m = case
        records = {rank: r[case][0] for rank, r in enumerate(results) if r is not None}
        if pp > 1:  # the receive buffers alive at once, as the estimator counts them
            assert tuple(r[case][1] for r in results if r is not None) == \
                most_waiting(schedule, m, pp, v), case
        try:
            simulate(records)
        except P2PViolation as e:
            raise AssertionError(f"{case}: {e}") from None
        tags = {op.tag for batches in records.values() for b in batches for op in b}
        assert tags <= {0}, (case, tags)


@pytest.mark.parametrize("pp", range(2, 9))
def test_pipeline_schedules_complete_under_nccl_rules(pp):
    cases = pipeline_cases(pp)
    assert any(s == "interleaved" and m % 2 for s, _, m in cases) == (pp % 2 == 1)
    check(run_on_ranks(record, {"pp": pp}, cases), cases, pp)


RING_LAYOUTS = [
    ({"sp": 2}, [("1f1b", 1, 2)]),
    ({"sp": 4}, [("1f1b", 1, 1), ("forward", 1, 1)]),
    ({"sp": 2, "tp": 2, "extra": {"parallel.tp_sp": True}}, [("1f1b", 1, 2)]),
    ({"sp": 2, "pp": 2}, [("1f1b", 1, 3), ("gpipe", 1, 2), ("interleaved", 2, 4)]),
    ({"sp": 2, "pp": 4}, [("1f1b", 1, 5), ("interleaved", 2, 8)]),
]


@pytest.mark.parametrize("layout, cases", RING_LAYOUTS, ids=lambda x: str(x))
def test_ring_attention_completes_under_nccl_rules(layout, cases):
    results = run_on_ranks(record, layout, cases)
    check(results, cases)
    for r in results:
        if r is not None:  # every rank's ring hops went over its sp group
            assert any(op.group == r["sp_group"] for b in r[cases[0]][0] for op in b)
