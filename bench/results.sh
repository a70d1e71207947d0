#!/usr/bin/env bash
# bench/results.sh [--run] [--full] - builds docs/results.md (tables from the
# CSVs under docs/data, PNG plots under docs/img via bench/plots.sh, the exact
# commands) in one command:
#
#   bench/results.sh          regenerate the doc and plots from the CSVs
#   bench/results.sh --run    first run (or resume) the reduced sweeps that
#                             the doc reports, then regenerate
#   bench/results.sh --full   first run (or resume) the full grid (hours on 2
#                             cores: chunk_size x warmup_chunks x ema_decay at
#                             1K-8K, needle at 1K-8K x 5 depths x 3 trials)
#
# Every sweep is resumable: finished cells / answers are never rerun, so an
# interrupted --run or --full continues where it stopped. Heavy runs go under
# `nice -n 10`. Environment: LKQ_MODEL, LKQ_TEXT, LKQ_BIN override the model,
# the text and the livekvq binary.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODEL=${LKQ_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${LKQ_TEXT:-../shared/data/moby-dick.txt}
BIN=${LKQ_BIN:-build/livekvq}
DATA=docs/data
OUT=docs/results.md
RUN=0
FULL=0
for a in "$@"; do
    case $a in
        --run) RUN=1 ;;
        --full) RUN=1; FULL=1 ;;
        *) echo "usage: bench/results.sh [--run] [--full]" >&2; exit 2 ;;
    esac
done

# The commands, exactly as run (also printed into the doc).
CMD_OAT="$BIN ablate -m $MODEL -f $TEXT -o $DATA/ablate-oat-2k -c 2048 --design oat \
--vary kv_cache=fp16 --vary chunk_size=256,1024 --vary warmup_chunks=0,1 --vary ema_decay=0,0.6,0.9 \
--vary ema_clip=1,16 --vary clip_quantile=0.001,0.02 --vary v_group=16,32 --vary outlier_budget=0,0.01,0.02 \
--vary sink_tokens=0,16 --vary k_quant=token"
CMD_CTX="$BIN ablate -m $MODEL -f $TEXT -o $DATA/ctx-sweep --vary ctx=1024,2048,4096,8192 \
--vary kv_cache=fp16,int4 --no-quality --decode 16"
CMD_NDL="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle --lengths 1024,2048 --depths 0,25,50,75,100 \
--trials 4 --seed 1234"
CMD_NDL_MULTI="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle --lengths 1024 --depths 0,25,50,75,100 \
--trials 2 --seed 1234 --variant multi"
CMD_NDL_KV="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle --lengths 1024 --depths 0,25,50,75,100 \
--trials 2 --seed 1234 --variant kv"
CMD_NDL_4K="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle --lengths 4096 --depths 0,25,50,75,100 \
--trials 4 --seed 1234"
CMD_NDL_MORE="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle --lengths 2048,4096 --depths 0,25,50,75,100 \
--trials 8 --seed 1234"
CMD_NDL_KW="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle-keepwarm --lengths 2048,4096 --depths 0 \
--trials 8 --seed 1234 --kv-cache int4 --set keep_warmup_fp16=1"
CMD_NDL_8K="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle --lengths 8192 --depths 0,25,50,75,100 \
--trials 2 --seed 1234"
CMD_NDL_K3V2="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle-bits --lengths 4096 --depths 0,25,50,75,100 \
--trials 2 --seed 1234 --kv-cache fp16,k3v2"
CMD_NDL_K2V2="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle-bits --lengths 4096 --depths 0,25,50,75,100 \
--trials 1 --seed 1234 --kv-cache fp16,int2"
CMD_A4K="$BIN ablate -m $MODEL -f $TEXT -o $DATA/ablate-4k -c 4096 --vary warmup_chunks=0,1,2 \
--vary sink_tokens=4,16"
CMD_A4K_CHUNK="$BIN ablate -m $MODEL -f $TEXT -o $DATA/ablate-4k-chunk -c 4096 --vary chunk_size=256,1024"
CMD_PRF="$BIN profile -m $MODEL -f $TEXT -c 2048 -n 32"
CMD_FULL_GRID="$BIN ablate -m $MODEL -f $TEXT -o $DATA/ablate-grid --vary ctx=1024,2048,4096,8192 \
--vary chunk_size=256,512,1024 --vary warmup_chunks=0,1,2 --vary ema_decay=0,0.3,0.6,0.9"
CMD_FULL_NDL="$BIN needle -m $MODEL -f $TEXT -o $DATA/needle-full --lengths 1024,2048,4096,8192 \
--depths 0,25,50,75,100 --trials 3 --seed 1234"

