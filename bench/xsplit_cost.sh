#!/usr/bin/env bash
# bench/xsplit_cost.sh [ROUNDS] - what the split of activation outliers
# (kernels/cpu/kcpu.h; LKQ_CPU_XSPLIT, default ratio 3) costs end to end:
# prompt processing (pp512, pp2048) and decode (tg64 after 16 and 2048
# tokens) with the split off (LKQ_CPU_XSPLIT=0) and at the default, INT4
# cache, 2 threads, on the default model. The two settings alternate round
# by round (the machine is shared and noisy); each figure is the median
# over the rounds, and the ratio is the median of the per-round ratios
# (tok/s with the split / tok/s without: below 1 = slower).
#
#   bench/xsplit_cost.sh 3
#   LKQ_MODEL=models/gemma-3-270m-q4_k_m.gguf bench/xsplit_cost.sh 3
#   LKQ_XSPLIT="3 4 2" bench/xsplit_cost.sh 2   (several ratios)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${1:-3}
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${LKQ_THREADS:-2}
BUILD=${LKQ_BUILD:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
SPLITS=${LKQ_XSPLIT:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$ROOT/scripts/build.sh" "$BUILD" >&2
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r/$ROUNDS" >&2
    for s in 0 $SPLITS; do
        LKQ_CPU_XSPLIT=$s "$BUILD/bench/bench_e2e" -m "$MODEL" -t "$THREADS" -r 1 -k int4 \
            -P 512,2048 -G 16,2048 | grep -E '\| (pp|tg)[0-9]' | sed "s/^/$r /" >>"$tmp/$s"
    done
done
python3 - "$tmp" "$MODEL" "$THREADS" $SPLITS <<'PY'
import os, statistics, sys
tmp, model, threads, splits = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def load(s):
    d = {}
    for line in open(os.path.join(tmp, s)):
        rnd, rest = line.split(" ", 1)
        f = [x.strip() for x in rest.strip().strip("|").split("|")]
        d.setdefault(f[-2], {})[rnd] = float(f[-1])
    return d
base = load("0")
print("model %s, %s threads, INT4 cache; tok/s, median of rounds\n" %
      (os.path.basename(model), threads))
print("| test | split off | " + " | ".join("ratio %s" % s for s in splits) +
      " | " + " | ".join("%s / off" % s for s in splits) + " |")
print("|---|---|" + "---|" * (2 * len(splits)))
other = {s: load(s) for s in splits}
for test in base:
    row = ["%.1f" % statistics.median(base[test].values())]
    row += ["%.1f" % statistics.median(other[s][test].values()) for s in splits]
    row += ["%.3f" % statistics.median(other[s][test][r] / base[test][r]
                                       for r in base[test]) for s in splits]
    print("| %s | %s |" % (test, " | ".join(row)))
PY
