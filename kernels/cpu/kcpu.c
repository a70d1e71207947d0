/*
 * kcpu.c - front end of the optimized CPU kernels: run-time choice of the
 * SIMD back end, scratch layouts, and the split of matmul / attention work
 * over a kcpu_pool (dynamic chunks taken from an atomic counter, so a thread
 * that wakes late or is preempted simply takes fewer chunks).
 *
 * Threading: see kcpu.h. The back-end choice is made once (thread-safe lazy
 * init); kcpu_force_scalar is meant for tests and benchmarks.
 */
#include "kernels/cpu/kcpu.h"
#include "kernels/cpu/kcpu_impl.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- back-end dispatch ---- */

static atomic_int g_force = KCPU_PATH_AUTO; /* kcpu_force_path */
static atomic_int g_best = -1;              /* best path of this CPU; -1 unknown */

/* The best back end this build and CPU can run (checked once). The AVX-512
 * back ends need F, BW, VL and DQ (Skylake-X, Zen 4 and later); the VNNI one
 * also AVX512_VNNI (Cascade Lake, Ice Lake, Zen 4 and later). */
static int best_path(void)
{
    int b = atomic_load_explicit(&g_best, memory_order_relaxed);
    if (b < 0) {
        b = KCPU_PATH_SCALAR;
#if defined(LKQ_HAVE_AVX2)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
            __builtin_cpu_supports("f16c"))
            b = KCPU_PATH_AVX2;
#endif
#if defined(LKQ_HAVE_AVX512)
        if (b == KCPU_PATH_AVX2 && __builtin_cpu_supports("avx512f") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512dq")) {
            b = KCPU_PATH_AVX512;
            if (__builtin_cpu_supports("avx512vnni"))
                b = KCPU_PATH_AVX512VNNI;
        }
#endif
        /* LKQ_CPU_KERNELS=scalar|avx2|avx512|avx512vnni caps the choice
         * (for comparisons; a path this CPU lacks is ignored). */
        const char *env = getenv("LKQ_CPU_KERNELS");
        if (env && *env) {
            static const char *names[] = {"scalar", "avx2", "avx512", "avx512vnni"};
            static const int paths[] = {KCPU_PATH_SCALAR, KCPU_PATH_AVX2, KCPU_PATH_AVX512,
                                        KCPU_PATH_AVX512VNNI};
            for (int i = 0; i < 4; i++)
                if (!strcmp(env, names[i]) && paths[i] < b)
                    b = paths[i];
        }
        atomic_store_explicit(&g_best, b, memory_order_relaxed);
    }
    return b;
}

static const kcpu_ops *ops(void)
{
    int p = atomic_load_explicit(&g_force, memory_order_relaxed);
    if (p == KCPU_PATH_AUTO)
        p = best_path();
    switch ((kcpu_path)p) {
#if defined(LKQ_HAVE_AVX512)
    case KCPU_PATH_AVX512VNNI: return &kcpu_avx512vnni_ops;
    case KCPU_PATH_AVX512: return &kcpu_avx512_ops;
#endif
#if defined(LKQ_HAVE_AVX2)
    case KCPU_PATH_AVX2: return &kcpu_avx2_ops;
#endif
    default: return &kcpu_scalar_ops;
    }
}

const kcpu_ops *kcpu_ops_active(void)
{
    return ops();
}

const char *kcpu_simd_name(void)
{
    return ops()->name;
}

const char *kcpu_path_name(kcpu_path p)
{
    switch (p) {
    case KCPU_PATH_AUTO: return "auto";
    case KCPU_PATH_SCALAR: return "scalar";
    case KCPU_PATH_AVX2: return "avx2";
    case KCPU_PATH_AVX512: return "avx512";
    case KCPU_PATH_AVX512VNNI: return "avx512vnni";
    }
    return "?";
}

int kcpu_force_path(kcpu_path p)
{
    if (p < KCPU_PATH_AUTO || p > KCPU_PATH_AVX512VNNI ||
        (p != KCPU_PATH_AUTO && (int)p > best_path()))
        return -ENOTSUP;
    atomic_store(&g_force, (int)p);
    return 0;
}

void kcpu_force_scalar(int on)
{
    atomic_store(&g_force, on ? KCPU_PATH_SCALAR : KCPU_PATH_AUTO);
}

/* ---- matmul ---- */

#define ALIGN_UP(v, a) (((v) + (a) - 1) / (a) * (a))

static int is_quant(kt_type t)
{
    return kt_is_quant(t);
}

/* The factor of the activation block sums s (kcpu_impl.h): the code offset
 * of the types whose codes are stored unsigned and shifted (Q4_0: q - 8,
 * Q5_0: q - 16), else 1. */
static float x_sum_mul(kt_type t)
{
    return t == KT_Q4_0 ? -8.0f : t == KT_Q5_0 ? -16.0f : 1.0f;
}

/* Quantized-x scratch (layout in kcpu_impl.h), n_tok rounded up to whole
 * token groups: [64 slack][qs][d][s], each section 64-byte aligned. Float
 * weight types need none. */
static size_t q8x_slots(int n_cols, int n_tok)
{
    size_t groups = ((size_t)n_tok + KCPU_XG - 1) / KCPU_XG;
    return groups * KCPU_XG * ((size_t)n_cols / KT_QK); /* blocks */
}

/* The split's scratch after the q8x sections, n = n_tok * blocks per row:
 * per token and block the outlier's column in the block (oj, 0xff: none)
 * and value (ov); for the correction the hits per column as offsets
 * (start, n_cols + 1), a fill cursor per column, the columns with hits, and
 * the hits ordered by column (tok, val). */
