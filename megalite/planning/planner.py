"""Layout planner: enumerate (tp, pp, dp, sp, zero, zero_shard, micro-batch, recompute,
virtual stages) for a model, a global batch and a cluster, keep what fits, rank by step
time.

The step time of a layout (`step_time`) is a sum of:
- compute: hardware FLOPs (estimate.flops: recomputation included) of the busiest
  pipeline stage (its layers, plus the head on the last) for every micro-batch, at
  `efficiency` times the peak;
- bubble: (pp - 1) / v micro-batch times of that stage (1F1B, interleaved with v);
- exposed communication, each collective as a ring over its group's bandwidth
  (intra-node when the group fits in a node, else inter-node):
  - tp, per block and micro-batch, not overlapped: what parallel/tensor.py does, the
    row layers' 2 all-reduces forward and one all-reduce of the input gradient per
    column layer backward (q, k, v and c_fc, or q, k, v, gate and up); under tp_sp
    as many all-reduce equivalents, as all-gathers and reduce-scatters split between
    forward and backward; full recomputation repeats the forward ones;
  - sp: ring hops of k/v (and fp32 dk/dv back) or the all-to-alls, not overlapped;
  - pp: every activation and gradient message of the stage;
  - dp x sp: the gradient reduction hidden behind one backward (ZeRO 0/1: the last
    micro-batch's; 2/3: every micro-batch's), the parameter all-gather after the step
    (ZeRO 1/2) exposed, ZeRO 3's per-block gathers hidden behind forward and backward.
    Under hybrid sharding (parallel.zero_shard = N < dp * sp) what ZeRO does over the
    shard group (reduce-scatter, all-gathers) runs over N ranks at the bandwidth of their
    span N * tp, and each reduced chunk (1/N of the gradient bytes) is then all-reduced
    over the dp * sp / N replicas, whose group spans all of dp x sp (inter-node when
    that leaves a node); the two add up (modelled one after the other).
Memory is estimate.stage_memory's (bucket padding left out) against `USABLE_FRACTION`
of the GPU (the rest: CUDA context, NCCL buffers, allocator fragmentation).

The search keeps tp inside a node and turns tp_sp on whenever tp > 1 (same traffic,
less memory); zero 0 and 1 move the same bytes, so both are tried. When dp x sp leaves
a node, zero 1-3 are also tried hybrid (`hybrid_shard`): shards over the largest block
of dp x sp that stays in a node, so the shard group's traffic (all of ZeRO 3's gathers)
uses the intra-node bandwidth and only an all-reduce of 1/N of the gradient crosses
nodes. `only` restricts any layout key to given values (e.g. the features a paper had).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from megalite.config import Config
from megalite.errors import ConfigError
from megalite.planning.estimate import BYTES, check_layout, flops, stage_memory, state_bytes
from megalite.planning.state import zero_groups

USABLE_FRACTION = 0.9
MICRO_BATCH_SIZES = (1, 2, 4, 8)
VIRTUAL_STAGES = (1, 2, 4)
SP_SIZES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Cluster:
    """The GPUs a plan is for; the defaults are nodes of 8 H100 SXM 80 GB."""
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0  # GiB per GPU
    peak_tflops: float = 989.0  # dense bf16/fp16 peak per GPU
    intra_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink), one direction
    inter_gbps: float = 50.0  # GB/s per GPU between nodes (its NIC share), one direction
    efficiency: float = 0.5  # fraction of the peak the matmuls reach

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def check(self) -> None:
        for name in ("gpus_per_node", "nodes", "gpu_memory_gb", "peak_tflops", "intra_gbps",
                     "inter_gbps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 for the planner.")
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"--efficiency={self.efficiency} must be in (0, 1].")

    def bandwidth(self, group_span: int) -> float:
        """Bytes/s of a ring over ranks spanning `group_span` consecutive ranks."""
        gbps = self.intra_gbps if group_span <= self.gpus_per_node else self.inter_gbps
        return gbps * 1e9


def _ring(nbytes: float, n: int, bandwidth: float, all_reduce: bool = False) -> float:
    """Seconds of a ring reduce-scatter / all-gather (all-reduce: both) of `nbytes`."""
    if n == 1:
        return 0.0
    return (2 if all_reduce else 1) * (n - 1) / n * nbytes / bandwidth


def step_time(cfg: Config, cluster: Cluster) -> dict:
    """Predicted seconds of one optimizer step, by part (see the module docstring)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    e, h, b = BYTES[t.precision], m.hidden_size, t.micro_batch_size
    s, v, micro = t.seq_len // p.sp, p.virtual_stages, cfg.grad_accum_steps
    f = flops(cfg)
    tokens = t.global_batch_size * t.seq_len
    head_per_token = 6.0 * h * m.vocab_size
    blocks_hw = f["hardware_flops_per_iteration"] / tokens - head_per_token
    # per micro-batch and GPU: the busiest stage holds L/pp layers and the head
    mb_tokens = b * s / p.tp
    stage_flops = mb_tokens * (blocks_hw / p.pp + head_per_token)
    rate = cluster.peak_tflops * 1e12 * cluster.efficiency
    t_mb = stage_flops / rate
    t_fwd = mb_tokens * (f["flops_per_token"] - head_per_token) / 3 / p.pp / rate
    t_bwd = t_mb - t_fwd
    layers = m.num_layers / p.pp
    activation = e * b * s * h
    # All-reduce equivalents per block (an all-gather or a reduce-scatter is half of one),
    # Megatron's (tests/test_tp_collectives.py): tp 2 forward + 2 backward; tp_sp (2 AG +
    # 2 RS) + (4 AG + 2 RS); full recomputation repeats the forward's but its last
    # reduction.
    full = t.recompute == "full"
    passes = 5 + 1.5 * full if p.tp_sp else 4 + full
    tp_comm = micro * layers * passes * _ring(activation, p.tp, cluster.bandwidth(p.tp), True)
    kv_width = m.num_kv_heads * (h // m.num_heads) / p.tp
    sp_bw = cluster.bandwidth(p.tp * p.sp)
    reruns = 2 if t.recompute != "none" else 1  # the attention core runs again
    if p.sp == 1:
        sp_layer = 0.0
    elif p.sp_mode == "ring":
        hop = 2 * e * b * s * kv_width / sp_bw
        sp_layer = (p.sp - 1) * hop * (reruns + 1 + 4 / e)  # k/v forward(s), again + fp32 dk/dv
    else:
        widths = 2 * h / p.tp + 2 * kv_width  # q, out, k, v
        sp_layer = (reruns + 1) * _ring(e * b * s * widths, p.sp, sp_bw)  # forward(s), backward
    sp_comm = micro * layers * sp_layer
    pp_bw = cluster.bandwidth(cluster.world) if p.pp > 1 else 1.0
    message = activation / (p.tp if p.tp_sp else 1)
    pp_comm = 2 * v * micro * message / pp_bw if p.pp > 1 else 0.0
    dp_comm = _dp_time(cfg, cluster, t_fwd, t_bwd)
    parts = {"compute": micro * t_mb, "bubble": (p.pp - 1) / v * t_mb, "tp_comm": tp_comm,
             "sp_comm": sp_comm, "pp_comm": pp_comm, "dp_comm": dp_comm}
    parts["total"] = sum(parts.values())
    return parts


def _dp_time(cfg: Config, cluster: Cluster, t_fwd: float, t_bwd: float) -> float:
    """Exposed seconds of the dp x sp traffic of one step (see the module docstring)."""
    p, t = cfg.parallel, cfg.train
    n, micro = p.dp * p.sp, cfg.grad_accum_steps
    if n == 1:
        return 0.0
    shard, replicas = zero_groups(cfg)
    # A replica group's members sit one shard block apart, so it spans all of dp x sp.
    shard_bw, replica_bw = cluster.bandwidth(p.tp * shard), cluster.bandwidth(p.tp * n)
    psi = state_bytes(cfg, 0, exact=False)["psi"]
    grads = psi * BYTES[t.grad_dtype]  # buckets reduce in grad_dtype (ZeRO 2/3 add to fp32)
    params = psi * BYTES[t.precision]
    if p.zero == 0:
        return max(0.0, _ring(grads, n, replica_bw, True) - t_bwd)
    reduce = _ring(grads, shard, shard_bw) + _ring(grads / shard, replicas, replica_bw, True)
    gather = _ring(params, shard, shard_bw)
    if p.zero == 1:
        return max(0.0, reduce - t_bwd) + gather
    exposed = micro * max(0.0, reduce - t_bwd)
    if p.zero == 2:
        return exposed + gather
    return exposed + micro * (max(0.0, gather - t_fwd) + max(0.0, gather - t_bwd))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def hybrid_shard(dp_sp: int, tp: int, cluster: Cluster) -> int:
    """The zero_shard that keeps a ZeRO shard group in a node, or 0 when dp x sp fits in
    one anyway or no block of more than one rank does: the largest divisor N of dp * sp
    whose N * tp ranks divide a node (so that no block straddles two nodes)."""
    if dp_sp * tp <= cluster.gpus_per_node:
        return 0
    shard = max(d for d in _divisors(dp_sp) if cluster.gpus_per_node % (d * tp) == 0)
    return shard if shard > 1 else 0  # a shard of one rank is ZeRO 0's memory


def candidates(cfg: Config, cluster: Cluster):
    """Every layout of the cluster's GPUs the config allows, as prepared configs."""
    m, t = cfg.model, cfg.train
    tps = [d for d in _divisors(cluster.gpus_per_node) if d & (d - 1) == 0]
    for tp in tps:
        for pp in _divisors(m.num_layers):
            for sp in SP_SIZES if m.dropout == 0 else (1,):
                if cluster.world % (tp * pp * sp):
                    continue
                dp = cluster.world // (tp * pp * sp)
                hybrid = hybrid_shard(dp * sp, tp, cluster)
                shardings = [(zero, shard) for zero in ((0, 1, 2, 3) if pp == 1 else (0, 1, 2))
                             for shard in ((0, hybrid) if zero and hybrid else (0,))]
                for zero, shard in shardings:
                    for v in VIRTUAL_STAGES if pp > 1 else (1,):
                        for mbs in MICRO_BATCH_SIZES:
                            micro, rest = divmod(t.global_batch_size, mbs * dp)
                            if rest or micro < pp or m.num_layers % (pp * v) or \
                                    (v > 1 and micro % pp):
                                continue
                            for recompute in RECOMPUTE:
                                candidate = _with_layout(cfg, tp, pp, dp, sp, (zero, shard),
                                                         v, mbs, recompute)
                                if candidate is not None:
                                    yield candidate


def _with_layout(cfg, tp, pp, dp, sp, sharding, v, mbs, recompute) -> Config | None:
    zero, zero_shard = sharding
    parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, dp=dp, sp=sp, zero=zero,
                                   zero_shard=zero_shard, tp_sp=tp > 1, virtual_stages=v,
                                   stage_layers="",
                                   schedule="interleaved" if v > 1 else "1f1b")
    train = dataclasses.replace(cfg.train, micro_batch_size=mbs, recompute=recompute)
    candidate = dataclasses.replace(cfg, parallel=parallel, train=train)
    try:
        check_layout(candidate)
    except ConfigError:
        return None
    return candidate


