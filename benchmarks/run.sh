#!/usr/bin/env bash
# Benchmark modelserve against Triton (PyTriton), MLServer and KServe with NVIDIA's
# perf_analyzer, using the benchmark lab in shared/bench (same load settings, one table).
#
#   benchmarks/run.sh [compare.py args...]
#   benchmarks/run.sh --servers --models mlp --concurrency 1 --pin off   # modelserve only, quick
#   benchmarks/run.sh --servers triton --pin off --concurrency 1 8 32    # us vs Triton
#   benchmarks/run.sh                                                     # everything (~30+ min)
#
# Steps: (1) copy the lab ($BENCH_SRC) to a writable dir ($BENCH_DIR, default $REPO/.bench)
# if not there yet, (2) run its setup.sh once (venvs, perf_analyzer 2.60, models; ~3 GB),
# (3) build a modelserve model repository $BENCH_DIR/repo/<model>/1/model.onnx + config.pbtxt,
# (4) run the lab's run_all.sh (raw ORT + compare.py) with modelserve added as an "extra"
# server that compare.py starts, waits for, loads and stops itself.
# Results: $BENCH_DIR/results/<timestamp>/{table.md,results.json,*.log,*.csv}
#
# Environment:
#   BENCH_SRC        lab source                  (default: <repo>/../shared/bench)
#   BENCH_DIR        writable lab copy           (default: <repo>/.bench, git-ignored)
#   MODELSERVE_BIN   server CLI                  (default: <repo>/.venv/bin/modelserve)
#   MS_HTTP_PORT / MS_GRPC_PORT                  (default: 9000 / 9001)
#   MAX_BATCH_SIZE                               (default: 32)
#   PREFERRED_BATCH_SIZES  space separated, "" = omit  (default: "8 16 32")
#   MAX_QUEUE_DELAY_US                           (default: 2000, as the lab's Triton)
#   BENCH_RAW=0      skip the raw-onnxruntime pass of run_all.sh (calls compare.py directly)
#   BENCH_MODELS     models to serve             (default: resnet18 mlp; --models also filters)
#   BENCH_DRY_RUN=1  set up, build the repository, print the run_all.sh command, stop
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || dirname "$HERE")"
BENCH_SRC="${BENCH_SRC:-$REPO/../shared/bench}"
BENCH_DIR="${BENCH_DIR:-$REPO/.bench}"
MODELSERVE_BIN="${MODELSERVE_BIN:-$REPO/.venv/bin/modelserve}"
MS_HTTP_PORT="${MS_HTTP_PORT:-9000}"
MS_GRPC_PORT="${MS_GRPC_PORT:-9001}"
MAX_BATCH_SIZE="${MAX_BATCH_SIZE:-32}"
PREFERRED_BATCH_SIZES="${PREFERRED_BATCH_SIZES-8 16 32}"
MAX_QUEUE_DELAY_US="${MAX_QUEUE_DELAY_US:-2000}"
BENCH_RAW="${BENCH_RAW:-1}"
read -r -a ALL_MODELS <<< "${BENCH_MODELS:-resnet18 mlp}"

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. writable lab copy
if [[ ! -f "$BENCH_DIR/compare.py" ]]; then
  [[ -f "$BENCH_SRC/compare.py" ]] || die "no benchmark lab at $BENCH_SRC (set BENCH_SRC)"
  log "copying $BENCH_SRC -> $BENCH_DIR"
  mkdir -p "$BENCH_DIR"
  cp -r "$BENCH_SRC"/. "$BENCH_DIR"/        # includes the lab's .gitignore
  chmod -R u+w "$BENCH_DIR"                 # shared/ is read-only; cp keeps the r-x modes
fi
BENCH_DIR="$(cd "$BENCH_DIR" && pwd)"
# the copy holds ~3 GB of venvs/models/results: it must never be committed
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 && [[ "$BENCH_DIR/" == "$REPO/"* ]] &&
   ! git -C "$REPO" check-ignore -q "$BENCH_DIR/compare.py"; then
  log "WARNING: $BENCH_DIR is inside the repo but not git-ignored: add '/${BENCH_DIR#"$REPO/"}/' to .gitignore"
fi

# ---------------------------------------------------------------- 2. one-time setup
need_setup=0
for f in .venv/bin/python tools/pa/perf_analyzer models/resnet18/model.onnx models/mlp/model.onnx \
         models/resnet18/pa_input.json models/mlp/pa_input.json; do
  [[ -e "$BENCH_DIR/$f" ]] || need_setup=1
done
if (( need_setup )); then
  log "running $BENCH_DIR/setup.sh (venvs + perf_analyzer + models, ~3 GB, a few minutes)"
  (cd "$BENCH_DIR" && ./setup.sh)
fi

