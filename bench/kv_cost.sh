#!/usr/bin/env bash
# bench/kv_cost.sh [ROUNDS] - cost of live quantization: prefill of 4K tokens
# and decode at 4K context, INT4 cache vs FP16 cache, on the default model
# with 2 threads. The two modes alternate round by round (the machine is
# shared and noisy); each figure is the median over the rounds, and the
# per-round ratios (int4 time / fp16 time of the same round) follow the
# table, with their median.
#
#   bench/kv_cost.sh 5
#   LKQ_BUILD=build-attn bench/kv_cost.sh 5   (another build directory)
#   LKQ_MODES="int4 int3 k3v2 k2v2 int8" LKQ_GEN=1024,4096 bench/kv_cost.sh 1
#     (each code width against the same rounds' fp16; kv_cache names of
#     config/kvq_config.h; LKQ_GEN: the decode contexts, default 1024,4096)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${1:-5}
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${LKQ_THREADS:-2}
BUILD=${LKQ_BUILD:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$ROOT/scripts/build.sh" "$BUILD"
MODES=${LKQ_MODES:-int4}
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r/$ROUNDS" >&2
    for kv in fp16 $MODES; do
        "$BUILD/bench/bench_e2e" -m "$MODEL" -t "$THREADS" -r 1 -k "$kv" \
            -P 4096 -G "${LKQ_GEN:-1024,4096}" | grep -E '\| (pp|tg)[0-9]' >>"$tmp/$kv"
    done
done
for kv in $MODES; do
python3 - "$tmp" "$ROUNDS" "$kv" <<'PY'
import statistics, sys, os
tmp, kvn = sys.argv[1], sys.argv[3]
def load(kv):
    d = {}
    for line in open(os.path.join(tmp, kv)):
        f = [x.strip() for x in line.strip().strip('|').split('|')]
        d.setdefault(f[-2], []).append(float(f[-1]))
    return d
a, b = load("fp16"), load(kvn)
print("| test | fp16 tok/s | %s tok/s | %s time / fp16 time |" % (kvn, kvn))
print("|---|---|---|---|")
for t in a:
    x, y = statistics.median(a[t]), statistics.median(b[t])
    print("| %s | %.1f | %.1f | %.3f |" % (t, x, y, x / y))
print()
for t in a:
    r = [p / q for p, q in zip(a[t], b[t])]
    print("%s per round: %s (median %.3f)" % (t, " ".join("%.3f" % v for v in r),
                                             statistics.median(r)))
print()
PY
done
