/*
 * bench_kvq.c - cost of the LiveKVQuant-P cache math (kernels/ref/kvq_ref.c)
 * on SmolLM2-135M shapes: kv_dim 192 (3 KV heads x 64), 128-token blocks,
 * v_group 64, outlier budget 0.005, 512-token chunks, 30 layers.
 *
 *   ninja -C build-kvq bench/bench_kvq && ./build-kvq/bench/bench_kvq [--reps N]
 *
 * Per 512-token chunk and layer the engine runs, for K and V each, the chunk
 * quantiles (Eq. 3-2) and the EMA update (Eq. 3-3), then quantizes 4 blocks
 * (Eq. 3-4). Each line reports the median and the fastest of N timed calls
 * (default 50; the fastest is the undisturbed speed on a shared machine) and
 * elements/s at the median; the last lines estimate the whole chunk for 30
 * layers on one core, to compare with the chunk's forward pass (~1.3 s).
 * Data: Gaussian channels with per-channel scale/offset and 0.3% spikes.
 * Threading: single-threaded.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/kvq.h"

enum { C = 512, T = 128, D = 192, HD = 64, G = 64, LAYERS = 30 };

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float rnd_unif(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return ((float)((rng >> 40) & 0xffffff) + 0.5f) / 16777216.0f;
}

static float rnd_gauss(void)
{
    return sqrtf(-2.0f * logf(rnd_unif())) * cosf(6.2831853f * rnd_unif());
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts t; returns the median, *best gets the minimum. */
static double median(double *t, int n, double *best)
{
    qsort(t, (size_t)n, sizeof(double), cmp_d);
    *best = t[0];
    return t[n / 2];
}

int main(int argc, char **argv)
{
    int reps = 50;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
    }
    if (reps < 1)
        reps = 1;

    kvq_layout L;
    char err[128];
    if (kvq_layout_init(&L, T, D, HD, G, KVQ_K_PER_CHANNEL, 0.005f, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    float *k = malloc(sizeof(float) * C * D), *v = malloc(sizeof(float) * C * D);
    float *st = malloc(sizeof(float) * D * 10), *qscr = malloc(sizeof(float) * C);
    void *blk = aligned_alloc(64, (L.bytes + 63) / 64 * 64);
    size_t sb = (kvq_quantize_scratch_bytes(&L) + 63) / 64 * 64;
    void *scr = aligned_alloc(64, sb);
    double *tq = malloc(sizeof(double) * (size_t)reps), *te = malloc(sizeof(double) * (size_t)reps);
    double *tb = malloc(sizeof(double) * (size_t)reps), *td = malloc(sizeof(double) * (size_t)reps);
    if (!k || !v || !st || !qscr || !blk || !scr || !tq || !te || !tb || !td) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (int c = 0; c < D; c++) {
        float sc = 0.1f + 2 * rnd_unif(), off = (c % 5 == 0) ? 4 * sc : 0;
        for (int t = 0; t < C; t++) {
            k[t * D + c] = off + sc * rnd_gauss() * (rnd_unif() < 0.003f ? 8.0f : 1.0f);
            v[t * D + c] = 0.5f * sc * rnd_gauss() * (rnd_unif() < 0.003f ? 8.0f : 1.0f);
        }
    }
    kvq_ema_params p = { .ema_decay = 0.9f, .ema_clip = 0.1f, .clip_quantile = 0.005f, .warmup_chunks = 0 };
    kvq_ema ek = { st, st + D, st + 2 * D, st + 3 * D, 0 };
    kvq_ema ev = { st + 4 * D, st + 5 * D, st + 6 * D, st + 7 * D, 0 };
    float *a = st + 8 * D, *b = st + 9 * D;
    kvq_chunk_quantiles(k, C, D, D, p.clip_quantile, a, b, qscr);
    kvq_ema_update(&ek, &p, a, b, D, 1);
    kvq_chunk_quantiles(v, C, D, D, p.clip_quantile, a, b, qscr);
    kvq_ema_update(&ev, &p, a, b, D, 1);

    float *deq = malloc(sizeof(float) * T * D * 2);
    if (!deq) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    unsigned sink = 0, n_out = 0, n_clamp = 0;
    for (int r = 0; r < reps; r++) {
        const float *kb = k + (size_t)(r % 4) * T * D, *vb = v + (size_t)(r % 4) * T * D;
        double t0 = now_s();
        kvq_chunk_quantiles(k, C, D, D, p.clip_quantile, a, b, qscr);
        double t1 = now_s();
        kvq_ema_update(&ek, &p, a, b, D, 1);
        double t2 = now_s();
        kvq_quantize_block(&L, blk, kb, vb, D, T, ek.lo, ek.hi, ev.lo, ev.hi, scr);
        double t3 = now_s();
        kvq_dequant_block(&L, blk, deq, deq + T * D, D);
        double t4 = now_s();
        tq[r] = t1 - t0;
        te[r] = t2 - t1;
        tb[r] = t3 - t2;
        td[r] = t4 - t3;
        n_out += kvq_chdr(blk)->n_kout + kvq_chdr(blk)->n_vout;
        n_clamp += kvq_chdr(blk)->n_clamped;
        sink += (unsigned)deq[r % (T * D)];
    }
    double bq, be, bb, bd;
    double mq = median(tq, reps, &bq), me = median(te, reps, &be);
    double mb = median(tb, reps, &bb), md = median(td, reps, &bd);
    printf("SmolLM2 shapes: T=%d D=%d head_dim=%d G=%d budget 0.005, %d reps (median)\n", T, D, HD, G, reps);
    printf("  block: %zu bytes = %.4f bits/element; outliers %.3f%%, clamped %.3f%% of elements\n",
           L.bytes, 8.0 * (double)L.bytes / (2.0 * T * D), 100.0 * n_out / ((double)reps * 2 * T * D),
           100.0 * n_clamp / ((double)reps * 2 * T * D));
    printf("  %-38s %9s %9s %12s\n", "", "median", "fastest", "at median");
    printf("  %-38s %6.1f us %6.1f us %6.1f Melem/s\n", "chunk quantiles (512 x 192, 1 tensor)",
           1e6 * mq, 1e6 * bq, C * D / mq / 1e6);
    printf("  %-38s %6.1f us %6.1f us\n", "EMA update (192 channels)", 1e6 * me, 1e6 * be);
    printf("  %-38s %6.1f us %6.1f us %6.1f Melem/s\n", "quantize block (K+V, 128 x 192)",
           1e6 * mb, 1e6 * bb, 2.0 * T * D / mb / 1e6);
    printf("  %-38s %6.1f us %6.1f us %6.1f Melem/s\n", "dequantize block (K+V)", 1e6 * md,
           1e6 * bd, 2.0 * T * D / md / 1e6);
    /* per chunk and layer: quantiles + EMA for K and V, 4 blocks */
    double layer = 2 * (mq + me) + (double)(C / T) * mb;
    double layer_b = 2 * (bq + be) + (double)(C / T) * bb;
    printf("  per 512-token chunk, one core: %.3f ms per layer, %.1f ms for %d layers (median);"
           " %.1f ms (fastest)\n", 1e3 * layer, 1e3 * layer * LAYERS, LAYERS, 1e3 * layer_b * LAYERS);
    free(deq);
    free(k);
    free(v);
    free(st);
    free(qscr);
    free(blk);
    free(scr);
    free(tq);
    free(te);
    free(tb);
    free(td);
    return sink == 0xffffffffu;
}