typedef struct {
    uint8_t *oj;
    float *ov;
    int32_t *start, *fill, *hcols, *tok;
    float *val;
} split_ws;

static size_t split_layout(int n_cols, int n_tok, char *base, split_ws *w)
{
    const size_t n = (size_t)n_tok * (size_t)(n_cols / KT_QK), nc = (size_t)n_cols;
    const size_t sz[7] = { n, n * sizeof(float), (nc + 1) * sizeof(int32_t),
                           nc * sizeof(int32_t), nc * sizeof(int32_t), n * sizeof(int32_t),
                           n * sizeof(float) };
    void *pp[7];
    size_t off = 0;
    for (int i = 0; i < 7; i++) {
        pp[i] = base ? base + off : NULL;
        off += ALIGN_UP(sz[i], 64);
    }
    if (w)
        *w = (split_ws){ pp[0], pp[1], pp[2], pp[3], pp[4], pp[5], pp[6] };
    return off;
}

size_t kcpu_matmul_scratch_bytes(kt_type t, int n_cols, int n_tok)
{
    if (!is_quant(t) || n_cols <= 0 || n_tok <= 0)
        return 0;
    size_t nblk = q8x_slots(n_cols, n_tok);
    return 64 + ALIGN_UP(nblk * KT_QK, 64) + 2 * ALIGN_UP(nblk * sizeof(float), 64) +
           split_layout(n_cols, n_tok, NULL, NULL);
}

/* ---- activation outliers (kcpu.h: the split) ---- */

static _Atomic float g_xsplit = -1.0f; /* ratio; 0 off; -1 not read yet */

float kcpu_xsplit_ratio(void)
{
    float r = atomic_load_explicit(&g_xsplit, memory_order_relaxed);
    if (r < 0.0f) {
        const char *e = getenv("LKQ_CPU_XSPLIT");
        char *end = NULL;
        double v = e && *e ? strtod(e, &end) : -1.0;
        r = (end && !*end && v >= 0.0 && v < 1e6) ? (float)v : KCPU_XSPLIT_DEFAULT;
        atomic_store_explicit(&g_xsplit, r, memory_order_relaxed);
    }
    return r;
}

void kcpu_set_xsplit_ratio(float r)
{
    atomic_store_explicit(&g_xsplit, r < 0.0f ? KCPU_XSPLIT_DEFAULT : r, memory_order_relaxed);
}

/* The code a lone outlier's rivals stay below (kcpu_impl.h). */
int kcpu_xsplit_code(float ratio)
{
    if (!(ratio > 1.0f))
        return 128; /* no code reaches it: off */
    int c = (int)ceilf(127.0f / ratio);
    return c < 1 ? 1 : c;
}

/* See kcpu_impl.h. The test runs on the int8 codes quantize_x wrote (one
 * compare per byte, vectorized by the compiler); the few blocks that split
 * are requantized here. */
int kcpu_xsplit_token(const float *x, int nb, float smul, float ratio, int8_t *qs, float *d,
                      float *s, uint8_t *oj, float *ov)
{
    const int tc = kcpu_xsplit_code(ratio);
    int hits = 0;
    for (int b = 0; b < nb; b++) {
        int8_t *q = qs + (size_t)b * KCPU_XG * KT_QK;
        int n = 0;
        for (int j = 0; j < KT_QK; j++)
            n += (q[j] >= tc) | (q[j] <= -tc);
        oj[b] = 0xff;
        ov[b] = 0.0f;
        if (n != 1)
            continue;
        const float *xb = x + (size_t)b * KT_QK;
        int j1 = 0;
        while (q[j1] < tc && q[j1] > -tc)
            j1++;
        float m2 = 0.0f;
        for (int j = 0; j < KT_QK; j++)
            if (j != j1)
                m2 = fmaxf(m2, fabsf(xb[j]));
        const float db = m2 / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int j = 0; j < KT_QK; j++) {
            int v = j == j1 ? 0 : (int)nearbyintf(xb[j] * id);
            v = v > 127 ? 127 : v < -127 ? -127 : v;
            q[j] = (int8_t)v;
            sum += v;
        }
        d[(size_t)b * KCPU_XG] = db;
        s[(size_t)b * KCPU_XG] = smul * db * (float)sum;
        oj[b] = (uint8_t)j1;
        ov[b] = xb[j1];
        hits++;
    }
    return hits;
}

typedef struct {
    const kcpu_ops *ops;
    kt_type t;
    const void *W;
    size_t row_bytes;
    const float *x;
    float *y;
    int n_rows, n_cols, n_tok;
    kcpu_q8x xq;
    int8_t *qs; /* writable views of xq for the quantize task */
    float *d, *s;
    float ratio;   /* the split's ratio for this call (0: off) */
    split_ws sw;   /* its scratch (oj / ov: [n_tok][nb]) */
    atomic_int hits;
    int chunk;           /* rows per work item */
    atomic_int next;     /* next work item */
} mm_ctx;

