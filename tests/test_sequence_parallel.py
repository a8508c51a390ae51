"""The `sp` dimension against single-process attention: ring and all-to-all, sp 2 and 4.

Every rank builds the same full-length q/k/v (seeded), runs the distributed attention
on its shard and compares output and gradients with kernels.reference.attention on the
full sequence. fp32 throughout: only summation order differs, so the tolerance is 1e-5.
"""

import pytest
import torch

from kernels.reference import attention
from megalite.config import load_config
from megalite.errors import ConfigError
from megalite.parallel import comm
from megalite.parallel.sequence import (check_sp_layout, ring_attention, sequence_attention,
                                        shard_positions, shard_sequence, unshard_sequence)
from megalite.parallel.topology import Group, build_topology, destroy_topology
from tests.dist_harness import run_on_ranks

TOL = 1e-5
# (tp, sp): tp=2 puts the SP ranks at non-adjacent global ranks (0,2,4,6 / 1,3,5,7),
# which checks that ring peers are addressed by their global rank
LAYOUTS = [(1, 2), (1, 4), (2, 4)]
HEADS = [(4, 4), (4, 2), (8, 4), (4, 1)]  # (Hq, Hkv): MHA, GQA, MQA


def _full_inputs(hq, hkv, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    b, d = 2, 8
    q, k, v = (torch.randn(b, h, seq_len, d, generator=g) for h in (hq, hkv, hkv))
    grad_out = torch.randn(b, hq, seq_len, d, generator=g)
    return q, k, v, grad_out


def _sp_cases(tp, sp):
    topo = build_topology(tp=tp, sp=sp, timeout_s=60)
    if topo is None:
        return None
    group, results = topo.sp_group, []
    for mode in ("ring", "all_to_all"):
        for hq, hkv in HEADS:
            if mode == "all_to_all" and hkv % sp:
                continue
            seq_len = 8 * sp
            q, k, v, grad_out = _full_inputs(hq, hkv, seq_len, seed=hq * 100 + hkv + seq_len)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = attention(*full)
            ref.backward(grad_out)

            def shard(t):
                return shard_sequence(t, sp, group.rank, mode, dim=2)

            local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
            topo.reset_bytes()
            out = sequence_attention(mode, group, attention)(*local)
            fwd_bytes = group.bytes["p2p"]
            out.backward(shard(grad_out))
            total_bytes = group.bytes["p2p"]
            gathered = comm.all_gather(out.detach(), group, dim=2).chunk(sp, dim=2)
            errors = {"out": (unshard_sequence(list(gathered), mode, dim=2) - ref).abs().max()}
            for name, loc, ref_t in zip("qkv", local, full):
                errors["d" + name] = (loc.grad - shard(ref_t.grad)).abs().max()
            kv_bytes = local[1].nbytes + local[2].nbytes
            results.append({
                "case": (tp, sp, mode, hq, hkv, seq_len),
                "errors": {n: e.item() for n, e in errors.items()},
                "bytes": (fwd_bytes, total_bytes, kv_bytes, local[1].numel()),
            })
    destroy_topology(topo)
    return results


def _all_layouts():
    return [r for tp, sp in LAYOUTS for r in (_sp_cases(tp, sp) or [])]


def test_sequence_parallel_attention_matches_single_process():
    per_rank = run_on_ranks(_all_layouts)
    cases = [c for results in per_rank for c in results]
    assert {c["case"][:3] for c in cases} == {(tp, sp, m) for tp, sp in LAYOUTS
                                              for m in ("ring", "all_to_all")}
    for c in cases:
        for name, err in c["errors"].items():
            assert err < TOL, f"{c['case']}: {name} differs by {err:.2e}"
        tp, sp, mode = c["case"][:3]
        fwd, total, kv_bytes, kv_numel = c["bytes"]
        if mode == "ring":
            # forward: k and v each make sp-1 hops; backward: again, plus the fp32 dk/dv
            # running sums making sp hops to return to their owner
            assert fwd == (sp - 1) * kv_bytes, c
            assert total == 2 * (sp - 1) * kv_bytes + sp * 2 * kv_numel * 4, c
        else:
            assert total == 0, c


def test_shard_unshard_round_trip_and_positions():
    x = torch.arange(2 * 48).reshape(2, 48)
    for sp in (1, 2, 3, 4):
        for mode in ("ring", "all_to_all"):
            parts = [shard_sequence(x, sp, r, mode) for r in range(sp)]
            assert all(p.shape == (2, 48 // sp) for p in parts)
            assert torch.equal(unshard_sequence(parts, mode), x)
            positions = [shard_positions(48, sp, r, mode) for r in range(sp)]
            for r in range(sp):
                assert positions[r].dtype == torch.long
                assert torch.equal(positions[r], parts[r][0])
            assert torch.equal(torch.cat(positions).sort().values, torch.arange(48))
    assert shard_positions(16, 2, 0, "ring").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(16, 2, 1, "ring").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert shard_positions(16, 2, 1, "all_to_all").tolist() == list(range(8, 16))


def test_layout_errors_are_config_errors():
    check_sp_layout(32, 8, 4, sp=4, mode="ring")
    check_sp_layout(32, 8, 4, sp=4, mode="all_to_all")
    check_sp_layout(30, 3, 1, sp=1, mode="ring")  # nothing is split
    check_sp_layout(24, 8, 2, sp=4, mode="ring")  # ring needs no head divisibility
    with pytest.raises(ConfigError, match="multiple of 8"):
        check_sp_layout(36, 8, 4, sp=4, mode="ring")
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_sp_layout(30, 8, 4, sp=4, mode="all_to_all")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        check_sp_layout(32, 8, 2, sp=4, mode="all_to_all")
    with pytest.raises(ConfigError, match="num_heads/tp = 8/2"):
        check_sp_layout(32, 8, 8, sp=8, mode="all_to_all", tp=2)
    with pytest.raises(ConfigError, match="sp_mode"):  # the mode itself: the config's rule
        load_config(None, [("parallel.sp_mode", "ulysses")])
    with pytest.raises(ConfigError, match="multiple of 8"):
        shard_sequence(torch.zeros(1, 12), 4, 0, "ring")


def test_single_rank_group_is_the_plain_attention():
    solo = Group("sp", (0,), 0)
    assert sequence_attention("ring", solo, attention) is attention
    assert sequence_attention("all_to_all", solo, attention) is attention
    # ring_attention itself on one rank: the two local chunks, no communication
    q, k, v, grad_out = _full_inputs(4, 2, 16, seed=0)
    torch.testing.assert_close(ring_attention(q, k, v, solo), attention(q, k, v),
                               atol=TOL, rtol=0)
    assert solo.bytes["p2p"] == 0