# ---------------------------------------------------------------- 3. model repository
# perf_analyzer reads max_batch_size / dynamic_batching from GET /v2/models/<m>/config,
# which our server is expected to build from these files.
declare -A IN_DIMS=([resnet18]="3, 224, 224" [mlp]="784")
declare -A OUT_DIMS=([resnet18]="1000" [mlp]="10")
# ONNX Runtime sessions per model, each single-threaded: on 2 cores shared with the request path,
# two 1-thread sessions keep both cores busy where one 2-thread session stalls at every parallel
# op whenever the event loop takes a core (measured: ResNet-18 c=32 ~43.5 -> ~46.5 inf/s).
declare -A INSTANCES=([resnet18]="${RESNET_INSTANCES:-2}" [mlp]="${MLP_INSTANCES:-1}")
REPO_DIR="$BENCH_DIR/repo"
mkdir -p "$REPO_DIR"
for m in "${ALL_MODELS[@]}"; do
  [[ -n "${IN_DIMS[$m]:-}" ]] || die "unknown model $m (lab has: ${!IN_DIMS[*]})"
  mkdir -p "$REPO_DIR/$m/1"
  ln -sfn "$BENCH_DIR/models/$m/model.onnx" "$REPO_DIR/$m/1/model.onnx"
  {
    echo "name: \"$m\""
    echo "platform: \"onnxruntime_onnx\""
    echo "max_batch_size: $MAX_BATCH_SIZE"
    echo "input [ { name: \"input\" data_type: TYPE_FP32 dims: [ ${IN_DIMS[$m]} ] } ]"
    echo "output [ { name: \"output\" data_type: TYPE_FP32 dims: [ ${OUT_DIMS[$m]} ] } ]"
    echo "dynamic_batching {"
    if [[ -n "${PREFERRED_BATCH_SIZES// /}" ]]; then
      echo "  preferred_batch_size: [ $(echo $PREFERRED_BATCH_SIZES | sed 's/ \+/, /g') ]"
    fi
    echo "  max_queue_delay_microseconds: $MAX_QUEUE_DELAY_US"
    echo "}"
    echo "instance_group [ { count: ${INSTANCES[$m]} kind: KIND_CPU } ]"
    echo "parameters { key: \"intra_op_thread_count\" value: { string_value: \"${ORT_THREADS_PER_INSTANCE:-1}\" } }"
  } > "$REPO_DIR/$m/config.pbtxt"
done
log "model repository: $REPO_DIR (${ALL_MODELS[*]})"

# ---------------------------------------------------------------- 4. run
# compare.py attaches --extra targets with their own model list (its --models does not
# filter them), so only add targets for the models selected with --models, if given.
sel_models=("${ALL_MODELS[@]}")
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[i]}" == --models ]]; then
    sel_models=()
    for ((j = i + 1; j < ${#args[@]}; j++)); do
      [[ "${args[j]}" == --* ]] && break
      sel_models+=("${args[j]}")
    done
  fi
done
extra=()
for m in "${sel_models[@]}"; do
  [[ -e "$REPO_DIR/$m/config.pbtxt" ]] || die "--models $m: not in $REPO_DIR"
  extra+=(--extra "modelserve=http://127.0.0.1:$MS_HTTP_PORT/$m" --extra "modelserve=grpc://127.0.0.1:$MS_GRPC_PORT/$m")
done

[[ -x "$MODELSERVE_BIN" ]] || die "$MODELSERVE_BIN not found (pip install -e . into $REPO/.venv, or set MODELSERVE_BIN)"
# A stale server on our ports would pass compare.py's readiness check and be measured instead.
for p in "$MS_HTTP_PORT" "$MS_GRPC_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "127.0.0.1:$p is already in use; stop that process or set MS_HTTP_PORT/MS_GRPC_PORT"
  fi
done

# compare.py runs this with `bash -c` (cwd = lab dir; under `taskset -c 0` when pinned) and
# stops it by process group. When pinned it sets BENCH_ORT_THREADS=1; unpinned it leaves it
# unset -> 0 = onnxruntime's default thread count. ${BENCH_ORT_THREADS:-0} is expanded by
# that bash -c, hence the single quotes.
q() { printf '%q' "$1"; }
cmd='exec env MODELSERVE_ORT_THREADS=${BENCH_ORT_THREADS:-0} '"$(q "$MODELSERVE_BIN")"' serve'
cmd+=" --model-repository $(q "$REPO_DIR") --host 127.0.0.1 --http-port $MS_HTTP_PORT --grpc-port $MS_GRPC_PORT"

cd "$BENCH_DIR"
if [[ "${BENCH_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' ./run_all.sh "${extra[@]}" --extra-cmd "modelserve=$cmd" "$@"; echo
  exit 0
fi
if [[ "$BENCH_RAW" == 0 ]]; then
  out="results/$(date +%Y%m%d-%H%M%S)"
  log "compare.py -> $BENCH_DIR/$out"
  exec timeout 3600 .venv/bin/python compare.py --out "$out" "${extra[@]}" --extra-cmd "modelserve=$cmd" "$@"
fi
log "run_all.sh -> $BENCH_DIR/results/<timestamp>"
exec ./run_all.sh "${extra[@]}" --extra-cmd "modelserve=$cmd" "$@"
