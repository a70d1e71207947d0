/*
 * bench_kernels.c - throughput of kcpu_matmul on the SmolLM2-135M shapes
 * (dim 576, hidden 1536, 3 kv heads x 64, vocab 49152 with a Q8_0 output
 * matrix), for the reference and every back end this CPU runs (forced
 * scalar, AVX2, AVX-512, AVX-512 VNNI), 1 and 2 threads, a single token
 * (decode, gemv) and a 512-token batch (prefill).
 *
 *   ninja -C build-kern bench/bench_kernels && ./build-kern/bench/bench_kernels
 *   options: --full (also the slow ref/scalar 512-token runs), --hot (single
 *   token runs reuse one cached copy of the weights), --reps N (default 5, minimum calls),
 *   --type T (F32|F16|BF16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0: layer weights type,
 *   default Q4_1; the K-quants need rows of a multiple of 256, see --sweep),
 *   --sweep (instead: every quantized weight type on one 1024 x 2048 matrix,
 *   the Gemma-3-270M ffn_down width, 1 and 512 tokens, 2 threads, each SIMD
 *   path: GMAC/s = rows x cols x tokens / time; docs/bench.md), --rounds R
 *   (--sweep repeated R times, each cell's best round kept), --gemma (instead:
 *   the seven matmuls of a Gemma-3-270M layer with its file's types, 512
 *   tokens, one thread in CPU time; with --rounds)
 *
 * A second table times kcpu_attn_f16 (decode and a prefill chunk).
 * Each cell times single calls (at least N of them and at least 0.2 s):
 * us/call, GFLOP/s and GB/s are from the median call, p10 is the 10th
 * percentile (the undisturbed speed on a busy machine), cpu% is the CPU time
 * the cell got over wall time x threads (well below 100: the machine was
 * busy with something else and the median is pessimistic). Single-token runs rotate
 * through enough copies of the weights to overflow the last-level cache, so
 * GB/s is the weight stream from memory, as in real decoding. At the end,
 * per-token decode time and prefill throughput for the 30-layer model are
 * estimated from the table (matmuls only).
 * Threading: the benchmark drives one kcpu_pool from its main thread.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/ref/kref.h"

typedef struct {
    const char *name;
    int rows, cols;
    int layer; /* 1: layer weight (type from --type), 0: output head (Q8_0) */
    int per_layer; /* how many such matmuls per layer (0 for the head) */
} shape;

static const shape shapes[] = {
    { "attn_q/o", 576, 576, 1, 2 },
    { "attn_k/v", 192, 576, 1, 2 },
    { "ffn_gate/up", 1536, 576, 1, 2 },
    { "ffn_down", 576, 1536, 1, 1 },
    { "output", 49152, 576, 0, 0 },
};
#define N_SHAPES (int)(sizeof shapes / sizeof shapes[0])
#define N_LAYERS 30

enum { IMPL_REF, IMPL_SCALAR, IMPL_AVX2, IMPL_AVX512, IMPL_VNNI, N_IMPL };
static const char *impl_names[] = { "ref", "scalar", "avx2", "avx512", "vnni" };
static const kcpu_path impl_paths[] = { KCPU_PATH_AUTO, KCPU_PATH_SCALAR, KCPU_PATH_AVX2,
                                        KCPU_PATH_AVX512, KCPU_PATH_AVX512VNNI };

/* 1 when impl can run here (the reference always can). */
static int impl_available(int impl)
{
    if (impl == IMPL_REF)
        return 1;
    int ok = kcpu_force_path(impl_paths[impl]) == 0;
    kcpu_force_path(KCPU_PATH_AUTO);
    return ok;
}