if [ $RUN = 1 ]; then
    scripts/build.sh
    nice -n 10 $CMD_OAT
    nice -n 10 $CMD_CTX
    nice -n 10 $CMD_NDL
    nice -n 10 $CMD_NDL_MULTI
    nice -n 10 $CMD_NDL_KV
    nice -n 10 $CMD_NDL_4K
    nice -n 10 $CMD_NDL_MORE
    nice -n 10 $CMD_NDL_KW
    nice -n 10 $CMD_A4K
    nice -n 10 $CMD_A4K_CHUNK
    nice -n 10 $CMD_NDL_8K
    nice -n 10 $CMD_NDL_K3V2
    nice -n 10 $CMD_NDL_K2V2
    nice -n 10 $CMD_PRF >$DATA/profile-2k.txt
    if [ $FULL = 1 ]; then
        nice -n 10 $CMD_FULL_GRID
        nice -n 10 $CMD_FULL_NDL
    fi
fi

bench/plots.sh "$DATA" docs/img
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

# csvcols FILE COL... (as in bench/plots.sh): columns by header name, '|'-separated.
csvcols() {
    local f=$1
    shift
    awk -F, -v want="$*" '
        NR == 1 { n = split(want, w, " "); for (i = 1; i <= NF; i++) idx[$i] = i; next }
        { line = ""; for (j = 1; j <= n; j++) { v = $(idx[w[j]]); gsub(/"/, "", v);
                                                line = line (j > 1 ? "|" : "") v }
          print line }' "$f"
}

# oat_table [DIR]: one row per cell of an ablate run (default ablate-oat-2k)
oat_table() {
    local f=$DATA/${1:-ablate-oat-2k}/ablate.csv
    [ -s "$f" ] || { echo '_(no data: run `bench/results.sh --run`)_'; return; }
    echo "| cell | Δppl vs FP16 | KLD | top-1 | bits/elt | KV MiB (peak) | outliers | clamped | prefill tok/s | decode ms/tok |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    csvcols "$f" label ppl_rel kld top1_agree bits_per_element kv_peak_bytes outlier_ratio clamp_ratio prefill_tok_s decode_ms_per_tok |
        awk -F'|' '{ b = ($1 == "default") ? "**" : "";
                     printf "| %s%s%s | %+.3f%% | %.5f | %.4f | %.3f | %.2f | %.3f%% | %.3f%% | %.0f | %.1f |\n",
                            b, $1, b, 100 * $2, $3, $4, $5, $6 / 1048576, 100 * $7, 100 * $8, $9, $10 }'
}

ctx_table() {
    local f=$DATA/ctx-sweep/ablate.csv
    [ -s "$f" ] || { echo "_(no data)_"; return; }
    echo "| context | FP16 peak KV MiB | INT4 peak KV MiB | FP16 / INT4 | INT4 bits/elt | prefill tok/s FP16 | INT4 | decode ms/tok FP16 | INT4 |"
    echo "|---|---|---|---|---|---|---|---|---|"
    csvcols "$f" ctx kv_cache kv_peak_bytes bits_per_element prefill_tok_s decode_ms_per_tok |
        awk -F'|' '{ k = $1; if ($2 == "fp16") { fm[k] = $3; fp[k] = $5; fd[k] = $6 } else { im[k] = $3; ib[k] = $4; ip[k] = $5; id[k] = $6 }; ks[k] = 1 }
             END { for (k in ks) printf "%d|%.2f|%.2f|%.2fx|%.3f|%.0f|%.0f|%.1f|%.1f\n", k, fm[k] / 1048576, im[k] / 1048576,
                                            im[k] ? fm[k] / im[k] : 0, ib[k], fp[k], ip[k], fd[k], id[k] }' |
        sort -t'|' -k1,1n | awk -F'|' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }'
}

