#!/usr/bin/env bash
# loadtests/compare_kv.sh - FP16 vs INT4 KV cache under load, at the same
# --kv-budget: how many concurrent ~4K-token sequences each server holds
# before it queues, and latency at equal load. One server at a time (they
# would otherwise share the CPU), each on a free loopback port:
#   1. equal load: EQUAL_C concurrent requests (both servers hold them),
#      MAX_TOKENS_EQ tokens each -> TTFT, inter-token and end-to-end latency;
#   2. capacity: CAP_C concurrent requests that generate MAX_TOKENS_CAP tokens
#      (ignore_eos) so admitted sequences stay alive; the level ends once
#      requests have waited for SETTLE_S seconds while every running one was
#      past its prefill (lkq_load --until-saturated), then the requests are
#      cancelled. "Held" = the most requests running
#      while others waited (livekvq_requests_running with
#      vllm:num_requests_waiting > 0, scraped every second).
# Writes OUT/results.csv, OUT/scrapes.csv (every scrape), OUT/summary.md (the
# table) and OUT/compare_kv.png (gnuplot, when installed). Exit status 0 when
# both servers ran with no request failing except by deliberate 429/503.
#
# Usage: loadtests/compare_kv.sh [BUILD_DIR]        (default build)
# Environment (defaults): MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf),
#   TOKENIZER (none; for a llama2.c model),
#   BUDGET (265MiB), PROMPT_TOKENS (4096), CHARS_PER_TOKEN (3.8), THREADS (2),
#   EQUAL_C (2), MAX_TOKENS_EQ (32), CAP_C (7), MAX_TOKENS_CAP (200),
#   SETTLE_S (10), CUTOFF_S (2400), OUT (BUILD_DIR/loadtests/compare_kv),
#   NICE (10), LKQ_SHARED; REPORT_ONLY=1 only remakes the table and the plot
#   from OUT's results.json and scrapes.csv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
SERVER=$BUILD/livekvq-server
LOAD=$BUILD/loadtests/lkq_load
MODEL=${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
BUDGET=${BUDGET:-265MiB}
PROMPT_TOKENS=${PROMPT_TOKENS:-4096}
CHARS_PER_TOKEN=${CHARS_PER_TOKEN:-3.8}
THREADS=${THREADS:-2}
EQUAL_C=${EQUAL_C:-2}
MAX_TOKENS_EQ=${MAX_TOKENS_EQ:-32}
CAP_C=${CAP_C:-7}
MAX_TOKENS_CAP=${MAX_TOKENS_CAP:-200}
SETTLE_S=${SETTLE_S:-10}
CUTOFF_S=${CUTOFF_S:-2400}
OUT=${OUT:-$BUILD/loadtests/compare_kv}
NICE=${NICE:-10}
export LKQ_SHARED=${LKQ_SHARED:-$ROOT/../shared}

say() { echo "compare_kv: $*" >&2; }
die() { say "$*"; exit 1; }

REPORT_ONLY=${REPORT_ONLY:-0}
if [ "$REPORT_ONLY" != 1 ]; then
    [ -x "$SERVER" ] || die "no $SERVER: build the server first"
    [ -x "$LOAD" ] || die "no $LOAD: the load generator needs libcurl at build time"
    [ -r "$MODEL" ] || die "no model $MODEL (scripts/setup.sh fetches it)"
    mkdir -p "$OUT"
    rm -f "$OUT/results.csv" "$OUT/results.json" "$OUT/scrapes.csv" "$OUT/summary.md" \
        "$OUT/compare_kv.png"
else
    if [ ! -r "$OUT/results.json" ] || [ ! -r "$OUT/scrapes.csv" ]; then
        die "REPORT_ONLY: no results in $OUT"
    fi
fi

SRV_PID=""
stop_server() {
    if [ -n "$SRV_PID" ]; then
        kill -TERM "$SRV_PID" 2>/dev/null || true
        wait "$SRV_PID" 2>/dev/null || true
        SRV_PID=""
    fi
}
trap stop_server EXIT

# start_server MODE -> sets SRV_PID and SRV_URL (port chosen by the server)
start_server() {
    local log=$OUT/server-$1.log i
    nice -n "$NICE" "$SERVER" -m "$MODEL" ${TOKENIZER:+--tokenizer "$TOKENIZER"} \
        --host 127.0.0.1 --port 0 --threads "$THREADS" \
        --kv-cache "$1" --kv-budget "$BUDGET" --max-seqs 64 --max-queue 64 \
        >"$log" 2>&1 &
    SRV_PID=$!
    SRV_URL=""
    for ((i = 0; i < 600; i++)); do
        SRV_URL=$(grep -so 'http://127\.0\.0\.1:[0-9]*' "$log" | head -n1 || true)
        [ -n "$SRV_URL" ] && return 0
        kill -0 "$SRV_PID" 2>/dev/null || { cat "$log" >&2; die "the $1 server exited"; }
        sleep 0.2
    done
    die "the $1 server did not start"
}

LOADARGS=(-p "$PROMPT_TOKENS" --chars-per-token "$CHARS_PER_TOKEN" --timeout "$CUTOFF_S"
          --scrape-metrics auto --scrape-interval 1 --pause 0 --keep-going
          --csv "$OUT/results.csv" --json "$OUT/results.json" --scrape-log "$OUT/scrapes.csv")
status=0
t_start=$(date +%s)
modes="fp16 int4"
[ "$REPORT_ONLY" = 1 ] && modes=""
for mode in $modes; do
    start_server "$mode"
    say "$mode server at $SRV_URL: $(grep -o 'KV cache [^;]*' "$OUT/server-$mode.log" | head -n1) (--kv-budget $BUDGET)"
    say "$mode: equal load, $EQUAL_C x ~$PROMPT_TOKENS-token prompts, $MAX_TOKENS_EQ tokens"
    rc=0
    "$LOAD" --url "$SRV_URL" "${LOADARGS[@]}" -c "$EQUAL_C" -n "$EQUAL_C" -m "$MAX_TOKENS_EQ" \
        --label "$mode-eq" || rc=$?
    [ "$rc" = 0 ] || { say "$mode equal-load run: lkq_load exit $rc"; status=1; }
    say "$mode: capacity probe, $CAP_C x ~$PROMPT_TOKENS-token prompts held for $MAX_TOKENS_CAP tokens"
    rc=0
    "$LOAD" --url "$SRV_URL" "${LOADARGS[@]}" -c "$CAP_C" -n "$CAP_C" -m "$MAX_TOKENS_CAP" --ignore-eos \
        --until-saturated "$SETTLE_S" --cutoff "$CUTOFF_S" --label "$mode" || rc=$?
    [ "$rc" = 0 ] || { say "$mode capacity run: lkq_load exit $rc"; status=1; }
    stop_server
done
elapsed=$(($(date +%s) - t_start))
if [ "$REPORT_ONLY" = 1 ]; then
    elapsed=$(sed -n 's/.* \([0-9]*\) s in all\..*/\1/p' "$OUT/summary.md" 2>/dev/null | head -n1)
    elapsed=${elapsed:-?}
fi

# --- table -------------------------------------------------------------------------
python3 - "$OUT" "$BUDGET" "$PROMPT_TOKENS" "$CAP_C" "$elapsed" "$MODEL" <<'EOF' || status=1
import csv, json, os, sys
out, budget, ptok, cap_c, elapsed, model = sys.argv[1:7]
rows = {}
for line in open(os.path.join(out, "results.json")):
    d = json.loads(line)
    rows[d["label"]] = d
def g(d, *k):
    for x in k:
        d = d.get(x) if isinstance(d, dict) else None
    return d
def f(v, fmt):
    return "-" if v is None else fmt % v
lines = []
lines.append("| KV cache | held (running while others wait) | max waiting | KV usage at peak | KV bytes at peak | INT4 blocks used / total | FP16 blocks or pages used / total | bits/element | saturated after | failures |")
lines.append("|---|---|---|---|---|---|---|---|---|---|")
held = {}
for m in ("fp16", "int4"):
    d = rows.get(m)
    if not d:
        lines.append("| %s | (no run) |||||||" % m)
        continue
    s = d["server"]
    h = s.get("max_running_queued")
    held[m] = h
    sat = d.get("saturated_s")
    lines.append("| %s | %s | %s | %s | %s | %s / %s | %s / %s | %s | %s | %d (+%d cancelled at the end) |" % (
        m, f(h, "%.0f"), f(s.get("max_waiting"), "%.0f"),
        f(s.get("max_kv_usage") and 100 * s["max_kv_usage"], "%.1f%%"),
        f(s.get("max_kv_bytes") and s["max_kv_bytes"] / 2**20, "%.1f MiB"),
        f(s.get("max_int4_blocks_used"), "%.0f"), f(s.get("int4_blocks_total"), "%.0f"),
        f(s.get("max_fp16_blocks_used"), "%.0f"), f(s.get("fp16_blocks_total"), "%.0f"),
        f(s.get("bits_per_element"), "%.2f"),
        f(sat, "%.0f s") if sat is not None else "not saturated: raise CAP_C",
        d["unexpected_failures"], d["cancelled"]))
ratio = None
if held.get("fp16") and held.get("int4"):
    ratio = held["int4"] / held["fp16"]
lines.append("")
lines.append("INT4 / FP16 sequences held at --kv-budget %s: **%s**" % (budget, f(ratio, "%.2fx")))
lines.append("")
lines.append("| equal load (concurrency) | ok | prompt tokens | TTFT p50 / p90 s | TPOT p50 / p90 ms | inter-chunk p50 / p90 ms | E2E p50 / p90 s | gen tok/s |")
lines.append("|---|---|---|---|---|---|---|---|")
for m in ("fp16", "int4"):
    d = rows.get(m + "-eq")
    if not d:
        continue
    lines.append("| %s @ %d | %d/%d | %s | %s / %s | %s / %s | %s / %s | %s / %s | %s |" % (
        m, d["concurrency"], d["ok"], d["sent"],
        f(d["prompt_tokens"] / d["ok"] if d["ok"] else None, "%.0f"),
        f(g(d, "ttft_s", "p50"), "%.1f"), f(g(d, "ttft_s", "p90"), "%.1f"),
        f(g(d, "tpot_s", "p50") and 1e3 * d["tpot_s"]["p50"], "%.0f"),
        f(g(d, "tpot_s", "p90") and 1e3 * d["tpot_s"]["p90"], "%.0f"),
        f(g(d, "itl_s", "p50") and 1e3 * d["itl_s"]["p50"], "%.0f"),
        f(g(d, "itl_s", "p90") and 1e3 * d["itl_s"]["p90"], "%.0f"),
        f(g(d, "e2e_s", "p50"), "%.1f"), f(g(d, "e2e_s", "p90"), "%.1f"),
        f(d.get("gen_tok_per_s"), "%.1f")))
lines.append("")
lines.append("Model %s, ~%s-token prompts from Moby-Dick, capacity probe at concurrency %s; %s s in all." % (
    os.path.basename(model), ptok, cap_c, elapsed))
txt = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(txt)
print(txt)
EOF

# --- plot ----------------------------------------------------------------------------
if command -v gnuplot >/dev/null; then
    dat=$(mktemp -d /tmp/lkq_compare_kv.XXXXXX)
    awk -F, 'NR > 1 && ($1 == "fp16" || $1 == "int4") { print > (D "/scrapes-" $1 ".dat") }' \
        D="$dat" "$OUT/scrapes.csv"
    gnuplot <<EOF || say "gnuplot failed (no PNG)"
set terminal pngcairo size 1100,450 font ",10"
set output "$OUT/compare_kv.png"
set datafile separator ","
set multiplot layout 1,2 title "FP16 vs INT4 KV cache at --kv-budget $BUDGET, prompts of about $PROMPT_TOKENS tokens, $CAP_C requests offered" noenhanced
set title "requests running (solid) and waiting (dashed)"
set xlabel "seconds into the capacity probe"
set ylabel "requests"
set yrange [0:$CAP_C + 1]
set key below horizontal
set grid
plot "$dat/scrapes-fp16.dat" using 3:4 with lines lw 2 lc rgb "#d62728" title "fp16 running", \
     "$dat/scrapes-fp16.dat" using 3:5 with lines lw 1 dt 2 lc rgb "#d62728" title "fp16 waiting", \
     "$dat/scrapes-int4.dat" using 3:4 with lines lw 2 lc rgb "#1f77b4" title "int4 running", \
     "$dat/scrapes-int4.dat" using 3:5 with lines lw 1 dt 2 lc rgb "#1f77b4" title "int4 waiting"
set title "KV bytes held"
set ylabel "MiB"
set yrange [0:*]
plot "$dat/scrapes-fp16.dat" using 3:(\$7/1048576) with lines lw 2 lc rgb "#d62728" title "fp16", \
     "$dat/scrapes-int4.dat" using 3:(\$7/1048576) with lines lw 2 lc rgb "#1f77b4" title "int4"
unset multiplot
EOF
    rm -rf "$dat"
    [ -s "$OUT/compare_kv.png" ] && say "plot: $OUT/compare_kv.png"
else
    say "gnuplot not installed (apt-get install gnuplot-nox): no plot"
fi
say "table: $OUT/summary.md; rows: $OUT/results.csv; scrapes: $OUT/scrapes.csv"
exit "$status"
