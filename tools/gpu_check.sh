#!/usr/bin/env bash
# The GPU check: what megalite can only show on a CUDA GPU, in one run of at most five
# minutes on one H100/H200, everything it produces written to ONE folder (7 files).
#
#   bash tools/gpu_check.sh [OUT_DIR]        # OUT_DIR: $1, else $OUT, else gpu_check_out/
#   GPU_CHECK_STAGES="bench_kernels" bash tools/gpu_check.sh out/   # only some stages
#
# Stages, each under `timeout`, all within GPU_CHECK_BUDGET_S (default 290) seconds; a
# failing stage does not stop the others, and the script then exits 1:
#   tests          the tests that need CUDA to mean anything: tests/test_kernels.py (bf16,
#                  head dims 64 and 128, GPU-sized shapes, autotuning) and
#                  tests/test_kernel_model.py, in four pytest processes (attention in
#                  fp32 / fp16 / bf16, the rest) that run while ...
#   train          ... configs/tiny.yaml trains in one process on CUDA, bf16, ZeRO 1, for
#                  10 steps and saves; a second process resumes it to step 20. Both with
#                  MEGALITE_SYNC_DEBUG=1; metrics.jsonl must hold steps 5, 10, 15 and 20.
#   bench_train    tools/bench_gpu_train.py: a 1.1B llama through megalite's Trainer
#                  against plain PyTorch + torch.compile (tokens/s, MFU, peak memory).
#   bench_kernels  tools/bench_kernels.py --vocab 32000: each kernel against torch eager,
#                  torch.compile and the measured copy-bandwidth / matmul ceiling.
# The benchmarks run alone on the GPU; the tests and the short training share it, since
# their timings do not matter.
#
# It runs from the repo root with the machine's own python3 (PYTHON overrides it) and
# PYTHONPATH=., without the .venv bootstrap of tools/env.sh: the GPU machine has its own
# torch and triton and no package registry. Without a CUDA GPU it says so and exits 0
# having written nothing (tests/test_gpu_check.py runs that path).
#
# Output: summary.txt (environment, every stage's status and time, the training table),
# tests.log, train_resume.log, train_metrics.jsonl, bench_gpu_train.log,
# bench_kernels.log, and BENCHMARKS.md: the sections both benchmarks append to the
# repo's BENCHMARKS.md (date, device, command), which itself is left as it was.
set -uo pipefail
SECONDS=0
caller_dir=$PWD
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# The tests pick the Triton interpreter when this is set; on a GPU they must not.
unset TRITON_INTERPRET
BUDGET_S="${GPU_CHECK_BUDGET_S:-290}"
STAGES=" ${GPU_CHECK_STAGES:-tests train bench_train bench_kernels} "
# Expected seconds of the benchmarks, kept free for them while the earlier stages run.
RESERVE_BENCH_TRAIN=80
RESERVE_BENCH_KERNELS=90

# ---- no GPU: say so, write nothing ----------------------------------------------------
if ! probe=$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.is_available())' 2>&1); then
  echo "gpu_check: '$PY' cannot import torch, so nothing can be checked:" >&2
  echo "$probe" | tail -n 3 >&2
  exit 1
fi
if [ "$(echo "$probe" | tail -n 1)" != "True" ]; then
  echo "gpu_check: this check needs a CUDA GPU and torch sees none here; nothing was run" \
       "and nothing was written."
  exit 0
fi

out_arg="${1:-${OUT:-}}"
if [ -z "$out_arg" ]; then
  OUT_DIR="$ROOT/gpu_check_out"
