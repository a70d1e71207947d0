#!/usr/bin/env bash
# bench/gemma3_speed.sh [REPS] - CPU speed of LiveKVQuant vs llama.cpp on
# Gemma-3-270M (docs/gemma3.md, section 4): prompt processing of 512 and
# 8192 tokens, 64 tokens generated after a 16384-token prompt; same file,
# 2 threads (LKQ_THREADS), FP16 KV cache in both engines, the two engines
# alternating in one run (bench/run_bench.sh), median of REPS rounds
# (default 3). Writes docs/data/gemma3/speed.md (OUT=FILE: elsewhere) and
# prints the table. Not run by tests; ~10 minutes a round on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${1:-3}
export LKQ_MODEL=${LKQ_MODEL:-$ROOT/models/gemma-3-270m-q4_k_m.gguf}
export LKQ_PP=512,8192 LKQ_TG=16384
export OUT=${OUT:-$ROOT/docs/data/gemma3/speed.md}
export CMD_NAME="bench/gemma3_speed.sh $REPS"
exec "$ROOT/bench/run_bench.sh" "$REPS"
