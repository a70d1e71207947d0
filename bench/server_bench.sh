#!/usr/bin/env bash
# bench/server_bench.sh [BUILD_DIR] - the server's two benchmark targets
# (issue 4), printed as tables:
#   1. HTTP overhead: a non-streaming completion of N_OVER (16) tokens on
#      stories260K at concurrency 1, against the same work done in-process
#      the CLI's way (bench_http alternates the two, ROUNDS rounds, medians).
#   2. Batching: SmolLM2 with ~1K-token prompts (PROMPT_TOKENS), MAX_TOKENS
#      generated (ignore_eos), one stream vs CONC (16) concurrent streams
#      (lkq_load closed loop, one wave of requests per level): aggregate
#      generated tok/s over the level, and the decode rate once every stream
#      is decoding (streams / time per output token).
# Servers run one at a time on free loopback ports. Environment: THREADS (2),
# ROUNDS (100), N_OVER (16), PROMPT_TOKENS (1024), MAX_TOKENS (256), CONC (16),
# OUT (BUILD_DIR/bench/server_bench).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${1:-$ROOT/build}
SHARED=${LKQ_SHARED:-$ROOT/../shared}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-100}
N_OVER=${N_OVER:-16}
PROMPT_TOKENS=${PROMPT_TOKENS:-1024}
MAX_TOKENS=${MAX_TOKENS:-256}
CONC=${CONC:-16}
OUT=${OUT:-$B/bench/server_bench}
mkdir -p "$OUT"
for f in "$B/livekvq-server" "$B/bench/bench_http" "$B/loadtests/lkq_load"; do
    [ -x "$f" ] || { echo "server_bench: $f is not built (ninja -C $B)" >&2; exit 1; }
done

PID=
stop() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; PID=; }
trap stop EXIT
# start_server LOG ARGS... : sets URL
start_server() {
    local log=$1; shift
    coproc SRV { exec "$B/livekvq-server" --port 0 -t "$THREADS" "$@" 2>"$log"; }
    PID=$SRV_PID
    local line
    read -r -t 120 line <&"${SRV[0]}" || { echo "server_bench: server did not start (see $log)" >&2; exit 1; }
    URL=${line##*listening on }
}

M260=$SHARED/models/stories260K/stories260K.bin
T260=$SHARED/models/stories260K/tok512.bin
echo "== 1. HTTP overhead: stories260K, $N_OVER tokens, concurrency 1, $ROUNDS rounds"
start_server "$OUT/server_260k.log" -m "$M260" --tokenizer "$T260"
"$B/bench/bench_http" -m "$M260" --tokenizer "$T260" --url "$URL" -n "$N_OVER" -r "$ROUNDS" \
    -t "$THREADS" | tee "$OUT/overhead.md"
stop

SMOL=${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
echo
echo "== 2. batching: SmolLM2, ~$PROMPT_TOKENS-token prompts, $MAX_TOKENS tokens, 1 vs $CONC streams"
start_server "$OUT/server_smol.log" -m "$SMOL" --max-seqs "$CONC"
rm -f "$OUT/batching.csv"
for c in 1 "$CONC"; do
    n=$c
    [ "$c" = 1 ] && n=2
    "$B/loadtests/lkq_load" --url "$URL" -c "$c" -n "$n" -p "$PROMPT_TOKENS" -m "$MAX_TOKENS" \
        --ignore-eos --label "c$c" --csv "$OUT/batching.csv" -q
done
stop
python3 - "$OUT/batching.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| streams | requests | wall s | generated tok/s (level) | TTFT p50 s | TPOT p50 ms | decode tok/s (streams / TPOT) |")
print("|---|---|---|---|---|---|---|")
base = None
for r in rows:
    c = int(r["concurrency"]); tp = float(r["tpot_p50"])
    dec = c / tp if tp > 0 else float("nan")
    g = float(r["gen_tok_per_s"])
    print(f"| {c} | {r['ok']} | {float(r['wall_s']):.1f} | {g:.1f} | {float(r['ttft_p50']):.2f} | {tp*1e3:.1f} | {dec:.1f} |")
    if base is None:
        base = (g, dec)
    else:
        print(f"\nratio {c} streams / 1: generated tok/s {g/base[0]:.2f}x, decode tok/s {dec/base[1]:.2f}x")
PY
