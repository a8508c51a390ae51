#!/usr/bin/env bash
# megalite's main entry point: validate, prepare data, then train under torchrun.
#
#   ./launch.sh [CONFIG.yaml] [--section.key=value ...] [--resume_from_checkpoint latest|PATH]
#   (no CONFIG.yaml: configs/default.yaml)
#
# Environment (megalite/parallel/cluster.py): NPROC_PER_NODE (default: what the layout
# needs), NNODES (a count, or MIN:MAX: the run goes on when nodes leave, with
# parallel.dp=auto), NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID. Under srun (one task
# per node, examples/slurm.sbatch) those not set come from SLURM_*.
#
# Restarts: with run.max_restarts=N torchrun restarts the workers after a failure up to N
# times, each restart resuming from the latest checkpoint this launch saved. A launch
# resumes an earlier run only when asked (--resume_from_checkpoint).
#
# Stopping: SIGINT (Ctrl-C) or SIGTERM (a scheduler, `timeout`, a shutdown), reaching this
# script, torchrun or the workers, once or many times within run.stop_window_s (10 s) of
# the first, is one request: the workers finish their step, save a checkpoint and exit
# 0, and so does this script (its status comes from what the run recorded, not from
# torchrun's). A signal after the window kills the workers at once. SIGUSR1 saves a
# checkpoint after the current step and the run goes on (sbatch --signal=USR1@120).
set -uo pipefail
cd "$(dirname "$0")"
source tools/env.sh
megalite_env || { echo "error: setting up .venv failed (see the pip output above)" >&2; exit 1; }

# No config file among the arguments: the default run (3-D parallel on 8 CPU ranks).
config_given=""
for arg in "$@"; do case "$arg" in --*) ;; *.yaml|*.yml) config_given=1 ;; esac; done
[ -n "$config_given" ] || set -- configs/default.yaml "$@"

# When this launch began: a restarted worker resumes from a checkpoint saved after it.
export MEGALITE_LAUNCH_T="$(date +%s)"

# Every mistake that can be found before a worker starts is found here. Its stdout: the
# ranks to start, the stop window (seconds), the run directory, torchrun's arguments.
preflight=$(python -m megalite.preflight "$@")
status=$?
[ "$status" -eq 0 ] || exit "$status"
{ read -r world; read -r stop_window; read -r run_dir; read -ra torchrun_args; } <<< "$preflight"
echo "[megalite] $world ranks: torchrun ${torchrun_args[*]}" >&2

# Tensor parallelism overlaps its collectives with the GEMMs around them (parallel/
# column_linear.py): on CUDA that needs the communication kernel queued first, which one
# hardware queue per device guarantees (Megatron sets the same). An explicit value wins.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# What the run did, written by rank 0 after its last commit (megalite/parallel/torchrun.py
# turns it into the exit status); and what torchrun and its report need.
outcome_dir=$(mktemp -d)
export MEGALITE_OUTCOME_FILE="$outcome_dir/outcome.json" MEGALITE_STOP_WINDOW_S="$stop_window" \
       MEGALITE_RUN_DIR="$run_dir"

# torchrun in its own session: a terminal's Ctrl-C reaches this script, which relays it.
setsid python -m megalite.parallel.torchrun "${torchrun_args[@]}" -m megalite.train "$@" &
torchrun_pid=$!
first_stop=""
relay_stop() {
  local now=$SECONDS
  if [ -z "$first_stop" ]; then
    first_stop=$now
    echo "[megalite] stop requested: workers finish the current step and save a checkpoint" >&2
    # builtin kill, to torchrun's whole session (torchrun forwards it too: one request):
    # `timeout` relays a signal to its process group, which would kill a forked pkill
    kill -TERM -- "-$torchrun_pid" 2>/dev/null
  elif [ $((now - first_stop)) -ge "${stop_window%.*}" ]; then
    echo "[megalite] another signal $((now - first_stop)) s after the stop request: killing" \
         "the workers" >&2
    kill -KILL -- "-$torchrun_pid" 2>/dev/null
  fi  # else: a copy of the same request (terminal + timeout, scancel to every process)
}
relay_save() {
  echo "[megalite] SIGUSR1: the workers save a checkpoint after this step and go on" >&2
  kill -USR1 -- "-$torchrun_pid" 2>/dev/null  # torchrun ignores it, the workers save
}
trap relay_stop INT TERM
trap relay_save USR1
while true; do
  wait "$torchrun_pid"
  status=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
rm -rf "$outcome_dir"
exit "$status"