/* The impl the run-time choice uses (the last available). */
static int impl_best(void)
{
    int b = IMPL_SCALAR;
    for (int i = IMPL_AVX2; i < N_IMPL; i++)
        if (impl_available(i))
            b = i;
    return b;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t rng = 12345;
static uint32_t rnd(void)
{
    rng = rng * 1664525u + 1013904223u;
    return rng >> 8;
}

static float rndf(void)
{
    return (float)(rnd() & 0xffff) / 32768.0f - 1.0f;
}

/* Fills a weight buffer of nbytes with valid random data of type t. */
static void fill_weights(kt_type t, void *w, size_t nbytes)
{
    uint8_t *p = w;
    size_t bb = kt_block_bytes(t);
    for (size_t off = 0; off + bb <= nbytes; off += bb) {
        for (size_t i = 0; i < bb; i++)
            p[off + i] = (uint8_t)rnd();
        uint16_t h;
        switch (t) {
        case KT_F32: { float f = rndf(); memcpy(p + off, &f, 4); break; }
        case KT_Q4_K: case KT_Q5_K: { /* d, dmin; the 6-bit scales reach 63 */
            h = kt_f32_to_f16(0.0005f * rndf());
            memcpy(p + off, &h, 2);
            h = kt_f32_to_f16(0.001f * rndf());
            memcpy(p + off + 2, &h, 2);
            break;
        }
        case KT_Q6_K: /* d last; the int8 scales reach 127 */
            h = kt_f32_to_f16(0.0002f * rndf());
            memcpy(p + off + offsetof(kt_block_q6_k, d), &h, 2);
            break;
        case KT_F16: case KT_BF16:
        case KT_Q4_0: case KT_Q4_1: case KT_Q5_0: case KT_Q5_1: case KT_Q8_0:
            /* a sane scale (or value) in the first half word */
            h = kt_f32_to_f16(0.01f * rndf());
            if (t == KT_BF16) {
                float f = rndf();
                uint32_t bits;
                memcpy(&bits, &f, 4);
                h = (uint16_t)(bits >> 16);
            }
            memcpy(p + off, &h, 2);
            if (t == KT_Q4_1 || t == KT_Q5_1) {
                h = kt_f32_to_f16(-0.05f);
                memcpy(p + off + 2, &h, 2);
            }
            break;
        }
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define MAX_CALLS 4096

/* Seconds per call of one configuration: *median and *p10 (10th percentile,
 * the undisturbed speed when other processes share the machine). Runs at
 * least reps calls and at least 0.2 s (at most MAX_CALLS calls).
 * *cpu_share gets the CPU time used over wall time x threads (well below 1:
 * other load stole time and the median is pessimistic). */
static void bench_one(int impl, kcpu_pool *pool, kt_type t, uint8_t *W,
                      int n_copies, size_t wbytes, const float *x, float *y,
                      int rows, int cols, int n_tok, void *ws, int reps,
                      double *median, double *p10, double *cpu_share)
{
    static double times[MAX_CALLS];
    double wall0 = now_s(), cpu0 = cpu_s();
    int copy = 0, n = 0;
    if (impl != IMPL_REF)
        kcpu_force_path(impl_paths[impl]);
    while (n < MAX_CALLS && (n < reps || now_s() - wall0 < 0.2)) {
        const void *w = W + (size_t)copy * wbytes;
        copy = (copy + 1) % n_copies;
        double t0 = now_s();
        if (impl == IMPL_REF)
            kref_matmul(t, w, x, y, rows, cols, n_tok);
        else
            kcpu_matmul(pool, t, w, x, y, rows, cols, n_tok, ws);
        times[n++] = now_s() - t0;
    }
    kcpu_force_scalar(0);
    int nth = impl == IMPL_REF ? 1 : kcpu_pool_size(pool);
    *cpu_share = (cpu_s() - cpu0) / ((now_s() - wall0) * nth);
    qsort(times, (size_t)n, sizeof(double), cmp_double);
    *median = times[n / 2];
    *p10 = times[n / 10];
}

/* Attention over an FP16 cache with the SmolLM2 head layout (9 query heads,
 * 3 KV heads of 64): decoding one token at several context lengths and a
 * 512-token prefill chunk. Prints us per call (one layer) and GFLOP/s
 * (4 * heads * head_dim per query-position pair). */
static int bench_attention(kcpu_pool **pools, int reps, int full)
{
    enum { H = 9, KVH = 3, D = 64, NCTX = 8192 };
    static const struct { int pos0, n_q; } cases[] = {
        { 1023, 1 }, { 4095, 1 }, { 8191, 1 }, { 0, 512 }, { 3584, 512 },
    };
    size_t st = (size_t)KVH * D;
    uint16_t *k = malloc((size_t)NCTX * st * 2), *v = malloc((size_t)NCTX * st * 2);
    float *q = malloc((size_t)512 * H * D * 4), *o = malloc((size_t)512 * H * D * 4);
    float *sc = malloc((size_t)NCTX * 4);
    void *ws = malloc(kcpu_attn_scratch_bytes(2, NCTX));
    if (!k || !v || !q || !o || !sc || !ws)
        return -1;
    for (size_t i = 0; i < (size_t)NCTX * st; i++) {
        k[i] = kt_f32_to_f16(rndf());
        v[i] = kt_f32_to_f16(rndf());
    }
    for (size_t i = 0; i < (size_t)512 * H * D; i++)
        q[i] = rndf();
    printf("\nattention, FP16 cache, %d heads / %d kv heads x %d\n", H, KVH, D);
    printf("%-8s %4s %-8s %10s %9s %10s %5s\n", "pos0", "n_q", "impl/thr", "us/call",
           "GFLOP/s", "p10 us", "cpu%");
    for (int ci = 0; ci < 5; ci++) {
        int pos0 = cases[ci].pos0, n_q = cases[ci].n_q;
        double pairs = 0.0;
        for (int j = 0; j < n_q; j++)
            pairs += pos0 + j + 1;
        for (int impl = 0; impl <= IMPL_AVX2; impl++) { /* AVX-512 attention is AVX2's */
            if (!impl_available(impl))
                continue;
            if (impl != IMPL_AVX2 && n_q > 1 && !full)
                continue; /* seconds per call */
            for (int th = 0; th < (impl == IMPL_REF ? 1 : 2); th++) {
                static double times[MAX_CALLS];
                int n = 0;
                double wall0 = now_s(), cpu0 = cpu_s();
                if (impl != IMPL_REF)
                    kcpu_force_path(impl_paths[impl]);
                while (n < MAX_CALLS && (n < reps || now_s() - wall0 < 0.2)) {
                    double t0 = now_s();
                    if (impl == IMPL_REF) {
                        for (int j = 0; j < n_q; j++)
                            kref_attn_f16(o + (size_t)j * H * D, q + (size_t)j * H * D, k, v,
                                          st, pos0 + j + 1, H, KVH, D, 0.125f, sc);
                    } else {
                        kcpu_attn_f16(pools[th], o, q, k, v, st, pos0, n_q, H, KVH, D,
                                      0.125f, ws);
                    }
                    times[n++] = now_s() - t0;
                }
                kcpu_force_scalar(0);
                double share = (cpu_s() - cpu0) / ((now_s() - wall0) * (th + 1));
                qsort(times, (size_t)n, sizeof(double), cmp_double);
                double med = times[n / 2];
                printf("%-8d %4d %6s/%d %10.1f %9.2f %10.1f %5.0f\n", pos0, n_q,
                       impl_names[impl], th + 1, med * 1e6, 4.0 * H * D * pairs / med * 1e-9,
                       times[n / 10] * 1e6, 100.0 * share);
                fflush(stdout);
            }
        }
    }
    free(k); free(v); free(q); free(o); free(sc); free(ws);
    return 0;
}

/* --sweep: every quantized type on one rows x cols matrix, 1 and 512
 * tokens, 2 threads, the scalar path (1 token only) and every SIMD path.
 * GMAC/s = rows * cols * tokens / median time; single-token runs stream the
 * weights from memory (copies overflow the last-level cache) unless hot.
 * The whole sweep is repeated `rounds` times and each cell keeps its best
 * round (lowest median), so that on a shared machine every cell gets the
 * same chances of finding the cores free; cpu% is that round's. */
#define SW_TYPES 8
#define SW_CELLS (2 * N_IMPL)
static int bench_sweep(kcpu_pool *pool, int reps, int hot, int rounds)
{
    enum { ROWS = 1024, COLS = 2048 };
    static const kt_type types[SW_TYPES] = { KT_Q4_0, KT_Q4_1, KT_Q5_0, KT_Q5_1, KT_Q8_0,
                                             KT_Q4_K, KT_Q5_K, KT_Q6_K };
    static const int toks[] = { 1, 512 };
    static double med[SW_TYPES][SW_CELLS], p10s[SW_TYPES][SW_CELLS], cpu[SW_TYPES][SW_CELLS];
    float *x = malloc((size_t)512 * COLS * sizeof(float));
    float *y = malloc((size_t)512 * ROWS * sizeof(float));
    if (!x || !y)
        return -1;
    for (size_t i = 0; i < (size_t)512 * COLS; i++)
        x[i] = rndf();
    for (int r = 0; r < rounds; r++) {
        for (int ti = 0; ti < SW_TYPES; ti++) {
            kt_type t = types[ti];
            size_t wbytes = kt_row_bytes(t, COLS) * ROWS;
            int n_copies = hot ? 1 : (int)((96u << 20) / wbytes) + 1;
            uint8_t *W = malloc(wbytes * (size_t)n_copies);
            void *ws = malloc(kcpu_matmul_scratch_bytes(t, COLS, 512) + 1);
            if (!W || !ws)
                return -1;
            fill_weights(t, W, wbytes);
            for (int c = 1; c < n_copies; c++)
                memcpy(W + (size_t)c * wbytes, W, wbytes);
            for (int k = 0; k < 2; k++)
                for (int impl = IMPL_SCALAR; impl < N_IMPL; impl++) {
                    if (!impl_available(impl) || (impl == IMPL_SCALAR && toks[k] > 1))
                        continue;
                    double sec, p10, share;
                    bench_one(impl, pool, t, W, toks[k] == 1 ? n_copies : 1, wbytes, x, y,
                              ROWS, COLS, toks[k], ws, reps, &sec, &p10, &share);
                    int c = k * N_IMPL + impl;
                    if (r == 0 || sec < med[ti][c]) {
                        med[ti][c] = sec;
                        p10s[ti][c] = p10;
                        cpu[ti][c] = share;
                    }
                }
            free(W);
            free(ws);
        }
        fprintf(stderr, "sweep round %d/%d done\n", r + 1, rounds);
    }
    printf("sweep: %d x %d weights, %d threads, >= %d calls per cell, best of %d rounds "
           "(run-time choice: %s)\n", ROWS, COLS, kcpu_pool_size(pool), reps, rounds,
           kcpu_simd_name());
    printf("%-5s %4s %-7s %10s %8s %8s %10s %5s\n", "type", "tok", "path", "us/call", "GMAC/s",
           "GB/s(W)", "p10 us", "cpu%");
    for (int ti = 0; ti < SW_TYPES; ti++)
        for (int k = 0; k < 2; k++)
            for (int impl = IMPL_SCALAR; impl < N_IMPL; impl++) {
                if (!impl_available(impl) || (impl == IMPL_SCALAR && toks[k] > 1))
                    continue;
                int c = k * N_IMPL + impl;
                double sec = med[ti][c];
                size_t wbytes = kt_row_bytes(types[ti], COLS) * ROWS;
                printf("%-5s %4d %-7s %10.1f %8.2f %8.2f %10.1f %5.0f\n", kt_name(types[ti]),
                       toks[k], impl_names[impl], sec * 1e6,
                       (double)ROWS * COLS * toks[k] / sec * 1e-9, (double)wbytes / sec * 1e-9,
                       p10s[ti][c] * 1e6, 100.0 * cpu[ti][c]);
            }
    free(x);
    free(y);
    return 0;
}

/* --gemma: the seven matmuls of one Gemma-3-270M layer with the types of
 * gemma-3-270m-q4_k_m.gguf (q, k, gate, up Q5_0; v Q8_0; o Q4_K; down
 * Q6_K) on a 512-token prefill batch, ONE thread, the run-time path, timed
 * in the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so that other jobs
 * on a shared machine do not count (only their cache traffic does). Each
 * shape keeps its fastest call over rounds x reps calls. Prints ms per
 * call, GMAC/s per core and the 18-layer sum (the matmul part of a pp512
 * on one core, without the output head). */
static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int bench_gemma(kcpu_pool *pool1, int reps, int rounds)
{
    static const struct { const char *name; kt_type t; int rows, cols; } gs[] = {
        { "attn_q", KT_Q5_0, 1024, 640 }, { "attn_k", KT_Q5_0, 256, 640 },
        { "attn_v", KT_Q8_0, 256, 640 },  { "attn_output", KT_Q4_K, 640, 1024 },
        { "ffn_gate", KT_Q5_0, 2048, 640 }, { "ffn_up", KT_Q5_0, 2048, 640 },
        { "ffn_down", KT_Q6_K, 640, 2048 },
    };
    enum { NG = (int)(sizeof gs / sizeof gs[0]), NT = 512 };
    double best[NG][2]; /* [shape][0: kcpu_matmul, 1: kcpu_matmul_rp] */
    float *x = malloc((size_t)NT * 2048 * sizeof(float));
    float *y = malloc((size_t)NT * 2048 * sizeof(float));
    if (!x || !y)
        return -1;
    for (size_t i = 0; i < (size_t)NT * 2048; i++)
        x[i] = rndf();
    for (int g = 0; g < NG; g++)
        best[g][0] = best[g][1] = 1e30;
    for (int r = 0; r < rounds; r++)
        for (int g = 0; g < NG; g++) {
            size_t wbytes = kt_row_bytes(gs[g].t, gs[g].cols) * (size_t)gs[g].rows;
            uint8_t *W = malloc(wbytes);
            void *ws = malloc(kcpu_rp_scratch_bytes(gs[g].cols, NT) +
                              kcpu_matmul_scratch_bytes(gs[g].t, gs[g].cols, NT) + 1);
            if (!W || !ws)
                return -1;
            fill_weights(gs[g].t, W, wbytes);
            kcpu_rp *rp = kcpu_rp_create(gs[g].t, W, gs[g].rows, gs[g].cols);
            if (!rp)
                return -1;
            for (int k = 0; k < 2 * reps; k++) {
                double t0 = thread_cpu_s();
                if (k % 2)
                    kcpu_matmul_rp(pool1, rp, x, y, NT, ws);
                else
                    kcpu_matmul(pool1, gs[g].t, W, x, y, gs[g].rows, gs[g].cols, NT, ws);
                double dt = thread_cpu_s() - t0;
                if (dt < best[g][k % 2])
                    best[g][k % 2] = dt;
            }
            kcpu_rp_destroy(rp);
            free(W);
            free(ws);
        }
    printf("Gemma-3-270M layer matmuls, %d tokens, 1 thread (CPU time), %s, fastest of %d "
           "calls; rp = the repacked weights (kcpu_matmul_rp)\n", NT, kcpu_simd_name(),
           rounds * reps);
    printf("%-12s %-5s %5s %5s %8s %8s %8s %8s %6s\n", "matmul", "type", "rows", "cols",
           "ms/call", "GMAC/s", "rp ms", "rp GMAC", "speed");
    double sum[2] = { 0.0, 0.0 };
    for (int g = 0; g < NG; g++) {
        double macs = (double)gs[g].rows * gs[g].cols * NT;
        sum[0] += best[g][0];
        sum[1] += best[g][1];
        printf("%-12s %-5s %5d %5d %8.2f %8.2f %8.2f %8.2f %5.2fx\n", gs[g].name,
               kt_name(gs[g].t), gs[g].rows, gs[g].cols, best[g][0] * 1e3,
               macs / best[g][0] * 1e-9, best[g][1] * 1e3, macs / best[g][1] * 1e-9,
               best[g][0] / best[g][1]);
    }
    printf("18 layers: %.3f core-seconds per %d-token prefill, %.3f repacked (%.2fx), "
           "matmuls only\n", 18.0 * sum[0], NT, 18.0 * sum[1], sum[0] / sum[1]);
    free(x);
    free(y);
    return 0;
}

int main(int argc, char **argv)
{
    int full = 0, hot = 0, reps = 5, sweep = 0, rounds = 1, gemma = 0;
    kt_type layer_t = KT_Q4_1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--full")) {
            full = 1;
        } else if (!strcmp(argv[i], "--hot")) {
            hot = 1;
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
            if (reps < 1)
                reps = 1;
        } else if (!strcmp(argv[i], "--sweep")) {
            sweep = 1;
        } else if (!strcmp(argv[i], "--gemma")) {
            gemma = 1;
        } else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) {
            rounds = atoi(argv[++i]);
            if (rounds < 1)
                rounds = 1;
        } else if (!strcmp(argv[i], "--type") && i + 1 < argc) {
            const char *n = argv[++i];
            static const kt_type all[] = { KT_F32, KT_F16, KT_BF16, KT_Q4_0, KT_Q4_1,
                                           KT_Q5_0, KT_Q5_1, KT_Q8_0 };
            int ok = 0;
            for (int k = 0; k < (int)(sizeof all / sizeof all[0]); k++)
                if (!strcmp(n, kt_name(all[k]))) {
                    layer_t = all[k];
                    ok = 1;
                }
            if (!ok) {
                fprintf(stderr, "unknown type %s\n", n);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: %s [--full] [--hot] [--reps N] [--type T] [--sweep | "
                    "--gemma] [--rounds R]\n", argv[0]);
            return 2;
        }
    }
    kcpu_pool *pools[2] = { NULL, NULL };
    if (kcpu_pool_create(1, &pools[0]) < 0 || kcpu_pool_create(2, &pools[1]) < 0) {
        fprintf(stderr, "cannot create thread pools\n");
        return 1;
    }
    if (sweep || gemma) {
        int rc = sweep ? bench_sweep(pools[1], reps, hot, rounds)
                       : bench_gemma(pools[0], reps, rounds);
        if (rc < 0)
            fprintf(stderr, "out of memory\n");
        kcpu_pool_destroy(pools[0]);
        kcpu_pool_destroy(pools[1]);
        return rc < 0 ? 1 : 0;
    }
    const int best_impl = impl_best();
    printf("kcpu back end: %s; layer weights %s, output Q8_0; >= %d calls per cell\n",
           kcpu_simd_name(), kt_name(layer_t), reps);
    printf("%-12s %-5s %6s %5s %4s %-8s %10s %9s %9s %10s %5s\n", "shape", "type", "rows x",
           "cols", "tok", "impl/thr", "us/call", "GFLOP/s", "GB/s(W)", "p10 us", "cpu%");

    static const int toks[] = { 1, 512 };
    /* seconds per call of the run-time choice [shape][tok][threads] for the
     * estimate */
    double best[N_SHAPES][2][2] = { { { 0 } } }, bestp[N_SHAPES][2][2] = { { { 0 } } };
    for (int si = 0; si < N_SHAPES; si++) {
        const shape *s = &shapes[si];
        kt_type t = s->layer ? layer_t : KT_Q8_0;
        size_t wbytes = kt_row_bytes(t, s->cols) * (size_t)s->rows;
        int n_copies = hot ? 1 : (int)((96u << 20) / wbytes) + 1;
        uint8_t *W = malloc(wbytes * (size_t)n_copies);
        float *x = malloc((size_t)512 * (size_t)s->cols * sizeof(float));
        float *y = malloc((size_t)512 * (size_t)s->rows * sizeof(float));
        void *ws = malloc(kcpu_matmul_scratch_bytes(t, s->cols, 512) + 1);
        if (!W || !x || !y || !ws) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        fill_weights(t, W, wbytes);
        for (int c = 1; c < n_copies; c++)
            memcpy(W + (size_t)c * wbytes, W, wbytes);
        for (size_t i = 0; i < (size_t)512 * (size_t)s->cols; i++)
            x[i] = rndf();
        for (int ti = 0; ti < 2; ti++) {
            int n_tok = toks[ti];
            for (int impl = 0; impl < N_IMPL; impl++) {
                if (!impl_available(impl))
                    continue;
                /* AVX-512 adds kernels only for Q5_0/Q5_1 (and the K-quants) */
                if (impl > IMPL_AVX2 && t != KT_Q5_0 && t != KT_Q5_1)
                    continue;
                if (!full && n_tok > 1 &&
                    (impl == IMPL_REF || (impl == IMPL_SCALAR && s->rows > 4096)))
                    continue;
                for (int th = 0; th < (impl == IMPL_REF ? 1 : 2); th++) {
                    int nc = n_tok == 1 ? n_copies : 1;
                    double sec, p10, share;
                    bench_one(impl, pools[th], t, W, nc, wbytes, x, y, s->rows, s->cols,
                              n_tok, ws, impl == IMPL_REF && n_tok > 1 ? 1 : reps,
                              &sec, &p10, &share);
                    double flop = 2.0 * s->rows * s->cols * n_tok;
                    printf("%-12s %-5s %6d %5d %4d %6s/%d %10.1f %9.2f %9.2f %10.1f %5.0f\n",
                           s->name, kt_name(t), s->rows, s->cols, n_tok, impl_names[impl],
                           th + 1, sec * 1e6, flop / sec * 1e-9, (double)wbytes / sec * 1e-9,
                           p10 * 1e6, 100.0 * share);
                    fflush(stdout);
                    /* the run-time choice: the best path, AVX2 for the
                     * types AVX-512 leaves to it */
                    if (impl == best_impl ||
                        (impl == IMPL_AVX2 && best_impl > IMPL_AVX2 && t != KT_Q5_0 &&
                         t != KT_Q5_1)) {
                        best[si][ti][th] = sec;
                        bestp[si][ti][th] = p10;
                    }
                }
            }
        }
        free(W); free(x); free(y); free(ws);
    }
    if (best_impl >= IMPL_AVX2) {
        for (int th = 0; th < 2; th++) {
            for (int q = 0; q < 2; q++) {
                double (*tb)[2][2] = q ? bestp : best;
                double dec = 0.0, pre = 0.0;
                for (int si = 0; si < N_SHAPES; si++) {
                    int mult = shapes[si].layer ? N_LAYERS * shapes[si].per_layer : 1;
                    dec += mult * tb[si][0][th];
                    /* prefill needs logits for the last token only */
                    pre += shapes[si].layer ? mult * tb[si][1][th] : tb[si][0][th];
                }
                printf("estimate (%s), %d thread(s), matmuls only: decode %.2f ms/token "
                       "(%.1f tok/s), prefill 512 %.1f tok/s\n", q ? "p10" : "median",
                       th + 1, dec * 1e3, 1.0 / dec, 512.0 / pre);
            }
        }
    }
    if (bench_attention(pools, reps, full) < 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    kcpu_pool_destroy(pools[0]);
    kcpu_pool_destroy(pools[1]);
    return 0;
}
