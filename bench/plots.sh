#!/usr/bin/env bash
# bench/plots.sh [DATA_DIR] [IMG_DIR] - PNG plots of the evaluation results
# with gnuplot (Debian: apt-get install gnuplot-nox), from the CSVs that
# `livekvq ablate` / `livekvq needle` / bench/kv_quality.sh wrote:
#   pareto.png             KLD vs bits per element of every INT4 cell of the
#                          one-knob-at-a-time sweep (DATA/ablate-oat-2k), with
#                          the Pareto front (lowest KLD for at most x bits)
#   quality_vs_ctx.png     KLD and perplexity change vs context, per cache
#                          configuration (DATA/kv_quality.csv)
#   memory_vs_ctx.png      peak KV bytes vs context, FP16 and INT4 (DATA/ctx-sweep)
#   speed_vs_ctx.png       prefill tok/s and decode ms/token vs context (DATA/ctx-sweep)
#   ema_per_layer.png      mean EMA range width per layer over prefill chunks,
#                          K and V, longest INT4 cell of DATA/ctx-sweep
#   outliers_per_layer.png FP16 outlier and clamp ratio per layer, same cell
#   needle.png             retrieval accuracy vs length, FP16 and INT4 (DATA/needle)
# A plot whose data is missing is skipped with a message; exits non-zero only
# when gnuplot is missing or fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${1:-$ROOT/docs/data}
IMG=${2:-$ROOT/docs/img}
command -v gnuplot >/dev/null || { echo "plots: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
mkdir -p "$IMG"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
TERM_PNG="set terminal pngcairo size 900,560 font 'DejaVu Sans,10' noenhanced"
if ! gnuplot -e "set terminal pngcairo" </dev/null 2>/dev/null; then
    TERM_PNG="set terminal png size 900,560 noenhanced"
fi

# csvcols FILE COL... : whitespace-separated columns picked by header name
# (quotes stripped, spaces in values turned into '_').
csvcols() {
    local f=$1
    shift
    awk -F, -v want="$*" '
        NR == 1 { n = split(want, w, " "); for (i = 1; i <= NF; i++) idx[$i] = i;
                  for (j = 1; j <= n; j++) if (!(w[j] in idx)) { print "no column " w[j] > "/dev/stderr"; exit 1 }
                  next }
        { line = ""; for (j = 1; j <= n; j++) { v = $(idx[w[j]]); gsub(/"/, "", v); gsub(/ /, "_", v);
                                                if (v == "") v = "NaN"; line = line (j > 1 ? " " : "") v }
          print line }' "$f"
}

plot() { gnuplot -e "$TERM_PNG" "$@"; }
made=0
skip() { echo "plots: skipping $1 ($2)" >&2; }

# --- Pareto front: quality vs bits per element -------------------------------
OAT=$DATA/ablate-oat-2k/ablate.csv
if [ -s "$OAT" ]; then
    csvcols "$OAT" kv_cache bits_per_element kld ppl_rel label |
        awk '$1 == "int4" && $3 != "NaN" { print $2, $3, 100 * $4, $5 }' | sort -g >"$TMP/pareto.dat"
    awk 'BEGIN { best = 1e9 } { if ($2 < best) { best = $2; print $1, $2 } }' "$TMP/pareto.dat" >"$TMP/front.dat"
    # labels: the default, the front, and cells whose bits differ from the
    # default's (most knobs leave the bits alone: one cluster, one note)
    dbits=$(awk '$4 == "default" { print $1 }' "$TMP/pareto.dat")
    awk -v db="$dbits" 'NR == FNR { front[$1 " " $2] = 1; next }
        { if ($4 == "default" || ($1 " " $2) in front || $1 != db) print $1, $2, $4 }' \
        "$TMP/front.dat" "$TMP/pareto.dat" >"$TMP/labels.dat"
    plot -e "set output '$IMG/pareto.png'; set title 'INT4 cache: KL divergence to FP16 vs bits per element (SmolLM2-135M, 2K context, one knob changed at a time)';
        set xlabel 'bits per KV element (all overheads)'; set ylabel 'mean KL(P_fp16 || P_int4), nats'; set logscale y; set grid;
        set key top right; set label 1 'unlabelled: knobs that do not change the bits (see the table)' at graph 0.02, graph 0.04 font ',8';
        plot '$TMP/pareto.dat' using 1:2 with points pt 7 ps 1.2 title 'cells',
             '$TMP/labels.dat' using 1:2:3 with labels offset 0,0.9 font ',8' notitle,
             '$TMP/front.dat' using 1:2 with steps lw 2 title 'Pareto front'"
    made=$((made + 1))
else
    skip pareto.png "no $OAT"
fi

# --- quality vs context -------------------------------------------------------
KVQ=$DATA/kv_quality.csv
if [ -s "$KVQ" ]; then
    # configuration names of bench/kv_quality.sh; rows of other experiments
    # (other EMA settings) are left out; the last row of a (config, ctx) wins
    csvcols "$KVQ" ctx warmup_chunks ema_decay ema_clip clip_quantile outlier_budget sink_tokens k_quant kld ppl_rel |
        awk '$3 == 0.3 && $4 == 4 && $5 == 0.005 {
                 c = "other";
                 if ($8 == "token" && $6 == 0 && $7 == 0 && $2 == 0) c = "naive";
                 else if ($8 == "channel" && $6 == 0.005 && $7 == 4 && $2 == 2) c = "default";
                 else if ($8 == "channel" && $6 == 0 && $2 == 2) c = "no-outliers";
                 else if ($8 == "channel" && $6 == 0.005 && $2 == 0) c = "no-warmup";
                 v[c " " $1] = $9 " " 100 * $10 }
             END { for (k in v) print k, v[k] }' | sort -k1,1 -k2,2n >"$TMP/q.dat"
    for c in default no-outliers no-warmup naive; do awk -v c=$c '$1 == c { print $2, $3, $4 }' "$TMP/q.dat" >"$TMP/q_$c.dat"; done
    plot -e "set output '$IMG/quality_vs_ctx.png'; set multiplot layout 1,2 title 'Quality vs context (SmolLM2-135M, Moby-Dick, one window)';
        set logscale x 2; set xtics (1024, 2048, 4096, 8192); set xrange [900:9300]; set grid; set xlabel 'context (tokens)'; set key top left;
        set ylabel 'mean KLD vs FP16 cache';
        plot for [c in 'default no-outliers no-warmup naive'] '$TMP/q_'.c.'.dat' using 1:2 with linespoints lw 2 title c;
        set ylabel 'perplexity change vs FP16 cache (%)';
        plot for [c in 'default no-outliers no-warmup naive'] '$TMP/q_'.c.'.dat' using 1:3 with linespoints lw 2 title c;
        unset multiplot"
    made=$((made + 1))
else
    skip quality_vs_ctx.png "no $KVQ"
fi

# --- memory and speed vs context -----------------------------------------------
CTX=$DATA/ctx-sweep/ablate.csv
if [ -s "$CTX" ]; then
    csvcols "$CTX" kv_cache ctx kv_peak_bytes kv_bytes_fp16 prefill_tok_s decode_ms_per_tok |
        sort -k1,1 -k2,2n >"$TMP/ctx.dat"
    awk '$1 == "fp16"' "$TMP/ctx.dat" >"$TMP/ctx_fp16.dat"
    awk '$1 == "int4"' "$TMP/ctx.dat" >"$TMP/ctx_int4.dat"
    # FP16 / INT4 ratio as labels on the INT4 points
    join <(awk '{ print $2, $3 }' "$TMP/ctx_fp16.dat") <(awk '{ print $2, $3 }' "$TMP/ctx_int4.dat") |
        awk '{ printf "%s %s %.2fx\n", $1, $3 / 1048576, $2 / $3 }' >"$TMP/ratio.dat"
    plot -e "set output '$IMG/memory_vs_ctx.png'; set title 'Peak KV cache bytes vs context (SmolLM2-135M: 30 layers x 3 KV heads x 64)';
        set xlabel 'context (tokens)'; set ylabel 'MiB'; set grid; set key top left; set logscale x 2; set xtics (1024, 2048, 4096, 8192); set xrange [900:9300];
        plot '$TMP/ctx_fp16.dat' using 2:(\$3/1048576) with linespoints lw 2 pt 7 title 'FP16 cache',
             '$TMP/ctx_int4.dat' using 2:(\$3/1048576) with linespoints lw 2 pt 7 title 'INT4 cache (defaults)',
             '$TMP/ratio.dat' using 1:2:3 with labels offset 0,-1.2 title '' "
    made=$((made + 1))
    plot -e "set output '$IMG/speed_vs_ctx.png'; set multiplot layout 1,2 title 'Speed vs context (2 shared cores; noisy)';
        set logscale x 2; set xtics (1024, 2048, 4096, 8192); set xrange [900:9300]; set grid; set xlabel 'context (tokens)'; set key bottom left;
        set ylabel 'prefill tokens/s';
        plot '$TMP/ctx_fp16.dat' using 2:5 with linespoints lw 2 title 'FP16', '$TMP/ctx_int4.dat' using 2:5 with linespoints lw 2 title 'INT4';
        set ylabel 'decode ms/token at the end of the context'; set key top left;
        plot '$TMP/ctx_fp16.dat' using 2:6 with linespoints lw 2 title 'FP16', '$TMP/ctx_int4.dat' using 2:6 with linespoints lw 2 title 'INT4';
        unset multiplot"
    made=$((made + 1))
else
    skip "memory_vs_ctx.png, speed_vs_ctx.png" "no $CTX"
fi

# --- per layer: EMA evolution and outliers (longest INT4 cell) ------------------
EMA=$DATA/ctx-sweep/ema.csv
LAY=$DATA/ctx-sweep/layers.csv
if [ -s "$EMA" ] && [ -s "$LAY" ]; then
    cell=$(csvcols "$EMA" cell | sort | uniq -c | sort -k1,1nr | awk 'NR == 1 { print $2 }')
    label=$(csvcols "$EMA" cell label | awk -v c="$cell" '$1 == c && !done { print $2; done = 1 }')
    csvcols "$EMA" cell chunk layer tensor width | awk -v c="$cell" '$1 == c { print $2, $3, $4, $5 }' >"$TMP/ema.dat"
    nl=$(awk 'BEGIN { m = 0 } { if ($2 > m) m = $2 } END { print m + 1 }' "$TMP/ema.dat")
    for t in k v; do # one block per layer (a blank line between), chunks in order
        awk -v t=$t '$3 == t' "$TMP/ema.dat" | sort -k2,2n -k1,1n |
            awk 'NR > 1 && $2 != prev { print "" } { print; prev = $2 }' >"$TMP/ema_$t.dat"
    done
    plot -e "set output '$IMG/ema_per_layer.png'; set multiplot layout 1,2 title 'EMA range (mean width over channels) per layer after each prefill chunk ($label)';
        set xlabel 'prefill chunk'; set grid; set key off; set logscale y;
        set palette defined (0 'blue', 0.5 'green', 1 'red'); set cbrange [0:$nl-1]; set cblabel 'layer';
        set ylabel 'K range width'; plot '$TMP/ema_k.dat' using 1:4:2 with linespoints pt 7 ps 0.4 lw 1.5 lc palette;
        set ylabel 'V range width'; plot '$TMP/ema_v.dat' using 1:4:2 with linespoints pt 7 ps 0.4 lw 1.5 lc palette;
        unset multiplot"
    csvcols "$LAY" cell layer n_quantized k_outliers v_outliers clamped |
        awk -v c="$cell" '$1 == c && $3 > 0 { print $2, 100 * $4 / $3, 100 * $5 / $3, 100 * $6 / $3 }' >"$TMP/lay.dat"
    plot -e "set output '$IMG/outliers_per_layer.png'; set title 'FP16 outliers and clamped values per layer, % of quantized elements ($label)';
        set xlabel 'layer'; set ylabel '% of K+V elements in INT4 blocks'; set grid; set key top left horizontal; set yrange [0:*]; set offsets 0, 0, graph 0.15, 0;
        set style data histograms; set style histogram rowstacked; set style fill solid 0.8 border -1; set boxwidth 0.8;
        plot '$TMP/lay.dat' using 2:xtic(1) title 'K outliers (FP16)', '' using 3 title 'V outliers (FP16)', '' using 4 title 'clamped (over budget)'"
    made=$((made + 2))
else
    skip "ema_per_layer.png, outliers_per_layer.png" "no $EMA / $LAY"
fi

# --- needle accuracy -------------------------------------------------------------
NDL=$DATA/needle/needle_summary.csv
if [ -s "$NDL" ]; then
    csvcols "$NDL" kv_cache length n correct |
        awk '{ n[$1 " " $2] += $3; c[$1 " " $2] += $4 } END { for (k in n) print k, c[k] / n[k] }' |
        sort -k1,1 -k2,2n >"$TMP/ndl.dat"
    awk '$1 == "fp16"' "$TMP/ndl.dat" >"$TMP/ndl_fp16.dat"
    awk '$1 == "int4"' "$TMP/ndl.dat" >"$TMP/ndl_int4.dat"
    plot -e "set output '$IMG/needle.png'; set title 'Pass-key retrieval accuracy (all depths) vs prompt length';
        set xlabel 'prompt length (tokens)'; set ylabel 'accuracy'; set yrange [0:1.05]; set grid; set logscale x 2; set key bottom left;
        plot '$TMP/ndl_fp16.dat' using 2:3 with linespoints lw 2 pt 7 title 'FP16 cache', '$TMP/ndl_int4.dat' using 2:3 with linespoints lw 2 pt 5 title 'INT4 cache'"
    made=$((made + 1))
else
    skip needle.png "no $NDL"
fi
echo "plots: $made PNG(s) in $IMG" >&2
