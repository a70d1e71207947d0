#!/usr/bin/env bash
# bench/kv_bits.sh [CTX] [MODES] - quality and memory of the LiveKVQuant-P
# cache at each code width (kernels/kvq.h: K and V bits apart) against the
# FP16 cache, on SmolLM2-135M-Instruct and Moby-Dick (from "CHAPTER 1."),
# one window of CTX tokens (default 4096). Every run is
# `livekvq perplexity -m MODEL -f TEXT -c CTX --kv-cache MODE --json`,
# appended to docs/data/kv_bits.jsonl; prints a markdown table with the
# bits per element split by kind (codes, scale/zero snapshots, outlier
# slots, FP16 pages: the sinks; header and padding are in "other").
#
#   bench/kv_bits.sh 4096 "k2v2 k3v2 int3 int4 int8"
#   LKQ_FLAGS="--block-tokens 128" bench/kv_bits.sh 4096 int4
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CTX=${1:-4096}
MODES=${2:-"k2v2 k3v2 int3 int4 int8"}
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${LKQ_TEXT:-$ROOT/../shared/data/moby-dick.txt}
BUILD=${LKQ_BUILD:-$ROOT/build}
OUT=$ROOT/docs/data
mkdir -p "$OUT"
printf '| mode | ctx | ppl fp16 | ppl | Δppl | KLD | top-1 | bits/elt | codes | snapshots | outliers | fp16 pages | other | outliers used | clamped |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for mode in $MODES; do
    # shellcheck disable=SC2086
    line=$("$BUILD/livekvq" perplexity -m "$MODEL" -f "$TEXT" -c "$CTX" -q --json \
        --json-out "$OUT/kv_bits.jsonl" --kv-cache "$mode" ${LKQ_FLAGS:-} | tail -n 1)
    python3 - "$mode" "$line" <<'PY'
import json, sys
mode, r = sys.argv[1], json.loads(sys.argv[2])
el = r["kv_bytes_fp16"] / 2.0  # elements held
b = lambda k: 8.0 * r[k] / el
other = r["bits_per_element"] - b("kv_bytes_int4") - b("kv_bytes_scales") - b("kv_bytes_outliers") - b("kv_bytes_fp16_staging")
print("| %s | %d | %.4f | %.4f | %+.3f%% | %.5f | %.4f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f%% | %.3f%% |" % (
    mode, r["ctx"], r["ppl_fp16"], r["ppl"], 100 * r["ppl_rel"], r["kld"], r["top1_agree"],
    r["bits_per_element"], b("kv_bytes_int4"), b("kv_bytes_scales"), b("kv_bytes_outliers"),
    b("kv_bytes_fp16_staging"), other, 100 * r["outlier_ratio"], 100 * r["clamp_ratio"]))
PY
done
