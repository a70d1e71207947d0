#!/usr/bin/env bash
# scripts/gpu-check.sh - the prepared GPU check of the CUDA backend:
#   1. builds with CUDA (meson -Dcuda=enabled -Dtests=disabled: no Criterion,
#      jansson or libmicrohttpd needed; nvcc, meson, ninja and a C/C++
#      compiler are);
#   2. runs the test suite `gpu` (every kernel against kernels/ref, the graph
#      on the CUDA backend against the CPU backend on stories260K /
#      stories15M when the models are found: $LKQ_SHARED, ../shared or
#      ./shared, and on SmolLM2 when $LKQ_MODELS has it);
#   3. runs bench/bench_gpu (synthetic Llama-3-8B shape, FP16 vs INT4 cache:
#      one sequence's prefill/decode, decode attention alone, then continuous
#      batching - 16 sequences per fwd_eval_batch decode step at each
#      context, bounded by --batched-budget, 150 s) and prints its tables
#      last.
# Logs (build, tests, benchmark, nvidia-smi) go to $OUT when it is set, else
# to BUILD/gpu-check. Sized for one H200 in under 8 minutes; the benchmark
# alone is bounded by LKQ_BENCH_TIMEOUT seconds (default 420 minus the time
# already spent). Extra arguments go to bench_gpu (e.g. --ctx 1024,8192).
# Exit status: 0 when the build, the tests and the benchmark all succeeded.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BUILD=${LKQ_GPU_BUILD:-build-gpu}
LOG=${OUT:-$BUILD/gpu-check}
mkdir -p "$LOG"
SECONDS=0
step() { echo "== $* (${SECONDS} s)" | tee -a "$LOG/summary.txt" >&2; }

# models for the end-to-end test (never copied into the repository)
for d in "${LKQ_SHARED:-}" "$ROOT/../shared" "$ROOT/shared"; do
    if [ -n "$d" ] && [ -d "$d/models" ]; then
        LKQ_SHARED=$(cd "$d" && pwd)
        export LKQ_SHARED
        break
    fi
done
if [ -z "${LKQ_SHARED:-}" ] || [ ! -d "${LKQ_SHARED}/models" ]; then
    step "no shared models found (\$LKQ_SHARED, ../shared, ./shared): the end-to-end GPU test reports them absent"
else
    step "shared models: $LKQ_SHARED"
fi
{ nvidia-smi; nvcc --version; } > "$LOG/device.txt" 2>&1 || true

step "configure ($BUILD)"
if [ ! -f "$BUILD/build.ninja" ]; then
    if ! meson setup "$BUILD" -Dcuda=enabled -Dtests=disabled --buildtype=release \
            > "$LOG/setup.log" 2>&1; then
        tail -30 "$LOG/setup.log" >&2
        step "FAILED: meson setup"
        exit 1
    fi
fi
step "build"
if ! ninja -C "$BUILD" -j"$(nproc)" > "$LOG/build.log" 2>&1; then
    grep -E "error|FAILED" "$LOG/build.log" | head -40 >&2
    step "FAILED: build"
    exit 1
fi

step "tests: suite gpu"
meson test -C "$BUILD" --suite gpu --print-errorlogs --num-processes 1 \
    > "$LOG/tests.log" 2>&1
TRC=$?
cp "$BUILD/meson-logs/testlog.txt" "$LOG/testlog.txt" 2>/dev/null || true
grep -E "^ *[0-9]+/[0-9]+ |^(Ok|Fail|Skipped|Timeout):" "$LOG/tests.log" >&2
step "tests: exit status $TRC"

BUDGET=${LKQ_BENCH_TIMEOUT:-$((420 - SECONDS))}
[ "$BUDGET" -lt 60 ] && BUDGET=60
step "benchmark (at most $BUDGET s)"
timeout "$BUDGET" "$BUILD/bench/bench_gpu" "$@" > "$LOG/bench.md" 2> "$LOG/bench.log"
BRC=$?
cat "$LOG/bench.log" >&2
step "benchmark: exit status $BRC; logs in $LOG"
cat "$LOG/bench.md"
[ "$TRC" -eq 0 ] && [ "$BRC" -eq 0 ]