# needle_table [SUFFIX] [DIR] [CACHES]: accuracy tables of DATA/DIR (default
# needle)/needle_summary SUFFIX .csv, one per cache (default "fp16 int4")
needle_table() {
    local f=$DATA/${2:-needle}/needle_summary${1:-}.csv
    [ -s "$f" ] || { echo "_(no data)_"; return; }
    for mode in ${3:-fp16 int4}; do
        echo
        echo "**$mode cache** (accuracy; rows: prompt length in tokens, columns: needle depth)"
        echo
        csvcols "$f" kv_cache length depth n correct | awk -F'|' -v m=$mode '
            $1 == m { if (!($2 in L)) { L[$2] = 1; ls[++nl] = $2 } if (!($3 in D)) { D[$3] = 1; ds[++nd] = $3 }
                      n[$2 " " $3] = $4; c[$2 " " $3] = $5 }
            END { printf "| length |"; for (j = 1; j <= nd; j++) printf " %d%% |", ds[j]; print " all |";
                  printf "|---|"; for (j = 1; j <= nd; j++) printf "---|"; print "---|";
                  for (i = 1; i <= nl; i++) { tn = 0; tc = 0; printf "| %d |", ls[i];
                      for (j = 1; j <= nd; j++) { k = ls[i] " " ds[j]; printf " %d/%d |", c[k], n[k]; tn += n[k]; tc += c[k] }
                      printf " %.2f |\n", tn ? tc / tn : 0 } }'
    done
}

# needle_table_raw DIR CACHES: needle_table from the answers of DATA/DIR/needle.csv
# themselves (a run stopped before its end writes no needle_summary.csv)
needle_table_raw() {
    local f=$DATA/$1/needle.csv
    [ -s "$f" ] || { echo "_(no data)_"; return; }
    mkdir -p "$TMPD/$1"
    csvcols "$f" kv_cache length depth correct | awk -F'|' '
        { k = $1 "," $2 "," $3; if (!(k in n)) ks[++m] = k; n[k]++; c[k] += $4 }
        END { print "kv_cache,length,depth,n,correct"; for (i = 1; i <= m; i++) print ks[i] "," n[ks[i]] "," c[ks[i]] }' \
        >"$TMPD/$1/needle_summary.csv"
    DATA=$TMPD needle_table "" "$1" "$2"
}

img() { [ -s "docs/img/$1" ] && echo "![${2}](img/$1)" || echo "_(plot $1 not generated)_"; }