static void quantize_task(void *arg, int ith, int nth)
{
    mm_ctx *c = arg;
    float smul = x_sum_mul(c->t);
    for (int k = ith; k < c->n_tok; k += nth) {
        size_t i = kcpu_q8x_index(c->xq.nb, k, 0);
        c->ops->quantize_x(c->x + (size_t)k * (size_t)c->n_cols, c->n_cols, smul,
                           c->qs + i * KT_QK, c->d + i, c->s + i);
        if (c->ratio > 0.0f) {
            const size_t o = (size_t)k * (size_t)c->xq.nb;
            int h = kcpu_xsplit_token(c->x + (size_t)k * (size_t)c->n_cols, c->xq.nb, smul,
                                      c->ratio, c->qs + i * KT_QK, c->d + i, c->s + i,
                                      c->sw.oj + o, c->sw.ov + o);
            if (h)
                atomic_fetch_add_explicit(&c->hits, h, memory_order_relaxed);
        }
    }
}

static void mm_task(void *arg, int ith, int nth)
{
    (void)ith;
    (void)nth;
    mm_ctx *c = arg;
    for (;;) {
        int i = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        int r0 = i * c->chunk;
        if (r0 >= c->n_rows)
            break;
        int r1 = r0 + c->chunk < c->n_rows ? r0 + c->chunk : c->n_rows;
        if (is_quant(c->t))
            c->ops->mm_quant(c->t, c->W, c->row_bytes, &c->xq, c->y,
                             c->n_rows, r0, r1);
        else
            c->ops->mm_float(c->t, c->W, c->row_bytes, c->x, c->n_cols,
                             c->n_tok, c->y, c->n_rows, r0, r1);
    }
}

/* Rows per work item: a multiple of 4 (the back ends' row tile); for
 * multi-token work also small enough that the item's weights stay in L2
 * while every token passes over them; at least ~4 items per thread. */
static int mm_chunk_rows(size_t row_bytes, int n_rows, int n_tok, int nth)
{
    int c = (n_rows + 4 * nth - 1) / (4 * nth);
    if (n_tok > 1) {
        size_t cap = (size_t)(96 * 1024) / (row_bytes ? row_bytes : 1);
        if ((size_t)c > cap)
            c = (int)cap;
    }
    if (c < 16)
        c = 16;
    return ALIGN_UP(c, 4);
}

/* Quantizes c->x (c->n_cols x c->n_tok, c->t's code offset) into the
 * q8x scratch at ws (kcpu_matmul_scratch_bytes), in parallel over tokens
 * when there are several; sets c->xq. Returns the first byte after it. */
static char *quantize_x(kcpu_pool *p, mm_ctx *c, void *ws, float xsplit)
{
    const int nb = c->n_cols / KT_QK, n_tok = c->n_tok;
    size_t nblk = q8x_slots(c->n_cols, n_tok);
    char *base = (char *)ALIGN_UP((uintptr_t)ws, 64);
    c->qs = (int8_t *)base;
    base += ALIGN_UP(nblk * KT_QK, 64);
    c->d = (float *)base;
    base += ALIGN_UP(nblk * sizeof(float), 64);
    c->s = (float *)base;
    base += ALIGN_UP(nblk * sizeof(float), 64);
    for (int k = n_tok; k % KCPU_XG; k++) /* zero the padding tokens */
        for (int b = 0; b < nb; b++) {
            size_t i = kcpu_q8x_index(nb, k, b);
            memset(c->qs + i * KT_QK, 0, KT_QK);
            c->d[i] = c->s[i] = 0.0f;
        }
    c->xq = (kcpu_q8x){ c->qs, c->d, c->s, nb, n_tok };
    base += split_layout(c->n_cols, n_tok, base, &c->sw);
    c->ratio = xsplit < 0.0f ? kcpu_xsplit_ratio() : xsplit;
    atomic_init(&c->hits, 0);
    if (n_tok == 1 || kcpu_pool_size(p) == 1)
        quantize_task(c, 0, 1);
    else
        kcpu_pool_run(p, quantize_task, c);
    return base;
}

/* ---- the split's correction: y[t][r] += W[r][col] * value per outlier ---- */

typedef struct {
    kt_type t;
    const void *W;
    size_t row_bytes;
    const kcpu_rp *rp; /* columns from here when set (same values as W's) */
    float *y;
    int n_rows;
    const int32_t *start; /* [n_cols + 1]: hits of column c at [start[c], start[c+1]) */
    const int32_t *tok;
    const float *val;
    const int32_t *cols; /* the columns with hits, ascending */
    int n_hcols;
    atomic_int next;
} fix_ctx;

/* Weights W[r][c] of rows [r0, r1) (r1 - r0 <= FIX_ROWS) into w. */
static void fetch_col(const fix_ctx *f, int c, int r0, int r1, float *w)
{
    if (f->rp) {
        const kcpu_rp *rp = f->rp;
        const int j = c / rp->sub, cc = c % rp->sub, sh = 8 * (cc % 4);
        for (int r = r0; r < r1;) {
            const int g = r / KCPU_RP_RG, lane0 = r % KCPU_RP_RG;
            const uint8_t *rec = rp->data + (size_t)g * rp->rg_bytes + (size_t)j * rp->sb_bytes;
            uint32_t code[KCPU_RP_RG]; /* row u's 4 codes of the column's quad */
            float sc[KCPU_RP_RG], bi[KCPU_RP_RG];
            memcpy(code, rec + (size_t)(cc / 4) * (KCPU_RP_RG * 4), sizeof code);
            memcpy(sc, rec + (size_t)rp->sub * KCPU_RP_RG, sizeof sc);
            memcpy(bi, rec + (size_t)rp->sub * KCPU_RP_RG + sizeof sc, sizeof bi);
            float wg[KCPU_RP_RG];
            for (int u = 0; u < KCPU_RP_RG; u++)
                wg[u] = sc[u] * (float)((code[u] >> sh) & 0xffu) + bi[u];
            int n = KCPU_RP_RG - lane0 < r1 - r ? KCPU_RP_RG - lane0 : r1 - r;
            memcpy(w + (r - r0), wg + lane0, (size_t)n * sizeof(float));
            r += n;
        }
        return;
    }
    const int b = c / KT_QK, jj = c % KT_QK;
    const char *W = f->W;
    if (f->t == KT_Q8_0) {
        for (int r = r0; r < r1; r++) {
            const kt_block_q8_0 *blk = (const kt_block_q8_0 *)(W + (size_t)r * f->row_bytes) + b;
            w[r - r0] = kt_f16_to_f32(blk->d) * (float)blk->qs[jj];
        }
        return;
    }
    /* any other type: its unpacked 32-element (sub-)block, kcpu_unpack_blocks'
     * element = dw * code + mw * smul */
    const float smul = x_sum_mul(f->t);
    int8_t wq[KT_QK];
    float dw, dw2, mw;
    for (int r = r0; r < r1; r++) {
        kcpu_unpack_blocks(f->t, W + (size_t)r * f->row_bytes, b, 1, wq, &dw, &dw2, &mw);
        w[r - r0] = (jj < 16 ? dw : dw2) * (float)wq[jj] + mw * smul;
    }
}

