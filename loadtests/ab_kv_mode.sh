#!/usr/bin/env bash
# loadtests/ab_kv_mode.sh - A/B of the KV modes on ONE server (issue 13
# item 2): livekvq-server started with --kv-modes $MODES (one shared pool),
# one lkq_load client per mode at the same time, each sending its
# "kv_cache", the same prompts (same --seed). Prints a table per mode:
# requests, KV bytes per sequence and per token (what each sequence held
# when it ended: livekvq_kv_mode_finished_*), the sequences of that length
# the whole pool holds in that mode (pool bytes / bytes per sequence) and
# of the full context (the startup line), TTFT p50 / p90 as the client saw
# it and the server's mean TTFT (livekvq_kv_mode_ttft_seconds_total /
# first_tokens_total).
#
# Usage: loadtests/ab_kv_mode.sh [BUILD_DIR]          (default build)
# Environment (defaults): MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf),
#   TOKENIZER (none; for a llama2.c model), PROMPT_TOKENS (1536),
#   MAX_TOKENS (32), REQUESTS (6 per mode), CONCURRENCY (1 per mode),
#   THREADS (2), DEFAULT_MODE (int4: the server's --kv-cache), NICE (5),
#   MODES (fp16,int4,int3: the modes compared, one client each),
#   OUT (BUILD_DIR/loadtests/ab_kv_mode), LKQ_SHARED.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
SERVER=$BUILD/livekvq-server
LOAD=$BUILD/loadtests/lkq_load
MODEL=${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
PROMPT_TOKENS=${PROMPT_TOKENS:-1536}
MAX_TOKENS=${MAX_TOKENS:-32}
REQUESTS=${REQUESTS:-6}
CONCURRENCY=${CONCURRENCY:-1}
THREADS=${THREADS:-2}
DEFAULT_MODE=${DEFAULT_MODE:-int4}
MODES=${MODES:-fp16,int4,int3}
NICE=${NICE:-5}
OUT=${OUT:-$BUILD/loadtests/ab_kv_mode}
export LKQ_SHARED=${LKQ_SHARED:-$ROOT/../shared}

say() { echo "ab_kv_mode: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$SERVER" ] || die "no $SERVER: build the server first"
[ -x "$LOAD" ] || die "no $LOAD: the load generator needs libcurl at build time"
[ -r "$MODEL" ] || die "no model $MODEL (scripts/setup.sh fetches it)"
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT/metrics.txt" "$OUT/server.log"

n_modes=$(echo "$MODES" | tr ',' '\n' | wc -l)
args=(-m "$MODEL" -t "$THREADS" --port 0 --kv-cache "$DEFAULT_MODE" --kv-modes "$MODES"
      --max-seqs $((n_modes * CONCURRENCY + 2)))
[ -n "${TOKENIZER:-}" ] && args+=(--tokenizer "$TOKENIZER")
coproc SRV { exec nice -n "$NICE" "$SERVER" "${args[@]}" 2>"$OUT/server.log"; }
SRV_PID=$SRV_PID
trap 'kill "$SRV_PID" 2>/dev/null || true; wait "$SRV_PID" 2>/dev/null || true' EXIT
URL=
while read -r -t 120 line <&"${SRV[0]}"; do
    case $line in *"listening on "*) URL=${line##*listening on }; break ;; esac
done
[ -n "$URL" ] || die "the server did not start (see $OUT/server.log)"
say "server $URL: $(grep -m1 'KV pool' "$OUT/server.log" | sed 's/^.*info  //')"

pids=()
for mode in ${MODES//,/ }; do
    nice -n "$NICE" "$LOAD" --url "$URL" -c "$CONCURRENCY" -n "$REQUESTS" \
        -p "$PROMPT_TOKENS" -m "$MAX_TOKENS" --ignore-eos --kv-cache "$mode" --seed 7 \
        --label "$mode" --json "$OUT/$mode.json" -q &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
[ "$rc" = 0 ] || die "a load client failed (exit $rc)"
curl -sf "$URL/metrics" >"$OUT/metrics.txt" || die "no /metrics"

grep -m1 'KV pool' "$OUT/server.log" >"$OUT/capacity.txt" || true
python3 - "$OUT" "$MODES" <<'EOF'
import json, re, sys
out, modes = sys.argv[1], sys.argv[2].split(",")
met = open(f"{out}/metrics.txt").read()
cap = open(f"{out}/capacity.txt").read()
pool = re.search(r"KV pool ([0-9.]+) MiB", cap)
pool_b = float(pool.group(1)) * 1024 * 1024 if pool else float("nan")
ctx = re.search(r"sequences of (\d+) tokens", cap)
def full(mode):
    r = re.search(r"(\d+) in %s\b" % re.escape(mode), cap)
    return r.group(1) if r else "?"
def m(name, mode):
    r = re.search(r'^%s\{mode="%s"\} (\S+)$' % (re.escape(name), mode), met, re.M)
    return float(r.group(1)) if r else float("nan")
print("| mode | requests | KV MB / sequence | KV bytes / token | vs fp16 | "
      "sequences held (this length) | sequences held (%s tokens) | "
      "TTFT p50 (client) | TTFT p90 (client) | TTFT mean (server) |"
      % (ctx.group(1) if ctx else "n_ctx"))
print("|---|---|---|---|---|---|---|---|---|---|")
per_tok = {}
for mode in modes:
    lv = json.loads(open(f"{out}/{mode}.json").read().splitlines()[-1])
    n = m("livekvq_kv_mode_finished_sequences_total", mode)
    b = m("livekvq_kv_mode_finished_bytes_total", mode)
    t = m("livekvq_kv_mode_finished_tokens_total", mode)
    ft = m("livekvq_kv_mode_first_tokens_total", mode)
    ts = m("livekvq_kv_mode_ttft_seconds_total", mode)
    per_tok[mode] = b / t
    ttft = lv["ttft_s"]
    base = per_tok.get("fp16", float("nan"))
    print(f"| {mode} | {lv['ok']} | {b / n / 1e6:.2f} MB | {b / t:.0f} B | "
          f"{base / per_tok[mode]:.2f}x | {int(pool_b // (b / n))} | {full(mode)} | "
          f"{ttft['p50']:.2f} s | {ttft['p90']:.2f} s | {ts / ft:.2f} s |")
EOF