LAYOUT_KEYS = ("parallel.tp", "parallel.pp", "parallel.dp", "parallel.sp", "parallel.tp_sp",
               "parallel.zero", "parallel.zero_shard", "parallel.schedule",
               "parallel.virtual_stages", "train.micro_batch_size", "train.recompute")


def layout_of(cfg: Config) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
            for key in LAYOUT_KEYS}


def _sized(cfg: Config, cluster: Cluster, only: dict | None):
    """(candidate, its layout, device bytes of its most loaded rank, host optimizer bytes
    per node) of every candidate layout allowed by `only`."""
    for candidate in candidates(cfg, cluster):
        layout = layout_of(candidate)
        if any(layout[key] not in allowed for key, allowed in (only or {}).items()):
            continue
        stages = [stage_memory(candidate, r, exact=False)
                  for r in sorted({0, candidate.parallel.pp - 1})]
        worst = max(stages, key=lambda st: st["memory_bytes"]["total"])
        host = max(st["host_optimizer_bytes"] for st in stages) * cluster.gpus_per_node
        yield candidate, layout, worst["memory_bytes"], host


def _no_fit(cfg: Config, cluster: Cluster, smallest, only) -> str:
    """Why no layout fits: the least device memory any layout needs, and with the
    optimizer in host memory (optim.offload=cpu) the device and host memory it needs."""
    gib = 2 ** 30
    gpus = f"{cluster.world} GPU{'s' if cluster.world > 1 else ''}"
    need = (f"the smallest layout needs {smallest / gib:.1f} GiB per GPU" if smallest
            else "no layout divides the global batch")
    text = (f"no layout of {gpus} fits the model in {cluster.gpu_memory_gb:g} GiB per GPU "
            f"({USABLE_FRACTION:.0%} usable) with train.global_batch_size="
            f"{cfg.train.global_batch_size}: {need}.")
    if smallest and cfg.optim.offload == "none":
        offloaded = copy.deepcopy(cfg)
        offloaded.optim.offload = "cpu"
        least = min(((m["total"], host) for *_, m, host in _sized(offloaded, cluster, only)),
                    default=None)
        if least:
            text += (f" With the optimizer in host memory (--optim.offload=cpu) it needs "
                     f"{least[0] / gib:.1f} GiB per GPU and {least[1] / gib:.1f} GiB of host "
                     f"memory per node.")
    return text + (" Add nodes (--nodes), use GPUs with more memory (--gpu-memory-gb), or "
                   "make the global batch a multiple of the GPU count.")