#define FIX_ROWS 64

static void fix_task(void *arg, int ith, int nth)
{
    (void)ith;
    (void)nth;
    fix_ctx *f = arg;
    float w[FIX_ROWS];
    for (;;) {
        const int r0 = atomic_fetch_add_explicit(&f->next, 1, memory_order_relaxed) * FIX_ROWS;
        if (r0 >= f->n_rows)
            break;
        const int r1 = r0 + FIX_ROWS < f->n_rows ? r0 + FIX_ROWS : f->n_rows;
        for (int k = 0; k < f->n_hcols; k++) {
            const int c = f->cols[k];
            fetch_col(f, c, r0, r1, w);
            for (int h = f->start[c]; h < f->start[c + 1]; h++) {
                float *yr = f->y + (size_t)f->tok[h] * (size_t)f->n_rows;
                const float v = f->val[h];
                for (int r = r0; r < r1; r++)
                    yr[r] += w[r - r0] * v;
            }
        }
    }
}

/* Adds the outliers the quantize step took out (mm_ctx oj / ov) to y: per
 * token in ascending column order whatever the threads, so a row's result
 * depends on its own values only. */
static void split_fix(kcpu_pool *p, mm_ctx *c, const kcpu_rp *rp)
{
    const int n_hits = atomic_load_explicit(&c->hits, memory_order_relaxed);
    if (n_hits == 0)
        return;
    const int nb = c->xq.nb, n_cols = c->n_cols;
    const size_t n = (size_t)c->n_tok * (size_t)nb;
    const split_ws *w = &c->sw;
    int32_t *start = w->start, *fill = w->fill, *hc = w->hcols;
    /* counting sort by column, tokens ascending within a column */
    memset(start, 0, ((size_t)n_cols + 1) * sizeof(int32_t));
    for (size_t i = 0; i < n; i++)
        if (w->oj[i] != 0xff)
            start[(int)(i % (size_t)nb) * KT_QK + w->oj[i] + 1]++;
    int n_hcols = 0;
    for (int col = 0; col < n_cols; col++) {
        if (start[col + 1])
            hc[n_hcols++] = col;
        start[col + 1] += start[col];
    }
    memcpy(fill, start, (size_t)n_cols * sizeof(int32_t));
    for (size_t i = 0; i < n; i++) {
        if (w->oj[i] == 0xff)
            continue;
        const int col = (int)(i % (size_t)nb) * KT_QK + w->oj[i];
        w->tok[fill[col]] = (int32_t)(i / (size_t)nb);
        w->val[fill[col]] = w->ov[i];
        fill[col]++;
    }
    fix_ctx f = { .t = c->t, .W = c->W, .row_bytes = c->row_bytes, .rp = rp,
                  .y = c->y, .n_rows = c->n_rows, .start = start, .tok = w->tok,
                  .val = w->val, .cols = hc, .n_hcols = n_hcols };
    atomic_init(&f.next, 0);
    if (kcpu_pool_size(p) == 1 || (size_t)n_hits * (size_t)c->n_rows < 65536)
        fix_task(&f, 0, 1);
    else
        kcpu_pool_run(p, fix_task, &f);
}

/* See kcpu.h. Quantized weight types: x is first quantized into ws (in
 * parallel over tokens when there are several), then rows are shared out. */
void kcpu_matmul(kcpu_pool *p, kt_type t, const void *W, const float *x,
                 float *y, int n_rows, int n_cols, int n_tok, void *ws)
{
    kcpu_matmul_ex(p, t, W, NULL, -1.0f, x, y, n_rows, n_cols, n_tok, ws);
}

void kcpu_matmul_ex(kcpu_pool *p, kt_type t, const void *W, const kcpu_rp *rp_cols,
                    float xsplit, const float *x, float *y, int n_rows, int n_cols, int n_tok,
                    void *ws)
{
    if (n_rows <= 0 || n_tok <= 0)
        return;
    int nth = kcpu_pool_size(p);
    mm_ctx c = {
        .ops = ops(), .t = t, .W = W, .row_bytes = kt_row_bytes(t, n_cols),
        .x = x, .y = y, .n_rows = n_rows, .n_cols = n_cols, .n_tok = n_tok,
    };
    c.chunk = mm_chunk_rows(c.row_bytes, n_rows, n_tok, nth);
    atomic_init(&c.next, 0);
    if (is_quant(t))
        quantize_x(p, &c, ws, xsplit);
    kcpu_pool_run(p, mm_task, &c);
    if (is_quant(t))
        split_fix(p, &c, rp_cols && rp_cols->t == t && rp_cols->rows == n_rows &&
                                 rp_cols->cols == n_cols ? rp_cols : NULL);
}

