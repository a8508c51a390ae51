"""Memory per rank and FLOPs of a config and layout, or the layouts that fit a cluster.

    python tools/estimate.py [--config] CONFIG.yaml [--section.key=value ...] [--json]
    python tools/estimate.py CONFIG.yaml --plan [--gpus-per-node 8] [--nodes 1]
        [--gpu-memory-gb 80] [--peak-tflops 989] [--intra-gbps 450] [--inter-gbps 50]
        [--efficiency 0.5] [--top 10] [--json] [--write FILE]

No data or weights are read; model.vocab_size 0 is the vocabulary of the tokenizer the
config names (data.tokenizer, that of data.paths, or the default one: data.vocab_size
until it is trained). The device is train.device, cuda when it is auto.

Without --plan: parameters, FLOPs per iteration and the bytes per rank of every
pipeline stage (params, grads, optimizer, activations, buffers), the most loaded first
in --json's `memory_bytes`, and the ZeRO shard size and replica count
(`zero_shard_size`, `zero_replicas`: parallel.zero_shard's hybrid sharding).

With --plan: the fastest layouts of nodes x gpus-per-node GPUs that fit (layout keys
given as overrides, say --parallel.zero=3, stay as given), each with the launch.sh
command that runs it (shard: zero_shard, "all" for one shard over dp x sp); when none
fits, the memory the smallest needs, and with the optimizer in host memory. --write
FILE also writes the fastest as a config that builds on CONFIG (`base:`) and that
./launch.sh FILE runs (megalite/planning/layout_file.py).
Bandwidths are GB/s per GPU in one direction. See docs/estimate.md.
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports that need the project's Python
    from tools.project_python import use_project_python
    use_project_python()

from megalite.cli import run_main  # noqa: E402
from megalite.cli import parse_overrides  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.data.build import tokenizer_vocab_size  # noqa: E402
from megalite.errors import ConfigError  # noqa: E402
from megalite.planning.estimate import MEMORY_KEYS, estimate, prepare  # noqa: E402
from megalite.planning.layout_file import layout_file_text, write_layout_file  # noqa: E402
from megalite.planning.planner import (LAYOUT_KEYS, Cluster, command_line, layout_of,  # noqa: E402
                                       plan)

SWITCHES = ("json", "plan")
# --gpus-per-node 8 ... : the planner's Cluster fields, with its defaults
CLUSTER_FLAGS = {f.name.replace("_", "-"): (int if f.type == "int" else float, f.default)
                 for f in dataclasses.fields(Cluster)}
GIB = 2 ** 30


def parse(argv: list[str]):
    """(config path, overrides, switches, flags) from the command line."""
    switches = {s for s in SWITCHES if f"--{s}" in argv}
    argv = [a for a in argv if a.lstrip("-") not in switches or not a.startswith("--")]
    path = None
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
    overrides, flags = parse_overrides(argv)
    path = flags.pop("config", path)
    known = set(CLUSTER_FLAGS) | {"top", "write"}
    for flag in flags:
        if flag not in known:
            raise ConfigError(f"unknown flag '--{flag}'. Known: --config, --json, --plan, "
                              f"{', '.join('--' + k for k in sorted(known))}; config keys "
                              f"look like --model.hidden_size=1024.")
    values = {"write": flags.get("write")}
    for flag, (kind, default) in {**CLUSTER_FLAGS, "top": (int, 10)}.items():
        try:
            values[flag] = kind(flags.get(flag, default))
        except ValueError:
            raise ConfigError(f"--{flag}={flags[flag]!r} must be a number "
                              f"({kind.__name__}), e.g. --{flag}={default}.") from None
    return path, overrides, switches, values


def estimate_main(argv: list[str]) -> int:
    path, overrides, switches, values = parse(argv)
    cfg = load_config(path, overrides)
    if not cfg.model.vocab_size:
        cfg.model.vocab_size, source = tokenizer_vocab_size(cfg)
        print(f"[megalite] vocabulary {cfg.model.vocab_size:,} from {source}", file=sys.stderr)
    if "plan" in switches:
        cluster = Cluster(**{k.replace("-", "_"): v for k, v in values.items()
                             if k in CLUSTER_FLAGS})
        # layout keys given on the command line are kept; the planner chooses the others
        only = {key: (layout_of(cfg)[key],) for key, _ in overrides if key in LAYOUT_KEYS}
        plans = plan(prepare(cfg, check=False), cluster, values["top"], only)
        for p in plans:
            p["command"] = command_line(path, overrides, p["layout"], cluster)
        if values["write"]:
            target = Path(values["write"])
            write_layout_file(target, layout_file_text(path, target, overrides, plans[0],
                                                       cluster))
            print(f"[megalite] wrote the fastest layout to {target}", file=sys.stderr)
        if "json" in switches:
            print(json.dumps({"cluster": vars(cluster), "plans": plans}, indent=1))
        else:
            print_plans(plans, cluster)
        return 0
    if values["write"]:
        raise ConfigError("--write FILE writes the layout --plan chooses; add --plan.")
    cfg = prepare(cfg)
    result = estimate(cfg)
    result["layout"] = layout_of(cfg)
    result["device"] = cfg.train.device
    if "json" in switches:
        print(json.dumps(result, indent=1))
    else:
        print_estimate(result, cfg)
    return 0


def print_estimate(result: dict, cfg) -> None:
    m, t = cfg.model, cfg.train
    print(f"model: {m.preset}, {result['param_count'] / 1e9:.3f} B parameters, "
          f"{result['flops_per_iteration']:.3e} model FLOPs per iteration "
          f"({result['hardware_flops_per_iteration']:.3e} with recomputation)")
    layout = " ".join(f"{k.split('.')[1]}={v}" for k, v in result["layout"].items())
    print(f"layout: {layout}, {t.precision}, {result['device']}, kernels={m.kernels}, "
          f"attention={m.attention}, {cfg.grad_accum_steps} micro-batches per step")
    if cfg.parallel.zero:
        print(f"ZeRO {cfg.parallel.zero}: state sharded over {result['zero_shard_size']} "
              f"ranks, {result['zero_replicas']} replica(s) of each shard")
    header = ["stage", *MEMORY_KEYS, "total", "in flight"]
    print("GiB per rank  " + "".join(f"{h:>12}" for h in header[1:]))
    for stage in result["stages"]:
        mem = stage["memory_bytes"]
        row = [mem[k] / GIB for k in (*MEMORY_KEYS, "total")]
        print(f"stage {stage['pp_rank']:<7}" + "".join(f"{x:12.3f}" for x in row) +
              f"{stage['micro_batches_in_flight']:12d}")
    worst = result["stages"][[s["pp_rank"] for s in result["stages"]]
                             .index(result["most_loaded_stage"])]
    print(f"most loaded: stage {worst['pp_rank']}, {worst['memory_bytes']['total'] / GIB:.3f} "
          f"GiB; buffers: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in worst["buffers"].items()))
    if worst["host_optimizer_bytes"]:
        print(f"optimizer state in CPU memory: {worst['host_optimizer_bytes'] / GIB:.3f} GiB")


def print_plans(plans: list[dict], cluster: Cluster) -> None:
    print(f"{cluster.world} GPUs ({cluster.nodes} x {cluster.gpus_per_node}), "
          f"{cluster.gpu_memory_gb} GiB, {cluster.peak_tflops} TFLOP/s at "
          f"{cluster.efficiency:.0%}, {cluster.intra_gbps}/{cluster.inter_gbps} GB/s")
    print(f"{'#':>2} {'tp':>3} {'pp':>3} {'dp':>4} {'sp':>3} {'v':>2} {'mbs':>3} {'zero':>4} "
          f"{'shard':>5} {'recompute':>9} {'GiB':>7} {'step s':>8} {'bubble':>7} {'comm':>7} "
          f"{'MFU':>6}")
    for i, p in enumerate(plans, 1):
        lay, times = p["layout"], p["step_time"]
        comm = sum(times[k] for k in ("tp_comm", "sp_comm", "pp_comm", "dp_comm"))
        print(f"{i:>2} {lay['parallel.tp']:>3} {lay['parallel.pp']:>3} {lay['parallel.dp']:>4} "
              f"{lay['parallel.sp']:>3} {lay['parallel.virtual_stages']:>2} "
              f"{lay['train.micro_batch_size']:>3} {lay['parallel.zero']:>4} "
              f"{lay['parallel.zero_shard'] or 'all':>5} {lay['train.recompute']:>9} "
              f"{p['memory_bytes']['total'] / GIB:7.1f} "
              f"{times['total']:8.3f} {times['bubble']:7.3f} {comm:7.3f} {p['mfu']:6.1%}")
        print(f"   {p['command']}")


if __name__ == "__main__":
    sys.exit(run_main(estimate_main))