def plan(cfg: Config, cluster: Cluster, top: int = 10, only: dict | None = None) -> list[dict]:
    """The `top` fitting layouts, fastest first: layout, memory per rank, step time, MFU.
    `only` maps layout keys (LAYOUT_KEYS) to the values allowed, e.g. {"parallel.zero": (0,)}."""
    cluster.check()
    budget = cluster.gpu_memory_gb * 2 ** 30 * USABLE_FRACTION
    results, smallest = [], None
    for candidate, layout, memory, _ in _sized(cfg, cluster, only):
        smallest = min(smallest or memory["total"], memory["total"])
        if memory["total"] > budget:
            continue
        times = step_time(candidate, cluster)
        model_flops = flops(candidate)["flops_per_iteration"]
        mfu = model_flops / (times["total"] * cluster.world * cluster.peak_tflops * 1e12)
        results.append({"layout": layout, "memory_bytes": memory,
                        "step_time": times, "mfu": mfu})
    if not results:
        raise ConfigError(_no_fit(cfg, cluster, smallest, only))
    results.sort(key=lambda r: r["step_time"]["total"])
    return results[:top]


def command_line(config_path: str | None, overrides: list[tuple[str, str]], layout: dict,
                 cluster: Cluster) -> str:
    """The launch.sh command that runs a layout (user overrides kept, layout keys set)."""
    env = (f"NNODES={cluster.nodes} NPROC_PER_NODE={cluster.gpus_per_node} NODE_RANK=<n> "
           f"MASTER_ADDR=<host> " if cluster.nodes > 1 else "")
    kept = [f"--{k}={v}" for k, v in overrides if k not in layout]
    chosen = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
              for k, v in layout.items()]
    return " ".join([f"{env}./launch.sh", *([config_path] if config_path else []),
                     *kept, *chosen])