/* ---- the repacked matmul (struct kcpu_rp, kcpu_impl.h) ---- */

int kcpu_rp_wanted(void)
{
#if defined(LKQ_HAVE_AVX512)
    return ops() == &kcpu_avx512vnni_ops;
#else
    return 0;
#endif
}

kcpu_rp *kcpu_rp_create(kt_type t, const void *W, int n_rows, int n_cols)
{
    if (!kt_is_quant(t) || n_rows <= 0 || n_cols <= 0 || n_cols % kt_block_elems(t))
        return NULL;
    kcpu_rp *rp = calloc(1, sizeof *rp);
    const int nb = n_cols / KT_QK;
    int8_t *wq = malloc((size_t)n_cols);
    float *f = malloc(3 * (size_t)nb * sizeof(float));
    if (!rp || !wq || !f)
        goto fail;
    rp->t = t;
    rp->rows = n_rows;
    rp->cols = n_cols;
    rp->sub = t == KT_Q6_K ? 16 : 32;
    rp->n_sb = n_cols / rp->sub;
    rp->n_rg = (n_rows + KCPU_RP_RG - 1) / KCPU_RP_RG;
    rp->sb_bytes = (size_t)rp->sub * KCPU_RP_RG + 2 * KCPU_RP_RG * sizeof(float);
    rp->rg_bytes = (size_t)rp->n_sb * rp->sb_bytes;
    rp->mem = calloc(1, (size_t)rp->n_rg * rp->rg_bytes + 64);
    if (!rp->mem)
        goto fail;
    rp->data = (uint8_t *)ALIGN_UP((uintptr_t)rp->mem, 64);
    float *dw = f, *dw2 = f + nb, *mw = f + 2 * nb;
    const size_t rb = kt_row_bytes(t, n_cols);
    /* code offset (signed codes become u8) and the bias per unit of scale
     * where the offset is the type's own (Q4_0 q - 8, Q5_0 q - 16) */
    const int signed_codes = t == KT_Q8_0 || t == KT_Q6_K;
    const float off = t == KT_Q4_0 ? -8.0f : t == KT_Q5_0 ? -16.0f : signed_codes ? -128.0f : 0.0f;
    for (int r = 0; r < n_rows; r++) {
        kcpu_unpack_blocks(t, (const char *)W + (size_t)r * rb, 0, nb, wq, dw, dw2, mw);
        const int g = r / KCPU_RP_RG, lane = r % KCPU_RP_RG;
        for (int j = 0; j < rp->n_sb; j++) {
            uint8_t *rec = rp->data + (size_t)g * rp->rg_bytes + (size_t)j * rp->sb_bytes;
            float *sc = (float *)(rec + (size_t)rp->sub * KCPU_RP_RG);
            const int e0 = j * rp->sub, b = e0 / KT_QK;
            const float scale = rp->sub == 16 && e0 % KT_QK ? dw2[b] : dw[b];
            sc[lane] = scale;
            /* Q4_0 / Q5_0 carry d in mw; the offset types have mw = 0 */
            sc[KCPU_RP_RG + lane] = t == KT_Q4_0 || t == KT_Q5_0 ? off * mw[b]
                                  : signed_codes ? off * scale : mw[b];
            for (int e = 0; e < rp->sub; e++)
                rec[(e / 4) * 4 * KCPU_RP_RG + 4 * lane + e % 4] =
                    (uint8_t)(wq[e0 + e] + (signed_codes ? 128 : 0));
        }
    }
    free(wq);
    free(f);
    return rp;
fail:
    free(wq);
    free(f);
    kcpu_rp_destroy(rp);
    return NULL;
}

void kcpu_rp_destroy(kcpu_rp *rp)
{
    if (!rp)
        return;
    free(rp->mem);
    free(rp);
}

size_t kcpu_rp_bytes(const kcpu_rp *rp)
{
    return rp ? (size_t)rp->n_rg * rp->rg_bytes + sizeof *rp : 0;
}

size_t kcpu_rp_scratch_bytes(int n_cols, int n_tok)
{
    if (n_cols <= 0 || n_tok <= 0)
        return 0;
    return kcpu_matmul_scratch_bytes(KT_Q8_0, n_cols, n_tok) + 64 +
           ALIGN_UP((size_t)n_tok * (size_t)(n_cols / 16) * sizeof(float), 64);
}

typedef struct {
    const kcpu_rp *rp;
    kcpu_q8x xq;
    float *xs;
    float *y;
    kcpu_mm_rp_fn fn;
    int chunk; /* row groups per work item */
    atomic_int next;
} rp_ctx;

/* xs [t][j] = d_x * sum of token t's codes over sub-block j (q8x's s when
 * sub-blocks are whole blocks: quantized with smul 1). */
static void rp_sums_task(void *arg, int ith, int nth)
{
    rp_ctx *c = arg;
    const int nb = c->xq.nb, sub = c->rp->sub, n_sb = c->rp->n_sb;
    for (int t = ith; t < c->xq.n_tok; t += nth)
        for (int j = 0; j < n_sb; j++) {
            const int e0 = j * sub;
            const size_t xi = kcpu_q8x_index(nb, t, e0 / KT_QK);
            float v;
            if (sub == KT_QK) {
                v = c->xq.s[xi];
            } else {
                int32_t sum = 0;
                for (int e = 0; e < sub; e++)
                    sum += c->xq.qs[xi * KT_QK + (size_t)(e0 % KT_QK + e)];
                v = c->xq.d[xi] * (float)sum;
            }
            c->xs[(size_t)t * (size_t)n_sb + (size_t)j] = v;
        }
}

