#!/usr/bin/env bash
# bench/run_bench.sh [REPS] - CPU speed of LiveKVQuant vs llama.cpp on the
# default model, side by side in one run, written to docs/bench.md.
#
#   bench/run_bench.sh 5
#
# Needs: a release build in build/ (scripts/build.sh) and, for the peer
# column, llama-cpp-python in ~/.cache/livekvq/venv-llama (see
# bench/llamacpp_bench.py for the two setup commands). Not run by CI.
# The two engines alternate (ours, peer, ours, peer ...) so slow periods of
# the shared machine hit both; each figure is the median over all rounds.
# LKQ_BASE_BUILD=DIR adds a third engine to the rotation: the bench_e2e of
# another build of LiveKVQuant (e.g. the commit before a restructure), with
# its column and the ratios in the table (OUT=FILE writes the table
# elsewhere than docs/bench.md). LKQ_PP / LKQ_TG (comma lists, default
# 512,2048 / 16,2048) pick the prompt lengths and the generation contexts
# (bench/gemma3_speed.sh: 512,8192 / 16384 on Gemma-3-270M).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${1:-5}
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${LKQ_LLAMA_PY:-$HOME/.cache/livekvq/venv-llama/bin/python}
THREADS=${LKQ_THREADS:-2}
OUT=${OUT:-$ROOT/docs/bench.md}
BASE=${LKQ_BASE_BUILD:-}
PP=${LKQ_PP:-512,2048}
TG=${LKQ_TG:-16,2048}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$ROOT/scripts/build.sh"
for r in $(seq 1 "$REPS"); do
    echo "round $r/$REPS" >&2
    "$ROOT/build/bench/bench_e2e" -m "$MODEL" -t "$THREADS" -r 1 -P "$PP" -G "$TG" | grep -E '\| (pp|tg)[0-9]' >>"$tmp/ours"
    if [ -n "$BASE" ]; then
        "$BASE/bench/bench_e2e" -m "$MODEL" -t "$THREADS" -r 1 -P "$PP" -G "$TG" | grep -E '\| (pp|tg)[0-9]' >>"$tmp/base"
    fi
    if [ -x "$PY" ]; then
        OMP_WAIT_POLICY=passive "$PY" "$ROOT/bench/llamacpp_bench.py" -m "$MODEL" -t "$THREADS" -r 1 -P "$PP" -G "$TG" >>"$tmp/peer"
    fi
done

python3 - "$tmp" "$REPS" "$THREADS" "$PP" "$TG" >"$tmp/table" <<'PY'
import statistics, sys, os
tmp, reps, threads = sys.argv[1], sys.argv[2], sys.argv[3]
tests = ["pp" + x for x in sys.argv[4].split(",") if x] + \
        ["tg64@" + x for x in sys.argv[5].split(",") if x]
def load(name):
    d = {}
    p = os.path.join(tmp, name)
    if not os.path.exists(p):
        return d
    for line in open(p):
        f = [x.strip() for x in line.strip().strip('|').split('|')]
        if len(f) >= 5:
            d.setdefault(f[-2], []).append(float(f[-1]))
    return d
ours, peer, base = load("ours"), load("peer"), load("base")
med = lambda d, t: statistics.median(d[t]) if t in d else float("nan")
div = lambda a, b: a / b if b == b and b else float("nan")
if base:
    print("| test | LiveKVQuant tok/s | base build tok/s | ours/base | llama.cpp tok/s | ours/llama.cpp | base/llama.cpp |")
    print("|---|---|---|---|---|---|---|")
else:
    print("| test | LiveKVQuant tok/s | llama.cpp tok/s | ratio |")
    print("|---|---|---|---|")
for t in tests:
    o, p, b = med(ours, t), med(peer, t), med(base, t)
    if base:
        print("| %s | %.1f | %.1f | %.3f | %.1f | %.2f | %.2f |" % (t, o, b, div(o, b), p, div(o, p), div(b, p)))
    else:
        print("| %s | %.1f | %.1f | %.2f |" % (t, o, p, div(o, p)))
PY

{
    echo "# CPU speed: LiveKVQuant vs llama.cpp"
    echo
    echo "Model: $(basename "$MODEL"), $THREADS threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores."
    echo "Date: $(date -u +%Y-%m-%d). Median of $REPS rounds; the two engines alternate within one run."
    echo "Command: \`${CMD_NAME:-${BASE:+LKQ_BASE_BUILD=$BASE }bench/run_bench.sh $REPS}\`"
    echo
    echo "pp N = prompt processing of N tokens from an empty cache (batches of 512);"
    echo "tg 64@C = 64 tokens generated one at a time after a C-token prompt. Both"
    echo "engines keep an FP16 KV cache. llama.cpp via llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || echo '(absent)') built from source here"
    echo "(AVX2, FMA, F16C, OpenMP, repacked Q4 kernels), run with OMP_WAIT_POLICY=passive so that its"
    echo "idle spinning does not steal the shared second core from the other engine's run."
    echo
    cat "$tmp/table"
} >"$tmp/head"
# the sections after the first "## " heading of an existing file stay
if [ -f "$OUT" ] && grep -q '^## ' "$OUT"; then
    { cat "$tmp/head"; echo; sed -n '/^## /,$p' "$OUT"; } >"$tmp/all"
else
    cp "$tmp/head" "$tmp/all"
fi
cp "$tmp/all" "$OUT"
cat "$tmp/head"
