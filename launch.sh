#!/usr/bin/env bash
# megalite's main entry point: validate, prepare data, then train under torchrun.
#
#   ./launch.sh [CONFIG.yaml] [--section.key=value ...] [--resume_from_checkpoint latest|PATH]
#   (no CONFIG.yaml: configs/default.yaml)
#
# Environment: NPROC_PER_NODE (default on one node: the config's tp*pp*dp*sp), NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT (several nodes: c10d rendezvous at that address).
#
# Stopping: Ctrl-C (SIGINT) or a scheduler's SIGTERM is relayed to the workers only, so
# torchrun never sees a signal: the workers finish their step, save a checkpoint and
# exit 0, torchrun exits 0, and so does this script. A second signal kills them.
set -uo pipefail
cd "$(dirname "$0")"
source tools/env.sh
megalite_env || { echo "error: setting up .venv failed (see the pip output above)" >&2; exit 1; }

# No config file among the arguments: the default run (3-D parallel on 8 CPU ranks).
config_given=""
for arg in "$@"; do case "$arg" in --*) ;; *.yaml|*.yml) config_given=1 ;; esac; done
[ -n "$config_given" ] || set -- configs/default.yaml "$@"

# Every mistake that can be found before a worker starts is found here.
world=$(python -m megalite.preflight "$@" | tail -n 1)
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || exit "$status"

nnodes=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "$nnodes" -ne 1 ]; then
    echo "error: NNODES=$nnodes but NPROC_PER_NODE is unset; set it to the ranks per node" \
         "(the config needs $world ranks in all)." >&2
    exit 2
  fi
  NPROC_PER_NODE=$world
fi
if [ $((NPROC_PER_NODE * nnodes)) -ne "$world" ]; then
  echo "error: NPROC_PER_NODE=$NPROC_PER_NODE x NNODES=$nnodes = $((NPROC_PER_NODE * nnodes))" \
       "ranks, but the config's tp*pp*dp*sp is $world; change the layout or the launch." >&2
  exit 2
fi
if [ "$nnodes" -eq 1 ]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes="$nnodes" --node_rank="${NODE_RANK:-0}" --rdzv_backend=c10d
              --rdzv_id=megalite --rdzv_endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi

# Tensor parallelism overlaps its collectives with the GEMMs around them (parallel/
# column_group.py): on CUDA that needs the communication kernel queued first, which one
# hardware queue per device guarantees (Megatron sets the same). An explicit value wins.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# torchrun in its own session: a terminal's Ctrl-C reaches this script, not torchrun.
setsid python -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" \
  -m megalite.train "$@" &
torchrun_pid=$!
stopping=""
relay_stop() {
  if [ -n "$stopping" ]; then
    echo "[megalite] second signal: killing the workers" >&2
    kill -KILL -- "-$torchrun_pid" 2>/dev/null
    return
  fi
  stopping=1
  echo "[megalite] stop requested: workers finish the current step and save a checkpoint" >&2
  pkill -TERM -P "$torchrun_pid"
}
trap relay_stop INT TERM
while true; do
  wait "$torchrun_pid"
  status=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$status"