static void rp_task(void *arg, int ith, int nth)
{
    (void)ith;
    (void)nth;
    rp_ctx *c = arg;
    for (;;) {
        int g0 = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed) * c->chunk;
        if (g0 >= c->rp->n_rg)
            break;
        int g1 = g0 + c->chunk < c->rp->n_rg ? g0 + c->chunk : c->rp->n_rg;
        c->fn(c->rp, &c->xq, c->xs, c->y, g0, g1);
    }
}

void kcpu_matmul_rp(kcpu_pool *p, const kcpu_rp *rp, const float *x, float *y, int n_tok,
                    void *ws)
{
    if (n_tok <= 0)
        return;
    const int nth = kcpu_pool_size(p);
    /* the activations as kcpu_matmul quantizes them for Q8_0 (smul 1) */
    mm_ctx q = { .ops = ops(), .t = KT_Q8_0, .x = x, .y = y, .n_rows = rp->rows,
                 .n_cols = rp->cols, .n_tok = n_tok };
    char *base = quantize_x(p, &q, ws, -1.0f);
    rp_ctx c = { .rp = rp, .xq = q.xq, .xs = (float *)base, .y = y };
#if defined(LKQ_HAVE_AVX512)
    c.fn = ops() == &kcpu_avx512vnni_ops ? kcpu_avx512vnni_mm_rp : kcpu_scalar_mm_rp;
#else
    c.fn = kcpu_scalar_mm_rp;
#endif
    if (n_tok == 1 || nth == 1)
        rp_sums_task(&c, 0, 1);
    else
        kcpu_pool_run(p, rp_sums_task, &c);
    /* work items of whole row-group pairs, about 96 KB of records (kept in
     * L2 while every token passes), at least ~4 per thread */
    int chunk = (rp->n_rg + 4 * nth - 1) / (4 * nth);
    int cap = (int)((size_t)(96 * 1024) / rp->rg_bytes);
    if (chunk > cap)
        chunk = cap;
    chunk = chunk < 2 ? 2 : ALIGN_UP(chunk, 2);
    c.chunk = chunk;
    atomic_init(&c.next, 0);
    kcpu_pool_run(p, rp_task, &c);
    split_fix(p, &q, rp);
}

/* ---- attention ---- */

/* Scratch: per thread, the attn_item tmp (scores of one tile), then a
 * region for split partials. Independent of the context length: n_ctx is
 * part of the interface in case a future kernel needs it. */
#define ATTN_TMP_FLOATS ALIGN_UP((size_t)KCPU_ATTN_TMP_FLOATS, 16)
#define ATTN_PART_FLOATS 16384 /* partial results, per thread of the pool */

size_t kcpu_attn_scratch_bytes(int n_threads, int n_ctx)
{
    (void)n_ctx;
    if (n_threads < 1)
        n_threads = 1;
    return 64 + (size_t)n_threads * (ATTN_TMP_FLOATS + ATTN_PART_FLOATS) * sizeof(float);
}

typedef struct {
    const kcpu_ops *ops;
    float *out;
    const float *q;
    const uint16_t *k, *v;
    size_t kv_stride;
    int pos0, n_q, n_head, n_kv_head, head_dim;
    float scale;
    float *tmp;        /* per-thread areas, ATTN_TMP_FLOATS apart */
    /* tiled path: items = token blocks x kv heads x head subgroups x splits */
    int group;         /* query heads per kv head */
    int hsub, n_hsub;  /* heads per subgroup, subgroups per kv head */
    int tb, n_tb;      /* tokens per block, token blocks */
    int n_split, split_len;
    /* n_split > 1: per item and split, KCPU_ATTN_QMAX * (head_dim + 2) floats:
     * o[query][head_dim] then (m, l) per query */
    float *part;
    int n_items;
    atomic_int next;
} attn_ctx;

/* Fills a work item (before splitting): queries of token block tb, kv head
 * kvh, head subgroup hs. Returns the number of positions it needs. */
static int attn_fill(const attn_ctx *c, int tb, int kvh, int hs, kcpu_attn_item *it)
{
    int j0 = tb * c->tb, j1 = j0 + c->tb < c->n_q ? j0 + c->tb : c->n_q;
    int h0 = kvh * c->group + hs * c->hsub;
    int h1 = h0 + c->hsub < (kvh + 1) * c->group ? h0 + c->hsub : (kvh + 1) * c->group;
    it->nq = 0;
    for (int j = j0; j < j1; j++)
        for (int h = h0; h < h1; h++) {
            size_t qo = ((size_t)j * (size_t)c->n_head + (size_t)h) * (size_t)c->head_dim;
            it->q[it->nq] = c->q + qo;
            it->o[it->nq] = c->out + qo;
            it->n_pos[it->nq] = c->pos0 + j + 1;
            it->nq++;
        }
    it->ml = NULL;
    it->k = c->k + (size_t)kvh * (size_t)c->head_dim;
    it->v = c->v + (size_t)kvh * (size_t)c->head_dim;
    it->kv_stride = c->kv_stride;
    it->head_dim = c->head_dim;
    it->scale = c->scale;
    it->p0 = 0;
    it->p1 = c->pos0 + j1;
    return it->p1;
}