{
cat <<'EOF'
# Evaluation results: LiveKVQuant-P cache on SmolLM2-135M-Instruct

Generated by `bench/results.sh` from the CSVs in `docs/data/` (do not edit by
hand: edit the script). Model SmolLM2-135M-Instruct Q4_1 (30 layers, 3 KV heads
of 64, 8K context), text `../shared/data/moby-dick.txt` from "CHAPTER 1.".
Machine: 2 CPU cores shared with other jobs (AVX2), so **times are noisy**
(compare within a table, not across tables); quality, bits and bytes are
deterministic. Quality at 1K-8K for the default configuration and the
ablations that switch its parts off is in [kvquant.md](kvquant.md) (not
repeated here); its rows are plotted below.

Gemma-3-270M (window layers, 4K-32K, server capacity at 32K): see
[gemma3.md](gemma3.md).

## How to reproduce

```sh
bench/results.sh            # this page and the plots, from the CSVs
bench/results.sh --run      # rerun (resume) the reduced sweeps below first
bench/results.sh --full     # also the full grid (hours on 2 cores)
```
EOF
echo
echo "Reduced sweeps reported here (each resumable: a finished cell is never rerun):"
echo
echo '```sh'
printf '%s\n\n' "$CMD_OAT" "$CMD_CTX" "$CMD_NDL" "$CMD_NDL_MULTI" "$CMD_NDL_KV" "$CMD_NDL_4K" "$CMD_NDL_MORE" "$CMD_NDL_KW" "$CMD_NDL_8K" \
    "$CMD_NDL_K3V2" "$CMD_NDL_K2V2" \
    "$CMD_A4K" "$CMD_A4K_CHUNK" "$CMD_PRF > $DATA/profile-2k.txt"
echo '```'
echo
echo 'The full grid (`--full`; not run for this page: about 144 cells of 1K-8K'
echo "with the FP16 reference beside each, roughly a day on 2 shared cores):"
echo
echo '```sh'
printf '%s\n\n' "$CMD_FULL_GRID" "$CMD_FULL_NDL"
echo '```'
cat <<'EOF'

## 1. Ablation: one knob at a time around the defaults (2K context)

Each cell: one window of 2048 tokens; quality against the FP16 cache run side
by side (perplexity change, mean KL divergence, top-1 agreement over 2047
positions); bits per element all-in at the end of the prompt; a separate
timing run prefills 2032 tokens and decodes 16 (teacher-forced), giving the
peak KV bytes held after any step. Raw rows: `docs/data/ablate-oat-2k/ablate.csv`
(and `.jsonl`, `layers.csv`, `ema.csv`). With chunk 512 and 2 warm-up chunks,
the first 1024 positions are staged in FP16, so half of the window is
scored against INT4 history.

EOF
oat_table
cat <<'EOF'

Noise floor (kvquant.md): two FP16 caches that differ only in page size differ
by KLD 0.00175 and 0.06% perplexity at 1K, so differences below that are not
signal. In the exact evaluation mode (`--exact`: f32 matmuls, the two runs
differ only in the KV cache) the same floor is KLD 1.5e-7.

KV quality side by side with llama.cpp's KV types (f16, q8_0, q5_0, q4_1,
q4_0, iq4_nl) on the same model, tokens and positions, fast and exact mode:
[peers.md](peers.md) (`bench/peers_kv.py`, `bench/peers_report.py`); at
4K with every code width: section 3b.

EOF
img pareto.png "KLD vs bits per element"
cat <<'EOF'

The two knobs whose defaults section 7 revisits, warm-up chunks x sink
tokens, at 4K (one window of 4096 tokens; with W warm-up chunks of 512 the
first 512 W positions see only FP16 history, so the 4K window scores 3584 /
3072 / 2560 positions against INT4 history for W = 0 / 1 / 2). Raw rows:
`docs/data/ablate-4k/ablate.csv`.

EOF
oat_table ablate-4k
cat <<'EOF'

Chunk size at 4K (the 2K window of the one-at-a-time sweep is all warm-up
at chunk 1024, so it could not judge it; the 512 row is the default cell
above, warmup_chunks=2 sink_tokens=4). Raw rows:
`docs/data/ablate-4k-chunk/ablate.csv`.

EOF
oat_table ablate-4k-chunk
cat <<'EOF'

## 2. Memory and speed vs context (FP16 vs INT4, defaults)

Timing-only cells (`--no-quality`): prefill of CTX-16 tokens, 16 decode steps
at the end of the context. Peak KV bytes are exact (all blocks, scale
snapshots, outlier slots, FP16 staging/sinks/tail held), taken between
steps (see the note in section 7). Raw rows:
`docs/data/ctx-sweep/ablate.csv`.

EOF
ctx_table
echo
img memory_vs_ctx.png "KV bytes vs context"
echo
img speed_vs_ctx.png "speed vs context"
cat <<'EOF'