elif [[ "$out_arg" = /* ]]; then
  OUT_DIR="$out_arg"
else
  OUT_DIR="$caller_dir/$out_arg"
fi
mkdir -p "$OUT_DIR" || exit 1
# A second run into the same folder replaces the first one's files instead of appending.
rm -f "$OUT_DIR"/{summary.txt,tests.log,train_resume.log,train_metrics.jsonl} \
      "$OUT_DIR"/{bench_gpu_train.log,bench_kernels.log,BENCHMARKS.md}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 1
SUMMARY="$OUT_DIR/summary.txt"
test_pids=()

cleanup() {
  local pid
  for pid in "${test_pids[@]}"; do  # each a subshell waiting on its `timeout`
    pkill -TERM -P "$pid" 2>/dev/null
    kill "$pid" 2>/dev/null
  done
  # An interrupted bench_kernels must not leave its rows in the repo's BENCHMARKS.md.
  if [ -f "$WORK/BENCHMARKS.md.orig" ]; then
    cp "$WORK/BENCHMARKS.md.orig" "$ROOT/BENCHMARKS.md"
  elif [ -f "$WORK/BENCHMARKS.md.absent" ]; then
    rm -f "$ROOT/BENCHMARKS.md"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

banner() { printf '\n======== %s ========\n' "$*"; }
selected() { [[ "$STAGES" == *" $1 "* ]]; }

# Seconds a step may take: at most CAP, and it must end by second END of the run.
limit() {
  local left=$(($2 - SECONDS))
  echo $((left < $1 ? left : $1))
}

# run_limited SECONDS CMD...: CMD under timeout (TERM, then KILL 5 s later). A megalite
# run saves and exits 0 on TERM, so the timeout is read from the exit code 124/137.
run_limited() {
  local seconds=$1
  shift
  if [ "$seconds" -lt 10 ]; then
    echo "gpu_check: skipped, only ${seconds}s left of the ${BUDGET_S}s budget: $*"
    return 125
  fi
  timeout --kill-after=5 "$seconds" "$@"
  local rc=$?
  case "$rc" in 124 | 137) echo "gpu_check: timed out after ${seconds}s: $*" ;; esac
  return "$rc"
}

explain() {  # exit code -> words
  case "$1" in
    0) echo "ok" ;;
    124 | 137) echo "timed out" ;;
    125) echo "skipped: no time left" ;;
    *) echo "exit code $1" ;;
  esac
}

failed_any=0
: >"$WORK/stages"
# record STAGE STATUS START_SECOND DETAIL
record() {
  [ "$2" = PASS ] || failed_any=1
  printf '%-14s %-5s %4ss  %s\n' "$1" "$2" "$((SECONDS - $3))" "$4" >>"$WORK/stages"
  write_summary
}

write_summary() {
  {
    cat "$WORK/env"
    echo
    echo "stage          status  time  detail"
    cat "$WORK/stages"
  } >"$SUMMARY"
}

# ---- environment ----------------------------------------------------------------------
{
  echo "gpu_check $(date '+%Y-%m-%d %H:%M:%S'), host $(hostname), commit" \
       "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), stages:$STAGES"
  timeout 60 "$PY" - <<'EOF'
import importlib
import platform

import torch

props = torch.cuda.get_device_properties(0)
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} GPU(s) visible, using {props.name} "
      f"({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)")
missing, found = [], []
for name in ("triton", "numpy", "sentencepiece", "safetensors", "yaml", "einops", "pytest"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception:
        missing.append(name)
print("packages: " + ", ".join(found))
if missing:
    print("MISSING packages: " + ", ".join(missing))
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
    --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
} >"$WORK/env" 2>&1
write_summary
grep -q "^MISSING" "$WORK/env" && record env FAIL 0 "$(grep '^MISSING' "$WORK/env")"

# The tests and the short training share the time before the benchmarks.
slot_end=$BUDGET_S
selected bench_train && slot_end=$((slot_end - RESERVE_BENCH_TRAIN))
selected bench_kernels && slot_end=$((slot_end - RESERVE_BENCH_KERNELS))

# ---- tests (in the background) --------------------------------------------------------
# Four pytest processes, so Triton compiles (autotuning: every config of every kernel,
# per head dim and dtype) on four cores at once. dtype0/1/2 are pytest's ids of
# test_kernels.py's DTYPES (fp32, fp16, bf16); the four selections cover every test.
TEST_PARTS=(attention_fp32 attention_fp16 attention_bf16 rest)
test_selection() {
  case "$1" in
    attention_fp32) selection=(tests/test_kernels.py -k "attention and not dtype1 and not dtype2") ;;
    attention_fp16) selection=(tests/test_kernels.py -k "attention and dtype1") ;;
    attention_bf16) selection=(tests/test_kernels.py -k "attention and dtype2") ;;
    rest) selection=(tests/test_kernels.py tests/test_kernel_model.py tests/test_offload.py
                     -k "not attention") ;;
  esac
}

start_tests() {
  local seconds part selection
  seconds=$(limit 150 "$slot_end")
  tests_start=$SECONDS
  for part in "${TEST_PARTS[@]}"; do
    test_selection "$part"
    (
      run_limited "$seconds" "$PY" -m pytest -q -p no:cacheprovider -rfEs "${selection[@]}" \
        >"$WORK/tests_$part.log" 2>&1
      echo $? >"$WORK/tests_$part.rc"
    ) &
    test_pids+=($!)
  done
}

finish_tests() {
  local part rc status=PASS detail="" selection
  wait "${test_pids[@]}"
  test_pids=()
  : >"$OUT_DIR/tests.log"
  for part in "${TEST_PARTS[@]}"; do
    rc=$(cat "$WORK/tests_$part.rc" 2>/dev/null || echo 1)
    test_selection "$part"
    {
      banner "pytest ($part: ${selection[*]}): $(explain "$rc")"
      cat "$WORK/tests_$part.log"
    } >>"$OUT_DIR/tests.log"
    [ "$rc" -eq 0 ] || status=FAIL
    case "$rc" in
      124 | 125 | 137) detail+="$part: $(explain "$rc"); " ;;
      *) detail+="$part: $(grep -v '^\s*$' "$WORK/tests_$part.log" | tail -n 1 | tr -d '=' |
                           sed 's/^ *//') ($(explain "$rc")); " ;;
    esac
  done
  record tests "$status" "$tests_start" "${detail%; }"
}

# ---- train, save, resume --------------------------------------------------------------
# One part of stage_train (whose $log, $start and $slot_end it uses): a banner and the
# command, under its limit, into the stage's log; a failure is recorded as the stage's.
train_part() {  # train_part SECONDS WHAT TITLE COMMAND...
  local seconds=$1 what=$2 title=$3 part_rc
  shift 3
  { banner "$title"; run_limited "$(limit "$seconds" "$slot_end")" "$@"; } >>"$log" 2>&1
  part_rc=$?
  [ "$part_rc" -eq 0 ] ||
    record train FAIL "$start" "$what: $(explain "$part_rc") (train_resume.log)"
  return "$part_rc"
}

stage_train() {
  local start=$SECONDS log="$OUT_DIR/train_resume.log" run="$WORK/tiny_run" rc check
  local args=(configs/tiny.yaml --train.device=cuda --train.precision=bf16 --parallel.zero=1
              --parallel.tp=1 --parallel.pp=1 --parallel.dp=1 --parallel.sp=1
              --checkpoint.every=10 --log.every=5 "--run.dir=$run")
  train_part 60 "data preparation" \
      "data: the default corpus of configs/tiny.yaml (prepared once into data_cache/)" \
      "$PY" -m megalite.preflight "${args[@]}" --train.steps=10 || return
  train_part 90 "steps 1-10" \
      "train: steps 1-10 on CUDA, bf16, ZeRO 1, checkpoint at 10, MEGALITE_SYNC_DEBUG=1" \
      env MEGALITE_SYNC_DEBUG=1 "$PY" -m megalite.train "${args[@]}" --train.steps=10 || return
  train_part 60 "resumed steps 11-20" \
      "resume: steps 11-20 from the latest checkpoint, MEGALITE_SYNC_DEBUG=1" \
      env MEGALITE_SYNC_DEBUG=1 "$PY" -m megalite.train "${args[@]}" --train.steps=20 \
      --resume_from_checkpoint latest
  rc=$?
  [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl"
  [ "$rc" -eq 0 ] || return
  if ! grep -q "resumed from .* at step 10" "$log"; then
    record train FAIL "$start" "the second run did not report resuming at step 10"
    return
  fi
  check=$("$PY" - "$run/metrics.jsonl" 2>&1 <<'EOF'
import json
import math
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steps = [r for r in rows if r.get("loss") is not None]
ok = ([r["step"] for r in steps] == [5, 10, 15, 20]
      and all(math.isfinite(r["loss"]) for r in steps))
losses = ", ".join(f"{r['step']}: {r['loss']:.4f}" for r in steps)
last = steps[-1] if steps else {}
mfu = last.get("mfu")
print(f"logged losses {losses}; device {last.get('device')}, "
      f"{last.get('tokens_per_s') or 0:,.0f} tokens/s, mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
      + ("" if ok else " -- expected finite losses at exactly steps 5, 10, 15, 20"))
sys.exit(0 if ok else 1)
EOF
  )
  rc=$?
  echo "metrics check: $check" >>"$log"
  if [ "$rc" -eq 0 ]; then
    record train PASS "$start" "resumed at step 10; $check"
  else
    record train FAIL "$start" "metrics.jsonl: $check"
  fi
}

# ---- benchmarks -----------------------------------------------------------------------
stage_bench_train() {
  local start=$SECONDS end=$BUDGET_S rc
  selected bench_kernels && end=$((end - RESERVE_BENCH_KERNELS))
  run_limited "$(limit 150 "$end")" "$PY" tools/bench_gpu_train.py \
    --record "$OUT_DIR/BENCHMARKS.md" >"$OUT_DIR/bench_gpu_train.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    record bench_train PASS "$start" "table in BENCHMARKS.md and below"
  else
    record bench_train FAIL "$start" "$(explain "$rc") (bench_gpu_train.log)"
  fi
}

stage_bench_kernels() {
  local start=$SECONDS rc size=0 broken
  # --record appends to the repo's BENCHMARKS.md: keep a copy, move the new rows to
  # the output folder, put the copy back.
  if [ -f BENCHMARKS.md ]; then
    cp BENCHMARKS.md "$WORK/BENCHMARKS.md.orig"
    size=$(wc -c <BENCHMARKS.md)
  else
    touch "$WORK/BENCHMARKS.md.absent"
  fi
  run_limited "$(limit 150 "$BUDGET_S")" "$PY" tools/bench_kernels.py --vocab 32000 --record \
    >"$OUT_DIR/bench_kernels.log" 2>&1
  rc=$?
  if [ -f BENCHMARKS.md ]; then
    tail -c +"$((size + 1))" BENCHMARKS.md >>"$OUT_DIR/BENCHMARKS.md"
    echo "gpu_check: the rows appended above went to $OUT_DIR/BENCHMARKS.md; the repo's" \
         "BENCHMARKS.md is back as it was" >>"$OUT_DIR/bench_kernels.log"
  fi
  if [ -f "$WORK/BENCHMARKS.md.orig" ]; then
    cp "$WORK/BENCHMARKS.md.orig" BENCHMARKS.md && rm -f "$WORK/BENCHMARKS.md.orig"
  else
    rm -f BENCHMARKS.md "$WORK/BENCHMARKS.md.absent"
  fi
  # A row whose Triton time is n/a: that kernel failed (the bench keeps going).
  broken=$(awk -F'|' '/^\| [a-z_]+ \| / && $4 ~ /n\/a/ {print $2}' "$OUT_DIR/bench_kernels.log" |
           tr -s ' \n' ' ')
  if [ "$rc" -ne 0 ]; then
    record bench_kernels FAIL "$start" "$(explain "$rc") (bench_kernels.log)"
  elif [ -n "$broken" ]; then
    record bench_kernels FAIL "$start" "Triton failed for:$broken(bench_kernels.log)"
  else
    record bench_kernels PASS "$start" "$(grep -m1 '^Ceilings' "$OUT_DIR/bench_kernels.log")"
  fi
}

# ---- run ------------------------------------------------------------------------------
selected tests && start_tests
selected train && stage_train
selected tests && finish_tests
selected bench_train && stage_bench_train
selected bench_kernels && stage_bench_kernels

write_summary
{
  if [ -f "$OUT_DIR/bench_gpu_train.log" ]; then
    echo
    echo "Training throughput (tools/bench_gpu_train.py):"
    # The final table: from the last header on (the rows above it are progress lines).
    awk '/^\| implementation/ {table = ""} /^\||^megalite \/ plain/ {table = table $0 "\n"}
         END {printf "%s", table}' "$OUT_DIR/bench_gpu_train.log"
  fi
  echo
  if [ "$failed_any" -eq 0 ]; then verdict=PASS; else verdict=FAIL; fi
  echo "overall: $verdict after ${SECONDS}s; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
} >>"$SUMMARY"
cat "$SUMMARY"
[ "$failed_any" -eq 0 ]
