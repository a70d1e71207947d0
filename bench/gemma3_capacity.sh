#!/usr/bin/env bash
# bench/gemma3_capacity.sh - pool capacity of livekvq-server for Gemma-3-270M
# at 32K context in a 1 GiB KV budget (docs/gemma3.md, section 3; not run by
# tests). For each cache mode and --max-seqs, starts the server idle on
# 127.0.0.1:18093, reads the startup line and the pool's blocks from /metrics,
# and stops it. Nothing is prefilled. MODES: "global/window" pairs (default
# every pair below), e.g. MODES="int4/int8 fp16/fp16".
set -u
cd "$(dirname "$0")/.."
for ms in ${SEQS:-16 64}; do
  for m in ${MODES:-int4/fp16 int4/int8 int4/int4 fp16/fp16}; do
    set -- ${m/\// }
    build/livekvq-server -m models/gemma-3-270m-q4_k_m.gguf --host 127.0.0.1 --port 18093 \
        -c 32768 --kv-cache $1 --window-kv $2 --kv-budget 1073741824 --max-seqs $ms -t 2 \
        >/tmp/gemma3_cap.log 2>&1 &
    pid=$!
    for i in $(seq 50); do curl -sf http://127.0.0.1:18093/health >/dev/null && break; sleep 0.1; done
    echo "== kv_cache=$1 window_kv=$2 max_seqs=$ms"
    head -1 /tmp/gemma3_cap.log
    curl -s http://127.0.0.1:18093/metrics | grep -E '^livekvq_kv_(layer_blocks_total|pool_bytes)|^livekvq_max_sequences' | grep -v ' 0$'
    kill $pid; wait $pid 2>/dev/null
  done
done