/* Items are handed out last token block first (the causally longest), each
 * split of an item writes its partial result for attn_merge. */
static void attn_task(void *arg, int ith, int nth)
{
    (void)nth;
    attn_ctx *c = arg;
    float *tmp = c->tmp + (size_t)ith * ATTN_TMP_FLOATS;
    size_t qstride = (size_t)c->head_dim + 2;
    for (;;) {
        int i = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (i >= c->n_items)
            break;
        int split = i % c->n_split, base = i / c->n_split;
        int per_tb = c->n_kv_head * c->n_hsub;
        int tb = c->n_tb - 1 - base / per_tb;
        int kvh = base % per_tb / c->n_hsub, hs = base % c->n_hsub;
        kcpu_attn_item it;
        attn_fill(c, tb, kvh, hs, &it);
        if (c->n_split > 1) {
            float *pp = c->part + ((size_t)base * (size_t)c->n_split + (size_t)split) *
                                      KCPU_ATTN_QMAX * qstride;
            for (int q = 0; q < it.nq; q++)
                it.o[q] = pp + (size_t)q * (size_t)c->head_dim;
            it.ml = pp + (size_t)KCPU_ATTN_QMAX * (size_t)c->head_dim;
            it.p0 = split * c->split_len;
            it.p1 = it.p0 + c->split_len < it.p1 ? it.p0 + c->split_len : it.p1;
        }
        c->ops->attn_item(&it, tmp);
    }
}

/* Combines the split partials of every item into the outputs. */
static void attn_merge(const attn_ctx *c)
{
    size_t qstride = (size_t)c->head_dim + 2;
    int per_tb = c->n_kv_head * c->n_hsub;
    for (int base = 0; base < c->n_items / c->n_split; base++) {
        kcpu_attn_item it;
        attn_fill(c, c->n_tb - 1 - base / per_tb, base % per_tb / c->n_hsub,
                  base % c->n_hsub, &it);
        const float *pp = c->part + (size_t)base * (size_t)c->n_split * KCPU_ATTN_QMAX * qstride;
        size_t sstride = KCPU_ATTN_QMAX * qstride;
        size_t ml_off = (size_t)KCPU_ATTN_QMAX * (size_t)c->head_dim;
        for (int q = 0; q < it.nq; q++) {
            float mx = -INFINITY, l = 0.0f;
            for (int s = 0; s < c->n_split; s++)
                mx = fmaxf(mx, pp[(size_t)s * sstride + ml_off + 2 * (size_t)q]);
            float *o = it.o[q];
            for (int d = 0; d < c->head_dim; d++)
                o[d] = 0.0f;
            for (int s = 0; s < c->n_split; s++) {
                const float *ps = pp + (size_t)s * sstride;
                const float *ml = ps + ml_off + 2 * (size_t)q;
                if (ml[0] == -INFINITY)
                    continue; /* no visible position in this split */
                float w = expf(ml[0] - mx);
                l += w * ml[1];
                for (int d = 0; d < c->head_dim; d++)
                    o[d] += w * ps[(size_t)q * (size_t)c->head_dim + (size_t)d];
            }
            for (int d = 0; d < c->head_dim; d++)
                o[d] /= l;
        }
    }
}

/* See kcpu.h. Work items group the query heads of one KV head with a few
 * tokens (up to KCPU_ATTN_QMAX queries) so each K/V tile is converted once
 * for all of them. When there are too few items for the pool (decoding),
 * the positions of each item are split and the partial softmax results are
 * merged afterwards. ws: kcpu_attn_scratch_bytes(kcpu_pool_size(p), n_ctx). */
void kcpu_attn_f16(kcpu_pool *p, float *out, const float *q,
                   const uint16_t *k, const uint16_t *v, size_t kv_stride,
                   int pos0, int n_q, int n_head, int n_kv_head, int head_dim,
                   float scale, void *ws)
{
    if (n_q <= 0 || n_head <= 0 || n_kv_head <= 0 || head_dim <= 0)
        return;
    int nth = kcpu_pool_size(p);
    attn_ctx c = {
        .ops = ops(), .out = out, .q = q, .k = k, .v = v,
        .kv_stride = kv_stride, .pos0 = pos0, .n_q = n_q, .n_head = n_head,
        .n_kv_head = n_kv_head, .head_dim = head_dim, .scale = scale,
        .tmp = (float *)ALIGN_UP((uintptr_t)ws, 64),
        .group = n_head / n_kv_head,
    };
    atomic_init(&c.next, 0);
    c.n_hsub = (c.group + KCPU_ATTN_QMAX - 1) / KCPU_ATTN_QMAX;
    c.hsub = (c.group + c.n_hsub - 1) / c.n_hsub;
    c.tb = KCPU_ATTN_QMAX / c.hsub;
    c.n_tb = (n_q + c.tb - 1) / c.tb;
    int items = c.n_tb * n_kv_head * c.n_hsub;
    /* split positions when items are too few to keep every thread busy,
     * at least 256 positions per split, partials within the budget */
    size_t per_split = (size_t)items * KCPU_ATTN_QMAX * ((size_t)head_dim + 2);
    int n_split = 1;
    if (nth > 1 && items < 4 * nth) {
        n_split = (4 * nth + items - 1) / items;
        int by_len = (pos0 + n_q) / 256;
        int by_mem = (int)((size_t)nth * ATTN_PART_FLOATS / per_split);
        n_split = n_split < by_len ? n_split : by_len;
        n_split = n_split < by_mem ? n_split : by_mem;
        if (n_split < 1)
            n_split = 1;
    }
    c.n_split = n_split;
    c.split_len = ALIGN_UP((pos0 + n_q + n_split - 1) / n_split, 8);
    c.n_items = items * n_split;
    c.part = c.tmp + (size_t)nth * ATTN_TMP_FLOATS;
    kcpu_pool_run(p, attn_task, &c);
    if (n_split > 1)
        attn_merge(&c);
}

