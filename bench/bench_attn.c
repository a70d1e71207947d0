/*
 * bench_attn.c - attention over a segmented KV history (kcpu_attn_seg)
 * against the FP16 path (kcpu_attn_f16) on the SmolLM2-135M layout: 9 query
 * heads, 3 KV heads of 64, INT4 blocks of 128 tokens, v_group 64, outlier
 * budget 0.5% (about 0.3% of the values generated as outliers).
 *
 *   ninja -C build-attn bench/bench_attn && ./build-attn/bench/bench_attn
 *   options: --reps N (minimum calls per cell, default 5), --cold (each call
 *   reads another of 30 layer copies of the cache, as a real decode step
 *   does, so the cache comes from memory instead of the last-level cache;
 *   the modes of a round read different copies),
 *   --kmode token (per-token K scales instead of per-channel), --case I
 *   (only case I of the table, 0-4), --mode M (fp16 and mode M only: 1
 *   fp16-seg, 2 int4), --threads N (only N threads), --cpu (time calls by
 *   the process's CPU time instead of wall time: with --threads 1 on a
 *   shared machine, time-slicing by other processes drops out; cache and
 *   memory contention remain), --bits K,V (code widths of the quantized
 *   mode, kernels/kvq.h: 2, 3, 4 or 8 each; default 4,4)
 *
 * Cases: decoding one token at 1K / 4K / 8K context, and a 512-token
 * prefill chunk at positions 512 and 3584. Modes:
 *   fp16      kcpu_attn_f16 over one contiguous FP16 cache
 *   fp16-seg  kcpu_attn_seg over the same cache given as FP16 segments
 *             (the 512-token chunk as its own F32 segment)
 *   int4      kcpu_attn_seg over INT4 blocks for every full block before
 *             the query / chunk, the rest FP16 (decode tail) or the F32
 *             chunk (prefill)
 * Each cell times single calls, the modes of a row taking turns call by
 * call (so that other load on a shared machine hits them alike), at least
 * N rounds and at least 0.6 s: us per call (one layer) from the median
 * call, p10 and min, and "vs fp16": the median over rounds of the call's
 * time over the fp16 call's time in the same round.
 * Threading: drives one kcpu_pool per thread count from the main thread.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/kvq.h"

enum { H = 9, KVH = 3, HD = 64, D = KVH * HD, T = 128, G = 64, NCTX = 8192, NQ = 512 };
#define MAX_CALLS 4096

static int g_cpu_clock; /* --cpu */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(g_cpu_clock ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t rng = 2463534242u;
static float rndf(void) /* [-1, 1) */
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return (float)(rng >> 8) / 8388608.0f - 1.0f;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One layer's cache in every form. */
typedef struct {
    float *k, *v;       /* [NCTX][D] exact */
    uint16_t *kh, *vh;  /* fp16 copies */
    uint8_t *blocks;    /* NCTX / T INT4 blocks */
} layer;

static float g_out_frac = 0.003f; /* --outliers */

static int layer_make(layer *ly, const kvq_layout *L, void *qscr)
{
    size_t n = (size_t)NCTX * D;
    ly->k = malloc(n * 4);
    ly->v = malloc(n * 4);
    ly->kh = malloc(n * 2);
    ly->vh = malloc(n * 2);
    ly->blocks = aligned_alloc(64, (NCTX / T) * L->bytes);
    if (!ly->k || !ly->v || !ly->kh || !ly->vh || !ly->blocks)
        return -1;
    float lo[D], hi[D];
    for (int c = 0; c < D; c++) {
        float mu = 0.5f * rndf(), a = 0.6f + 0.4f * rndf();
        lo[c] = mu - a;
        hi[c] = mu + a;
    }
    for (size_t i = 0; i < n; i++) {
        int c = (int)(i % D);
        float mid = 0.5f * (lo[c] + hi[c]), half = 0.5f * (hi[c] - lo[c]);
        float x = mid + half * rndf(), y = mid + half * rndf();
        if (0.5f * (rndf() + 1.0f) < g_out_frac) /* outliers: 2..6 half-ranges out */
            x = mid + half * (rndf() < 0.0f ? -1.0f : 1.0f) * (4.0f + 2.0f * rndf());
        if (0.5f * (rndf() + 1.0f) < g_out_frac)
            y = mid + half * (rndf() < 0.0f ? -1.0f : 1.0f) * (4.0f + 2.0f * rndf());
        ly->k[i] = x;
        ly->v[i] = y;
        ly->kh[i] = kt_f32_to_f16(x);
        ly->vh[i] = kt_f32_to_f16(y);
    }
    for (int b = 0; b < NCTX / T; b++)
        kvq_quantize_block(L, ly->blocks + (size_t)b * L->bytes, ly->k + (size_t)b * T * D,
                           ly->v + (size_t)b * T * D, D, T, lo, hi, lo, hi, qscr);
    return 0;
}

static void layer_free(layer *ly)
{
    free(ly->k); free(ly->v); free(ly->kh); free(ly->vh); free(ly->blocks);
}

enum { M_FP16, M_FP16SEG, M_INT4 };
static const char *mode_names[] = { "fp16", "fp16-seg", "int4" };

/* Segments of one layer for a call with queries at pos0 .. pos0+n_q-1. */
static int make_segs(const layer *ly, const kvq_layout *L, int mode, int pos0, int n_q,
                     kvs_seg *segs)
{
    int ns = 0, p = 0, end = pos0 + n_q;
    int q4_end = mode == M_INT4 ? pos0 / T * T : 0;
    for (; p < q4_end; p += T)
        segs[ns++] = (kvs_seg){ .kind = KVS_Q4, .pos0 = p, .n = T,
                                .k = ly->blocks + (size_t)(p / T) * L->bytes };
    int f16_end = n_q > 1 ? pos0 : end; /* a chunk is its own F32 segment */
    if (p < f16_end) {
        segs[ns++] = (kvs_seg){ .kind = KVS_F16, .pos0 = p, .n = f16_end - p,
                                .k = ly->kh + (size_t)p * D, .v = ly->vh + (size_t)p * D,
                                .stride = D };
        p = f16_end;
    }
    if (p < end)
        segs[ns++] = (kvs_seg){ .kind = KVS_F32, .pos0 = p, .n = end - p,
                                .k = ly->k + (size_t)p * D, .v = ly->v + (size_t)p * D,
                                .stride = D };
    return ns;
}

int main(int argc, char **argv)
{
    int reps = 5, cold = 0, only = -1, only_mode = -1, only_thr = 0, solo = 0;
    kvq_k_mode km = KVQ_K_PER_CHANNEL;
    int kbits = 4, vbits = 4;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
            reps = reps < 0 ? 0 : reps;
        } else if (!strcmp(argv[i], "--case") && i + 1 < argc) {
            only = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--mode") && i + 1 < argc) {
            only_mode = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            only_thr = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--outliers") && i + 1 < argc) {
            g_out_frac = (float)atof(argv[++i]);
        } else if (!strcmp(argv[i], "--cpu")) {
            g_cpu_clock = 1;
        } else if (!strcmp(argv[i], "--solo")) {
            solo = 1;
        } else if (!strcmp(argv[i], "--cold")) {
            cold = 1;
        } else if (!strcmp(argv[i], "--kmode") && i + 1 < argc) {
            km = !strcmp(argv[++i], "token") ? KVQ_K_PER_TOKEN : KVQ_K_PER_CHANNEL;
        } else if (!strcmp(argv[i], "--bits") && i + 1 < argc) {
            if (sscanf(argv[++i], "%d,%d", &kbits, &vbits) != 2) {
                fprintf(stderr, "--bits: expected K,V (e.g. 3,2)\n");
                return 2;
            }
        } else {
            fprintf(stderr, "usage: %s [--reps N] [--cold] [--kmode channel|token] [--case 0-4] [--mode 0-2] [--threads 1|2] [--solo] [--outliers F] [--cpu] [--bits K,V]\n", argv[0]);
            return 2;
        }
    }
    kvq_layout L;
    char err[128];
    if (kvq_layout_init_bits(&L, T, D, HD, G, km, 0.005f, kbits, vbits, err, sizeof err) < 0) {
        fprintf(stderr, "layout: %s\n", err);
        return 1;
    }
    int n_layers = cold ? 30 : 1;
    layer *ly = calloc((size_t)n_layers, sizeof *ly);
    void *qscr = malloc(kvq_quantize_scratch_bytes(&L));
    float *q = malloc((size_t)NQ * H * HD * 4), *o = malloc((size_t)NQ * H * HD * 4);
    kcpu_pool *pools[2] = { NULL, NULL };
    void *ws_f16 = malloc(kcpu_attn_scratch_bytes(2, NCTX));
    void *ws_seg = malloc(kcpu_attn_seg_scratch_bytes(2, &L, HD));
    if (!ly || !qscr || !q || !o || !ws_f16 || !ws_seg || kcpu_pool_create(2, &pools[1]) < 0)
        return 1;
    for (int i = 0; i < n_layers; i++)
        if (layer_make(&ly[i], &L, qscr) < 0)
            return 1;
    for (size_t i = 0; i < (size_t)NQ * H * HD; i++)
        q[i] = rndf();
    printf("attention over segments, %s, %d heads / %d kv heads x %d, T %d, G %d, K %s, %s, "
           "%.2f%% outliers\n", kcpu_simd_name(), H, KVH, HD, T, G,
           km == KVQ_K_PER_TOKEN ? "per token" : "per channel",
           cold ? "cold (30 layer copies)" : "hot (one layer)", 100.0 * g_out_frac);
    printf("%-6s %4s %-9s %3s %10s %10s %10s %8s\n", "pos0", "n_q", "mode", "thr", "us/call",
           "p10 us", "min us", "vs fp16");
    static const struct { int pos0, n_q; } cases[] = {
        { 1023, 1 }, { 4095, 1 }, { 8191, 1 }, { 512, NQ }, { 3584, NQ },
    };
    static double times[3][MAX_CALLS], ratio[3][MAX_CALLS];
    kvs_seg segs[NCTX / T + 4];
    for (int ci = 0; ci < 5; ci++) {
        int pos0 = cases[ci].pos0, n_q = cases[ci].n_q;
        if (only >= 0 && ci != only)
            continue;
        for (int th = 0; th < 2; th++) {
            if (only_thr && th + 1 != only_thr)
                continue;
            int on[3];
            for (int mode = 0; mode < 3; mode++)
                on[mode] = only_mode < 0 || mode == only_mode || (mode == M_FP16 && !solo);
            /* rounds of one call per mode, so that other load on the
             * machine hits every mode alike */
            int n = 0, li = 0;
            double wall0 = now_s();
            while (n < MAX_CALLS && (n < reps || (!solo && now_s() - wall0 < 0.6))) {
                int l0 = li;
                li = (li + 1) % n_layers;
                for (int mode = 0; mode < 3; mode++) {
                    if (!on[mode])
                        continue;
                    /* --cold: each mode reads its own layer copy (fp16-seg
                     * would find the FP16 cache that fp16 just read) */
                    const layer *y = &ly[(l0 + 10 * mode) % n_layers];
                    int ns = make_segs(y, &L, mode, pos0, n_q, segs);
                    double t0 = now_s();
                    if (mode == M_FP16)
                        kcpu_attn_f16(pools[th], o, q, y->kh, y->vh, D, pos0, n_q, H, KVH, HD,
                                      0.125f, ws_f16);
                    else
                        kcpu_attn_seg(pools[th], o, q, pos0, n_q, 0, segs, ns, &L, H, KVH, HD,
                                      0.125f, ws_seg);
                    times[mode][n] = now_s() - t0;
                }
                for (int mode = 0; mode < 3; mode++)
                    ratio[mode][n] = on[mode] && on[M_FP16] ? times[mode][n] / times[M_FP16][n] : 1.0;
                n++;
            }
            for (int mode = 0; mode < 3 && n > 0; mode++) {
                if (!on[mode])
                    continue;
                qsort(times[mode], (size_t)n, sizeof(double), cmp_double);
                qsort(ratio[mode], (size_t)n, sizeof(double), cmp_double);
                printf("%-6d %4d %-9s %3d %10.1f %10.1f %10.1f %8.2f\n", pos0, n_q,
                       mode_names[mode], th + 1, times[mode][n / 2] * 1e6,
                       times[mode][n / 10] * 1e6, times[mode][0] * 1e6, ratio[mode][n / 2]);
                fflush(stdout);
            }
        }
    }
    for (int i = 0; i < n_layers; i++)
        layer_free(&ly[i]);
    free(ly); free(qscr); free(q); free(o); free(ws_f16); free(ws_seg);
    kcpu_pool_destroy(pools[1]);
    return 0;
}