## 3. Quality vs context

From `docs/data/kv_quality.csv` (bench/kv_quality.sh; the table is in
[kvquant.md](kvquant.md)).

EOF
img quality_vs_ctx.png "quality vs context"
cat <<'EOF'

## 3b. Code widths side by side with llama.cpp (SmolLM2, 4K)

Our rows: `livekvq perplexity -c 4096` with the flags of the label (`int4`
the default, `kNvM` K and V at N and M bits, `k2v2` is `--kv-cache int2`,
`-rot0` adds `--kv-rotate 0`: the default, auto, rotates K and V on these
models; the fast mode splits activation outliers), in the fast mode and the exact one
(`--exact`: f32 matmuls, the two runs differ only in the KV cache);
llama.cpp's: its KV types through llama-cpp-python (flash attention; no
exact mode), each against its own f16 run on the same 4096 tokens and 4095
scored positions. The Pareto plot of these points and the 2K run:
[peers.md](peers.md). Pass-key retrieval of the 2-bit modes: section 5.

EOF
python3 bench/peers_report.py --table $DATA/peers/smollm2-4k.csv
echo
cat <<'EOF'

## 4. Per layer: EMA ranges and outliers

From the timing run of the longest INT4 cell of the context sweep (8K, 16
prefill chunks of 512): the mean over channels of each layer's EMA range
width after every chunk, and the FP16 outliers / clamped values per layer at
the end (`docs/data/ctx-sweep/ema.csv`, `layers.csv`).

EOF
img ema_per_layer.png "EMA range per layer over chunks"
echo
img outliers_per_layer.png "outliers per layer"
cat <<'EOF'

## 5. Long-context retrieval (pass key in Moby-Dick)

`livekvq needle`: a 5-digit pass key sentence ("The pass key is 71432.
Remember it. 71432 is the pass key.") inserted at a depth of seed-chosen
Moby-Dick text, then "What is the pass key? Answer with the number only." as
a user message in the model's ChatML template; greedy decoding of 16 tokens;
right when the first number of the answer is the key. Both caches answer the
same prompts (seed 1234). Raw rows: `docs/data/needle/needle.csv`.

EOF
needle_table
echo
img needle.png "needle accuracy vs length"
cat <<'EOF'

Multi-key variant (three labelled pass keys, "red", "green", "blue", one at
the depth and the other two at seed-chosen depths; the question names one),
1K, 2 prompts per depth (`needle_multi.csv`):
EOF
needle_table _multi
cat <<'EOF'

Key-value variant (six "The secret code of the WORD is NNNNN." sentences, the
asked one at the depth, the others at seed-chosen depths), 1K, 2 prompts per
depth (`needle_kv.csv`):
EOF
needle_table _kv
cat <<'EOF'

The 2-bit code widths at 4K: K3V2 (`--kv-cache k3v2`, up to 2 prompts per
depth) and K2V2 (`--kv-cache int2`, 1 per depth: trial 0) against the FP16
cache on the same prompts, current defaults (`docs/data/needle-bits/`; the
FP16 answers are asked once and shared by both runs; cells are right /
asked, so a run stopped early shows as fewer or missing cells). Perplexity
and KLD of the same modes: section 3b.
EOF
needle_table_raw needle-bits "fp16 k3v2 int2"
cat <<'EOF'

## 6. Profile (2K context: 2016-token prompt, 32 decode steps)

`livekvq profile` (phase timers of engine/forward.c; attention includes the
fused dequantization of INT4 history, KV store is the EMA update and live
quantization; sampling timed in the profiler):

```
EOF
if [ -s $DATA/profile-2k.txt ]; then cat $DATA/profile-2k.txt; else echo "(no data)"; fi
echo '```'
if [ -s docs/results_defaults.md ]; then
    echo
    cat docs/results_defaults.md
fi
} >"$OUT"
echo "results: wrote $OUT" >&2
