#!/usr/bin/env bash
# deploy/test_nginx.sh - scale-out check on loopback: two livekvq-server
# replicas behind a real nginx (Debian package) configured with
# deploy/nginx/livekvq.conf, load from build/loadtests/lkq_load through nginx.
#   1. both replicas answer /health; nginx -t accepts the shipped config;
#   2. a closed-loop run through nginx succeeds and both replicas served
#      requests (nginx access log upstream= field, and each replica's
#      livekvq_requests_total counter);
#   3. the metric names used by deploy/prometheus/alerts.yml, the Grafana
#      dashboard and the k8s HPA all exist in a replica's /metrics;
#   4. a run is started, one replica is killed (SIGKILL) mid-run: at most the
#      requests in flight on it fail, and a fresh run afterwards succeeds with
#      no failure at all through the surviving replica.
# Everything binds 127.0.0.1 on free ports and lives in a temporary directory
# removed at exit. Bounded: about a minute with the stories260K model.
#
# Usage: deploy/test_nginx.sh [BUILD_DIR]   (default build)
# Environment: LKQ_TEST_MODEL / LKQ_TEST_TOKENIZER (default the stories260K
#   llama2.c model from ../shared/models), LKQ_SHARED, NGINX (default nginx),
#   KEEP_TMP=1 keeps the temporary directory for inspection.
# Exit status: 0 pass, 1 fail, 77 skipped (server, load generator, nginx or
#   model missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
SHARED=${LKQ_SHARED:-$ROOT/../shared}
SERVER=$BUILD/livekvq-server
LOAD=$BUILD/loadtests/lkq_load
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
MODEL=${LKQ_TEST_MODEL:-$SHARED/models/stories260K/stories260K.bin}
TOKENIZER=${LKQ_TEST_TOKENIZER-$SHARED/models/stories260K/tok512.bin}
CORPUS=$SHARED/data/moby-dick.txt

say() { echo "test_nginx: $*" >&2; }
skip() { say "SKIP: $*"; exit 77; }
fail() { say "FAIL: $*"; exit 1; }

[ -x "$SERVER" ] || skip "no $SERVER (build the server first)"
[ -x "$LOAD" ] || skip "no $LOAD (libcurl missing at build time?)"
[ -x "$NGINX" ] || skip "no nginx (apt-get install nginx)"
[ -r "$MODEL" ] || skip "no model $MODEL"
[ -r "$CORPUS" ] || skip "no corpus $CORPUS"
command -v curl >/dev/null || skip "no curl"
command -v python3 >/dev/null || skip "no python3"

T=$(mktemp -d /tmp/lkq_nginx.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        say "kept $T"
    else
        rm -rf "$T"
    fi
}
trap cleanup EXIT

# A free loopback port (the kernel picks; a race with other processes is
# possible but unlikely in the short window before the server binds).
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# http_get URL -> body on stdout, fails on a non-2xx status.
http_get() { curl -fsS --max-time 5 "$1"; }

wait_health() { # URL SECONDS
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        if curl -fsS --max-time 1 -o /dev/null "$1/health" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

tok_args=()
[ -n "$TOKENIZER" ] && tok_args=(--tokenizer "$TOKENIZER")

start_replica() { # NAME PORT -> pid in $REPLICA_PID
    "$SERVER" -m "$MODEL" "${tok_args[@]}" --host 127.0.0.1 --port "$2" \
        --threads 1 --max-seqs 4 --max-queue 32 >"$T/$1.log" 2>&1 &
    REPLICA_PID=$!
    PIDS+=("$REPLICA_PID")
}

# completions counted by a replica: sum of livekvq_requests_total on the
# completions endpoint with code 200 (0 when absent).
served() {
    http_get "http://127.0.0.1:$1/metrics" |
        awk '/^livekvq_requests_total\{/ && /completions/ && /code="200"/ { s += $NF } END { print s + 0 }'
}

PA=$(free_port)
PB=$(free_port)
while [ "$PB" = "$PA" ]; do PB=$(free_port); done
PN=$(free_port)
say "replicas on 127.0.0.1:$PA and :$PB, nginx on :$PN, files in $T"
start_replica a "$PA"
PID_A=$REPLICA_PID
start_replica b "$PB"
wait_health "http://127.0.0.1:$PA" 60 || { cat "$T/a.log" >&2; fail "replica a never became healthy"; }
wait_health "http://127.0.0.1:$PB" 60 || { cat "$T/b.log" >&2; fail "replica b never became healthy"; }

# --- nginx with the shipped site config ---------------------------------------
mkdir -p "$T/nginx/tmp" "$T/nginx/logs"
awk -v a="$PA" -v b="$PB" -v n="$PN" -v logf="$T/nginx/logs/access.log" '
    /# BEGIN replicas/ { print; skip = 1
        printf "    server 127.0.0.1:%s max_fails=1 fail_timeout=10s;\n", a
        printf "    server 127.0.0.1:%s max_fails=1 fail_timeout=10s;\n", b
        next }
    /# END replicas/ { skip = 0 }
    skip { next }
    /^ *listen / { printf "    listen 127.0.0.1:%s;\n", n; next }
    { gsub("/var/log/nginx/livekvq.access.log", logf); print }