/* ---- small ops (single-threaded, thread-safe) ---- */

void kcpu_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    ops()->rmsnorm(out, x, w, n, eps);
}

void kcpu_softmax(float *x, int n)
{
    ops()->softmax(x, n);
}

void kcpu_swiglu(float *gate, const float *up, int n)
{
    ops()->swiglu(gate, up, n);
}

typedef struct {
    float *gate;
    const float *up;
    size_t n;
    int gelu;
} glu_ctx;

static void glu_task(void *arg, int ith, int nth)
{
    const glu_ctx *c = arg;
    size_t groups = (c->n + 7) / 8;
    size_t g0 = groups * (size_t)ith / (size_t)nth, g1 = groups * (size_t)(ith + 1) / (size_t)nth;
    size_t i0 = g0 * 8, i1 = g1 * 8 < c->n ? g1 * 8 : c->n;
    if (i0 >= i1)
        return;
    if (c->gelu)
        ops()->geglu(c->gate + i0, c->up + i0, (int)(i1 - i0));
    else
        ops()->swiglu(c->gate + i0, c->up + i0, (int)(i1 - i0));
}

void kcpu_glu(kcpu_pool *p, int gelu, float *gate, const float *up, size_t n)
{
    glu_ctx c = { gate, up, n, gelu };
    if (n < 4096) { /* below a few microseconds, waking the workers costs more */
        glu_task(&c, 0, 1);
        return;
    }
    kcpu_pool_run(p, glu_task, &c);
}

void kcpu_dequant_row(kt_type t, const void *row, float *out, int64_t n)
{
    ops()->dequant_row(t, row, out, n);
}

void kcpu_f32_to_f16(uint16_t *dst, const float *src, int64_t n)
{
    ops()->f32_to_f16(dst, src, n);
}

/* Rotary embedding. Angles are formed in double (exact enough at any
 * position), reduced to [-pi, pi] and then evaluated in float; the
 * cos/sin pairs are computed once per call and applied to every head. */
void kcpu_rope(float *x, int n_heads, int head_dim, int n_rot, int pos,
               float theta, float freq_scale)
{
    kcpu_rope_ex(x, n_heads, head_dim, n_rot, pos, theta, freq_scale, NULL, 0);
}

void kcpu_rope_ex(float *x, int n_heads, int head_dim, int n_rot, int pos, float theta,
                  float freq_scale, const float *freqs, int neox)
{
    enum { MAX_PAIRS = 256 };
    float cs[MAX_PAIRS][2];
    const double two_pi = 6.283185307179586476925286766559;
    const double step = pow((double)theta, -2.0 / n_rot);
    const int half = n_rot / 2;
    double freq = 1.0; /* theta^(-2i/n_rot), by repeated multiplication */
    for (int i0 = 0; i0 < half; i0 += MAX_PAIRS) {
        int n = half - i0 < MAX_PAIRS ? half - i0 : MAX_PAIRS;
        for (int i = 0; i < n; i++, freq *= step) {
            double a = (double)pos * (double)freq_scale * freq;
            if (freqs)
                a /= (double)freqs[i0 + i];
            a -= two_pi * nearbyint(a / two_pi);
            cs[i][0] = cosf((float)a);
            cs[i][1] = sinf((float)a);
        }
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + (size_t)h * (size_t)head_dim;
            if (neox) {
                float *lo = xh + i0, *hi = xh + half + i0;
                for (int i = 0; i < n; i++) {
                    float x0 = lo[i], x1 = hi[i];
                    lo[i] = x0 * cs[i][0] - x1 * cs[i][1];
                    hi[i] = x0 * cs[i][1] + x1 * cs[i][0];
                }
            } else {
                float *xp = xh + 2 * i0;
                for (int i = 0; i < n; i++) {
                    float x0 = xp[2 * i], x1 = xp[2 * i + 1];
                    xp[2 * i] = x0 * cs[i][0] - x1 * cs[i][1];
                    xp[2 * i + 1] = x0 * cs[i][1] + x1 * cs[i][0];
                }
            }
        }
    }
}

void kcpu_geglu(float *gate, const float *up, int n)
{
    ops()->geglu(gate, up, n);
}

void kcpu_hadamard(float *x, int rows, int dim)
{
    const float norm = 1.0f / sqrtf((float)dim);
    for (int r = 0; r < rows; r++) {
        float *xr = x + (size_t)r * (size_t)dim;
        for (int h = 1; h < dim; h <<= 1) /* pairs (i, i + h) within blocks of 2h */
            for (int b = 0; b < dim; b += 2 * h)
                for (int i = b; i < b + h; i++) {
                    float a = xr[i], c = xr[i + h];
                    xr[i] = a + c;
                    xr[i + h] = a - c;
                }
        for (int i = 0; i < dim; i++)
            xr[i] *= norm;
    }
}

void kcpu_softcap(float *x, int n, float cap)
{
    const float inv = 1.0f / cap;
    for (int i = 0; i < n; i++)
        x[i] = cap * tanhf(x[i] * inv);
}
