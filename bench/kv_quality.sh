#!/usr/bin/env bash
# bench/kv_quality.sh [CTXS] - quality and memory of the LiveKVQuant-P cache
# against the FP16 cache on SmolLM2-135M-Instruct and Moby-Dick (from
# "CHAPTER 1."), one window per context, for the default configuration and
# the ablations that switch its parts off. Appends every run to
# docs/data/kv_quality.csv (and .jsonl) and prints a markdown table.
#
#   bench/kv_quality.sh "1024 2048 4096 8192"
#
# Configurations (flags given to `livekvq perplexity`):
#   default       the defaults of config/kvq_config.h
#   no-outliers   --outlier-budget 0      (EMA ranges, clamping, no FP16 outliers)
#   no-warmup     --warmup-chunks 0       (quantize from the first chunk)
#   naive         --k-quant token --outlier-budget 0 --sink-tokens 0 --warmup-chunks 0
#                 (per-token INT4 for K and V, min/max per group: no EMA, no outliers)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CTXS=${1:-"1024 2048 4096 8192"}
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${LKQ_TEXT:-$ROOT/../shared/data/moby-dick.txt}
OUT=$ROOT/docs/data
mkdir -p "$OUT"
"$ROOT/scripts/build.sh"
declare -A CFG=(
    [default]=""
    [no-outliers]="--outlier-budget 0"
    [no-warmup]="--warmup-chunks 0"
    [naive]="--k-quant token --outlier-budget 0 --sink-tokens 0 --warmup-chunks 0"
)
ORDER=(default no-outliers no-warmup naive)
printf '| config | ctx | ppl fp16 | ppl int4 | Δppl | KLD | top-1 | bits/elt | KV bytes | × smaller | outliers | clamped |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for ctx in $CTXS; do
    for name in "${ORDER[@]}"; do
        # shellcheck disable=SC2086
        line=$("$ROOT/build/livekvq" perplexity -m "$MODEL" -f "$TEXT" -c "$ctx" -q --json \
            --csv "$OUT/kv_quality.csv" --json-out "$OUT/kv_quality.jsonl" ${CFG[$name]} | tail -n 1)
        python3 - "$name" "$line" <<'PY'
import json, sys
name, r = sys.argv[1], json.loads(sys.argv[2])
print("| %s | %d | %.4f | %.4f | %+.3f%% | %.5f | %.4f | %.3f | %d | %.2f | %.3f%% | %.3f%% |" % (
    name, r["ctx"], r["ppl_fp16"], r["ppl"], 100 * r["ppl_rel"], r["kld"], r["top1_agree"],
    r["bits_per_element"], r["kv_bytes"], r["kv_bytes_fp16"] / max(r["kv_bytes"], 1),
    100 * r["outlier_ratio"], 100 * r["clamp_ratio"]))
PY
    done
done