' "$ROOT/deploy/nginx/livekvq.conf" >"$T/nginx/livekvq.conf"
grep -q "127.0.0.1:$PA" "$T/nginx/livekvq.conf" || fail "could not rewrite the upstream block"
grep -q "listen 127.0.0.1:$PN" "$T/nginx/livekvq.conf" || fail "could not rewrite the listen line"
workers=""
if [ "$(id -u)" = 0 ]; then
    # workers drop to nobody: let them use the temp directories
    workers="nobody nogroup"
    chmod 755 "$T" "$T/nginx"
    chown -R nobody:nogroup "$T/nginx/tmp"
fi
"$ROOT/deploy/nginx/main_conf.sh" "$T/nginx" "$workers"
"$NGINX" -t -q -p "$T/nginx" -c "$T/nginx/nginx.conf" || fail "nginx -t rejects deploy/nginx/livekvq.conf"
"$NGINX" -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;' 2>>"$T/nginx/logs/stderr.log" &
PIDS+=($!)
wait_health "http://127.0.0.1:$PN" 10 || { cat "$T/nginx/logs/"* >&2; fail "nginx does not answer /health"; }
URL=http://127.0.0.1:$PN

LOADARGS=(--url "$URL" -p 48 -m 12 --chars-per-token 1.7 --timeout 60 --pause 0 -q)
# stories260K: a 512-token context, about 1.7 bytes of English per token.

# --- 1. load through nginx reaches both replicas ---------------------------------
say "phase 1: 24 requests at concurrency 4 through nginx"
rc=0
"$LOAD" "${LOADARGS[@]}" -c 4 -n 24 --json "$T/phase1.json" >"$T/phase1.txt" 2>&1 || rc=$?
[ "$rc" = 0 ] || { cat "$T/phase1.txt" >&2; fail "phase 1: lkq_load exit $rc"; }
# POST /v1/... lines of the access log served by a replica
posts_to() { grep "POST /v1/" "$T/nginx/logs/access.log" | grep -c "upstream=127.0.0.1:$1 " || true; }
hits_a=$(posts_to "$PA")
hits_b=$(posts_to "$PB")
say "nginx access log: replica a served $hits_a, replica b $hits_b"
if [ "$hits_a" -eq 0 ] || [ "$hits_b" -eq 0 ]; then
    fail "nginx did not spread requests over both replicas"
fi
sa=$(served "$PA")
sb=$(served "$PB")
say "replica counters livekvq_requests_total{completions,200}: a=$sa b=$sb"
if [ "$sa" -eq 0 ] || [ "$sb" -eq 0 ]; then
    fail "a replica's request counter did not move"
fi
[ $((sa + sb)) -ge 24 ] || fail "replicas counted $((sa + sb)) completions, 24 were sent"

# --- 2. the dashboards and alerts use metrics that exist --------------------------
http_get "http://127.0.0.1:$PA/metrics" >"$T/metrics.txt"
# sample names, and names announced by "# TYPE" (a per-layer gauge has no
# sample until a sequence runs)
awk '/^# TYPE / { print $3; next } !/^#/ { n = $1; sub(/\{.*/, "", n); print n }' "$T/metrics.txt" |
    sort -u >"$T/exported.txt"
# (comment lines left out: they may name other servers' metrics)
sed -e '/^[[:space:]]*#/d' "$ROOT/deploy/prometheus/alerts.yml" \
    "$ROOT/deploy/grafana/livekvq-dashboard.json" "$ROOT/deploy/k8s/"*.yaml |
    grep -oE '(livekvq_[a-z0-9_]+|vllm:[a-z_]+)' | sort -u >"$T/used.txt"
missing=$(comm -23 "$T/used.txt" "$T/exported.txt" | tr '\n' ' ')
[ -z "$missing" ] || fail "metrics used by deploy/ but not exported by the server: $missing"
say "all $(wc -l <"$T/used.txt") metric names used in deploy/ are exported"

# --- 3. kill one replica mid-run -------------------------------------------------
say "phase 2: 12 s at concurrency 4; replica a killed after 4 s"
"$LOAD" "${LOADARGS[@]}" -c 4 -d 12 --keep-going --json "$T/phase2.json" >"$T/phase2.txt" 2>&1 &
LOADPID=$!
sleep 4
kill -KILL "$PID_A"
wait "$PID_A" 2>/dev/null || true
rc2=0
wait "$LOADPID" || rc2=$?
failed2=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["failed"])' "$T/phase2.json")
ok2=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["ok"])' "$T/phase2.json")
say "phase 2: ok $ok2, failed $failed2 (exit $rc2)"
[ "$failed2" -le 4 ] || { cat "$T/phase2.txt" >&2; fail "$failed2 requests failed: more than the 4 that can be in flight on the killed replica"; }
[ "$rc2" = 0 ] || [ "$rc2" = 3 ] || fail "lkq_load exit $rc2 in phase 2"
# replica b kept serving during phase 2
now_b=$(posts_to "$PB")
[ "$now_b" -gt "$hits_b" ] || fail "replica b took no requests in phase 2"

say "phase 3: 12 new requests after the kill"
rc=0
"$LOAD" "${LOADARGS[@]}" -c 2 -n 12 --json "$T/phase3.json" >"$T/phase3.txt" 2>&1 || rc=$?
[ "$rc" = 0 ] || { cat "$T/phase3.txt" >&2; fail "new requests failed after one replica died (lkq_load exit $rc)"; }
ok3=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["ok"])' "$T/phase3.json")
[ "$ok3" = 12 ] || fail "phase 3: $ok3 of 12 succeeded"
say "PASS: both replicas served ($hits_a / $hits_b), $failed2 in-flight failure(s) at the kill, 12/12 after it"
