/*
 * kvq_ref.c - reference LiveKVQuant-P cache math (DESIGN.md §4): the block
 * layout, chunk quantiles (Eq. 3-2), the clipped EMA (Eq. 3-2, 3-3) and
 * block quantization with FP16 outliers (Eq. 3-4), plus dequantization, the
 * oracle of the fused attention. See kernels/kvq.h for the contracts and the
 * readings chosen where DESIGN.md is silent.
 *
 * This is also what the engine runs (once per chunk per layer), so every
 * step is O(elements) and nothing allocates (callers pass scratch): the
 * quantiles near the ends (the usual alpha) come from one filtered pass
 * with small insertion buffers, other ranks and the outlier budget from
 * quickselect; the per-row loops are written branch-free so that compilers
 * vectorize them. Measured with bench/bench_kvq.c: about 1 ms per layer for
 * a 512-token SmolLM2 chunk on one core (quantiles of K and V, EMA, four
 * 128-token blocks).
 * Threading: pure functions; they write only through their arguments.
 */
#include "kernels/kvq.h"

#include <assert.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/ktypes.h"

#define FP16_MAX 65504.0f

static size_t align8(size_t x) { return (x + 7) & ~(size_t)7; }

/* min/max for values known not to be NaN (fminf/fmaxf are libm calls
 * unless NaN semantics are given up for the whole file) */
static inline float minf(float a, float b) { return b < a ? b : a; }
static inline float maxf(float a, float b) { return b > a ? b : a; }

/* ---- layout ---------------------------------------------------------------- */

/* The layouts of SmolLM2 (T 128, D 3 x 64, G 64, budget 0.5%: 123 slots)
 * and Gemma-3 (D 256) at every width, pinned: a change of the block format
 * shows up here first. */
_Static_assert(KVQ_BLOCK_BYTES(128, 192, 64, 192, 123, 4, 4) == 27024, "SmolLM2 K4V4 block");
_Static_assert(KVQ_BLOCK_BYTES(128, 192, 64, 192, 123, 8, 8) == 51888, "SmolLM2 K8V8 block");
_Static_assert(KVQ_BLOCK_BYTES(128, 192, 64, 192, 123, 3, 3) == 20880, "SmolLM2 K3V3 block");
_Static_assert(KVQ_BLOCK_BYTES(128, 192, 64, 192, 123, 2, 2) == 14736, "SmolLM2 K2V2 block");
_Static_assert(KVQ_BLOCK_BYTES(128, 192, 64, 192, 123, 3, 2) == 17808, "SmolLM2 K3V2 block");
_Static_assert(KVQ_BLOCK_BYTES(128, 256, 256, 256, 164, 4, 4) == 35056, "Gemma-3 K4V4 block");
_Static_assert(KVQ_CODE_BYTES(8, 3) == 3 && KVQ_CODE_BYTES(4, 2) == 1 &&
                   KVQ_CODE_BYTES(2, 4) == 1 && KVQ_CODE_BYTES(1, 8) == 1,
               "codes per byte");
_Static_assert(sizeof(kvq_block_hdr) == 16, "block header");

int kvq_layout_init(kvq_layout *L, int block_tokens, int kv_dim, int head_dim,
                    int v_group, kvq_k_mode k_mode, float outlier_budget,
                    char *err, size_t errlen)
{
    return kvq_layout_init_bits(L, block_tokens, kv_dim, head_dim, v_group, k_mode,
                                outlier_budget, 4, 4, err, errlen);
}

int kvq_layout_init_bits(kvq_layout *L, int block_tokens, int kv_dim, int head_dim,
                         int v_group, kvq_k_mode k_mode, float outlier_budget,
                         int k_bits, int v_bits, char *err, size_t errlen)
{
    const char *why = NULL;
    memset(L, 0, sizeof *L);
    if (!KVQ_BITS_OK(k_bits) || !KVQ_BITS_OK(v_bits))
        why = "k_bits and v_bits must be 2, 3, 4 or 8";
    else if (block_tokens <= 0 || kv_dim <= 0 || head_dim <= 0 || v_group <= 0)
        why = "block_tokens, kv_dim, head_dim and v_group must be positive";
    else if (head_dim % v_group != 0)
        why = "v_group must divide head_dim";
    else if (kv_dim % head_dim != 0)
        why = "head_dim must divide kv_dim";
    else if ((k_bits == 3 || v_bits == 3) && v_group % 8 != 0)
        why = "int3 packs 8 codes in 3 bytes: v_group must be a multiple of 8";
    else if ((k_bits == 4 || v_bits == 4) && kv_dim % 2 != 0)
        why = "kv_dim must be even (two 4-bit codes per byte)";
    else if (k_mode != KVQ_K_PER_CHANNEL && k_mode != KVQ_K_PER_TOKEN)
        why = "unknown k_mode";
    else if (!(outlier_budget >= 0.0f && outlier_budget <= 1.0f))
        why = "outlier_budget must be in [0, 1]";
    else if ((long long)block_tokens * kv_dim > INT_MAX / 4)
        why = "block too large (T * D must stay below 2^29)";
    if (why) {
        if (err && errlen)
            snprintf(err, errlen, "kvq layout: %s", why);
        return -1;
    }

    size_t td = (size_t)block_tokens * (size_t)kv_dim;
    size_t n_vsnap = td / (size_t)v_group;
    /* ceil(budget * T * D); the small slack keeps a budget that is an exact
     * decimal (0.01 * 100) from gaining a slot through float rounding. */
    double cap = ceil((double)outlier_budget * (double)td - 1e-6);
    if (cap < 0)
        cap = 0;
    if (cap > (double)td)
        cap = (double)td;

    L->block_tokens = block_tokens;
    L->k_bits = k_bits;
    L->v_bits = v_bits;
    L->kv_dim = kv_dim;
    L->head_dim = head_dim;
    L->v_group = v_group;
    L->k_mode = k_mode;
    L->out_cap = (int)cap;
    L->idx_bytes = (int)KVQ_IDX_BYTES(block_tokens, kv_dim);
    L->k_zbits = KVQ_ZBITS(k_bits);
    L->v_zbits = KVQ_ZBITS(v_bits);
    L->n_ksnap = k_mode == KVQ_K_PER_CHANNEL ? kv_dim : (int)n_vsnap;

    size_t ncap = (size_t)L->out_cap, nks = (size_t)L->n_ksnap;
    size_t off = align8(sizeof(kvq_block_hdr));
    L->off_kq = off;        off += align8(KVQ_CODE_BYTES(td, k_bits));
    L->off_vq = off;        off += align8(KVQ_CODE_BYTES(td, v_bits));
    L->off_ks = off;        off += align8(nks * 2);
    L->off_kz = off;        off += align8(KVQ_CODE_BYTES(nks, L->k_zbits));
    L->off_vs = off;        off += align8(n_vsnap * 2);
    L->off_vz = off;        off += align8(KVQ_CODE_BYTES(n_vsnap, L->v_zbits));
    L->off_kout_idx = off;  off += align8(ncap * (size_t)L->idx_bytes);
    L->off_kout_val = off;  off += align8(ncap * 2);
    L->off_vout_idx = off;  off += align8(ncap * (size_t)L->idx_bytes);
    L->off_vout_val = off;  off += align8(ncap * 2);
    L->bytes = off;
    assert(off == KVQ_BLOCK_BYTES(block_tokens, kv_dim, v_group, nks, ncap, k_bits, v_bits));
    L->bytes_dense = KVQ_CODE_BYTES(td, k_bits) + KVQ_CODE_BYTES(td, v_bits);
    L->bytes_scales = nks * 2 + KVQ_CODE_BYTES(nks, L->k_zbits) + n_vsnap * 2 +
                      KVQ_CODE_BYTES(n_vsnap, L->v_zbits);
    L->bytes_outliers = 2 * ncap * (size_t)(L->idx_bytes + 2);
    return 0;
}

/* ---- quickselect ------------------------------------------------------------ */

static float med3(float a, float b, float c)
{
    if (a < b) {
        if (b < c) return b;
        return a < c ? c : a;
    }
    if (a < c) return a;
    return b < c ? c : b;
}

/* The k-th smallest (0-based) of x[0..m), m >= 1, no NaN. Reorders x so that
 * afterwards x[0..k) <= x[k] <= x[k+1..m). Hoare partition around the median
 * of three values that are in the range, so sorted or constant data stay
 * linear; expected O(m). */
static float select_kth(float *x, int m, int k)
{
    int l = 0, r = m - 1;
    while (l < r) {
        float p = med3(x[l], x[l + (r - l) / 2], x[r]);
        int i = l, j = r;
        while (i <= j) {
            while (x[i] < p) i++;
            while (p < x[j]) j--;
            if (i <= j) {
                float t = x[i];
                x[i] = x[j];
                x[j] = t;
                i++;
                j--;
            }
        }
        /* x[l..j] <= p, x[j+1..i-1] == p, x[i..r] >= p */
        if (k <= j)
            r = j;
        else if (k >= i)
            l = i;
        else
            break;
    }
    return x[k];
}

static float min_of(const float *x, int m)
{
    float v = x[0];
    for (int i = 1; i < m; i++)
        if (x[i] < v)
            v = x[i];
    return v;
}

/* Quantile ranks this close to either end (the usual alpha * (n - 1) is a
 * handful) are found with insertion buffers instead of quickselect. */
#define SMALL_RANK 24

/* Rank h = q * (m - 1) split into its order statistic k and fraction. A rank
 * within 1e-6 of an integer is snapped to it, so that alpha = 0.01 (not exact
 * in float) over 101 values is exactly the second smallest. */
static void rank_of(double q, int m, int *k, double *frac)
{
    double h = q * (double)(m - 1);
    double r = floor(h + 0.5);
    if (fabs(h - r) < 1e-6)
        h = r;
    if (h < 0)
        h = 0;
    if (h > m - 1)
        h = m - 1;
    *k = (int)floor(h);
    *frac = h - (double)*k;
    if (*k >= m - 1) {
        *k = m - 1;
        *frac = 0;
    }
}

static float lerp_d(float x0, float x1, double frac)
{
    if (frac == 0)
        return x0;
    return (float)((double)x0 + frac * ((double)x1 - (double)x0));
}

/* Inserts a finite v into the ascending buffer lo[0..nl) of the smallest
 * values and the descending hi[0..nh) of the largest (slots start at
 * +-inf), and tightens the channel's thresholds to the buffers' last
 * entries. */
static void tile_insert(float *lo, int nl, float *hi, int nh, float v,
                        float *tl, float *th)
{
    if (!isfinite(v))
        return;
    if (v < lo[nl - 1]) {
        int r = nl - 1;
        for (; r > 0 && lo[r - 1] > v; r--)
            lo[r] = lo[r - 1];
        lo[r] = v;
        *tl = minf(*tl, lo[nl - 1]);
    }
    if (v > hi[nh - 1]) {
        int r = nh - 1;
        for (; r > 0 && hi[r - 1] < v; r--)
            hi[r] = hi[r - 1];
        hi[r] = v;
        *th = maxf(*th, hi[nh - 1]);
    }
}

/* Quantiles of the channels c0 .. c0+w-1 (w <= QTILE) of x when both ranks
 * are within SMALL_RANK of the ends. Two row-major passes over the tile
 * (rows read contiguously, no scratch):
 *  1. branch-free (vectorizable): finite counts, and per channel a
 *     threshold tl = the largest of the minima of nl disjoint row segments
 *     (so at least nl finite values are <= tl: the nl smallest all are),
 *     and th likewise from nh segment maxima;
 *  2. flags per row the values <= tl or >= th (about 2-3% on real data;
 *     also branch-free) and inserts only those into per-channel buffers of
 *     the nl smallest and nh largest, tightening the thresholds as they fill.
 * nl and nh are the buffer sizes needed for m = n plus a margin of one;
 * ranks only shrink with m, so they cover every channel. O(n) per channel,
 * O(n * SMALL_RANK) at worst (data sorted against the buffers). */
#define QTILE 16
static void quantiles_tile(const float *x, int n, size_t stride, int c0, int w,
                           double al, int nl, int nh, float *a, float *b)
{
    float lo[QTILE][SMALL_RANK], hi[QTILE][SMALL_RANK];
    float tl[QTILE], th[QTILE];
    int cnt[QTILE];
    for (int j = 0; j < w; j++) {
        cnt[j] = 0;
        tl[j] = -INFINITY;
        th[j] = INFINITY;
        for (int r = 0; r < SMALL_RANK; r++) {
            lo[j][r] = INFINITY;
            hi[j][r] = -INFINITY;
        }
    }
    /* pass 1 */
    int nseg = nl > nh ? nl : nh;
    for (int sg = 0; sg < nseg; sg++) {
        int t0 = (int)((long long)n * sg / nseg), t1 = (int)((long long)n * (sg + 1) / nseg);
        float mn[QTILE], mx[QTILE];
        for (int j = 0; j < w; j++) {
            mn[j] = INFINITY;
            mx[j] = -INFINITY;
        }
        for (int t = t0; t < t1; t++) {
            const float *row = x + (size_t)t * stride + (size_t)c0;
            for (int j = 0; j < w; j++) {
                float v = row[j];
                int fin = fabsf(v) <= FLT_MAX;
                float vl = fin ? v : INFINITY, vh = fin ? v : -INFINITY;
                mn[j] = vl < mn[j] ? vl : mn[j];
                mx[j] = vh > mx[j] ? vh : mx[j];
                cnt[j] += fin;
            }
        }
        for (int j = 0; j < w; j++) {
            if (sg < nl)
                tl[j] = maxf(tl[j], mn[j]);
            if (sg < nh)
                th[j] = minf(th[j], mx[j]);
        }
    }
    /* pass 2 */
    for (int t = 0; t < n; t++) {
        const float *row = x + (size_t)t * stride + (size_t)c0;
        unsigned char fl[QTILE];
        int any = 0;
        for (int j = 0; j < w; j++) {
            fl[j] = (row[j] <= tl[j]) | (row[j] >= th[j]);
            any |= fl[j];
        }
        if (!any)
            continue;
        for (int j = 0; j < w; j++)
            if (fl[j])
                tile_insert(lo[j], nl, hi[j], nh, row[j], &tl[j], &th[j]);
    }
    for (int j = 0; j < w; j++) {
        int m = cnt[j], ka, kb;
        double fa, fb;
        if (m == 0) {
            a[c0 + j] = b[c0 + j] = NAN;
            continue;
        }
        rank_of(al, m, &ka, &fa);
        rank_of(1.0 - al, m, &kb, &fb);
        int kt = m - 1 - kb; /* b's rank counted from the top */
        assert(ka < nl && (fa == 0 || ka + 1 < nl) && kt < nh && (fb == 0 || kt >= 1));
        a[c0 + j] = fa == 0 ? lo[j][ka] : lerp_d(lo[j][ka], lo[j][ka + 1], fa);
        b[c0 + j] = fb == 0 ? hi[j][kt] : lerp_d(hi[j][kt], hi[j][kt - 1], fb);
    }
}

/* Quantile of x[0..m) by linear interpolation at rank k + frac; x is
 * reordered (selection). */
static float quantile_at(float *x, int m, int k, double frac)
{
    float lo = select_kth(x, m, k);
    if (frac == 0)
        return lo;
    return lerp_d(lo, min_of(x + k + 1, m - k - 1), frac); /* x[k+1..] >= x[k] */
}

/* ---- Eq. 3-2 / 3-3 ---------------------------------------------------------- */

void kvq_chunk_quantiles(const float *x, int n, int D, size_t stride,
                         float alpha, float *a, float *b, float *scratch)
{
    double al = alpha;
    if (!(al >= 0))
        al = 0;
    if (al > 0.5)
        al = 0.5;
    if (n >= 1) {
        int ka, kb;
        double fa, fb;
        rank_of(al, n, &ka, &fa);
        rank_of(1.0 - al, n, &kb, &fb);
        /* buffers: ranks ka, ka + 1 from the bottom and n-1-kb, one below
         * it from the top, each with a margin of one */
        int nl = ka + 3, nh = (n - 1 - kb) + 2;
        if (nl > n)
            nl = n;
        if (nh > n)
            nh = n;
        if (nl <= SMALL_RANK && nh <= SMALL_RANK) {
            for (int c0 = 0; c0 < D; c0 += QTILE)
                quantiles_tile(x, n, stride, c0, D - c0 < QTILE ? D - c0 : QTILE,
                               al, nl, nh, a, b);
            return;
        }
    }
    for (int c = 0; c < D; c++) {
        int m = 0;
        for (int t = 0; t < n; t++) {
            float v = x[(size_t)t * stride + (size_t)c];
            if (isfinite(v))
                scratch[m++] = v;
        }
        if (m == 0) {
            a[c] = b[c] = NAN;
            continue;
        }
        int ka, kb;
        double fa, fb;
        rank_of(al, m, &ka, &fa);
        rank_of(1.0 - al, m, &kb, &fb);
        a[c] = quantile_at(scratch, m, ka, fa);
        /* After the first selection x[ka..m) holds the values of rank >= ka,
         * and kb >= ka (alpha <= 0.5), so the second one searches only there. */
        b[c] = quantile_at(scratch + ka, m - ka, kb - ka, fb);
    }
}

void kvq_ema_update(kvq_ema *e, const kvq_ema_params *p, const float *a,
                    const float *b, int D, float weight)
{
    int k = e->n_chunks;
    int warming = k < p->warmup_chunks;
    float step = (1.0f - p->ema_decay) * weight;
    float gamma = p->ema_clip;

    for (int c = 0; c < D; c++) {
        float ac = a[c], bc = b[c];
        int have = isfinite(ac) && isfinite(bc);
        int seen = k > 0 && !isnan(e->lo[c]); /* the channel has a range */

        if (warming) {
            if (!have) {
                /* A missing chunk counts as the channel's current mean, so
                 * the mean is unchanged; before any data, nothing to keep. */
                if (seen) {
                    e->sum_a[c] += e->lo[c];
                    e->sum_b[c] += e->hi[c];
                } else {
                    e->lo[c] = e->hi[c] = NAN;
                }
                continue;
            }
            if (!seen) {
                /* first data for this channel: earlier missing chunks take
                 * this value (same imputation as above, after the fact) */
                e->sum_a[c] = ac * (float)(k + 1);
                e->sum_b[c] = bc * (float)(k + 1);
                e->lo[c] = ac;
                e->hi[c] = bc;
                continue;
            }
            e->sum_a[c] += ac;
            e->sum_b[c] += bc;
            e->lo[c] = e->sum_a[c] / (float)(k + 1);
            e->hi[c] = e->sum_b[c] / (float)(k + 1);
            continue;
        }

        if (!have) {
            if (!seen)
                e->lo[c] = e->hi[c] = NAN;
            continue;
        }
        if (!seen) { /* first chunk with W = 0 (or first data of a channel) */
            e->lo[c] = ac;
            e->hi[c] = bc;
            continue;
        }
        float lo = e->lo[c], hi = e->hi[c];
        float w = maxf(hi - lo, KVQ_EPS); /* as in s: a band is never empty */
        float band_lo = lo - gamma * w, band_hi = hi + gamma * w;
        /* Eq. 3-2, with both statistics kept inside the band so that a chunk
         * entirely beyond one end cannot invert the range. */
        float ca = minf(maxf(ac, band_lo), band_hi);
        float cb = minf(maxf(bc, band_lo), band_hi);
        e->lo[c] = lo + step * (ca - lo);
        e->hi[c] = hi + step * (cb - hi);
    }
    e->n_chunks = k + 1;
}

/* ---- Eq. 3-4 ------------------------------------------------------------------ */

/* roundf (half away from zero) of q, |q| <= 512, without a libm call:
 * q - trunc(q) is exact. */
static inline int round_away(float q)
{
    int i = (int)q;
    float f = q - (float)i;
    /* branch-free: the fraction is a coin flip for a branch predictor */
    return i + (f >= 0.5f) - (f <= -0.5f);
}

/* Smallest FP16 >= s (s > 0), at most the largest finite FP16. */
static uint16_t f16_round_up(float s)
{
    if (!(s < FP16_MAX))
        return 0x7bff;
    uint16_t h = kt_f32_to_f16(s);
    if (kt_f16_to_f32(h) < s)
        h++; /* positive halfs are ordered like their bit patterns */
    return h;
}

void kvq_scale_zero_bits(float lo, float hi, int bits, uint16_t *s_f16, uint8_t *z)
{
    const int lv = KVQ_LEVELS_OF(bits);
    float l = isfinite(lo) ? minf(lo, 0.0f) : 0.0f;
    float h = isfinite(hi) ? maxf(hi, 0.0f) : 0.0f;
    float w = maxf(h - l, KVQ_EPS); /* h - l may be +inf: s saturates */
    uint16_t s16 = f16_round_up(w / (float)lv);
    float s = kt_f16_to_f32(s16);
    float zf = -l / s; /* >= 0 */
    *s_f16 = s16;
    *z = (uint8_t)(zf >= (float)lv ? lv : round_away(zf));
}

void kvq_scale_zero(float lo, float hi, uint16_t *s_f16, uint8_t *z)
{
    kvq_scale_zero_bits(lo, hi, 4, s_f16, z);
}

/* Code of x on the grid s * (q - z), q in 0..lv (x finite). Returns the
 * clamped code and sets *exc to how far x lies beyond the grid's half-step
 * band [s(-z - 1/2), s(lv - z + 1/2)], in steps (<= 0: inside). x / s is
 * clamped to +-512 for the rounding (beyond every width's codes). */
static inline int code_of(float x, float s, int z, int lv, float *exc)
{
    float q = x / s;
    float qc = q < -512.0f ? -512.0f : (q > 512.0f ? 512.0f : q); /* codes only */
    int r = round_away(qc) + z;
    if (r < 0) {
        *exc = (-(float)z - 0.5f) - q;
        return 0;
    }
    if (r > lv) {
        *exc = q - ((float)(lv - z) + 0.5f);
        return lv;
    }
    *exc = 0;
    return r;
}

/* Code of a non-finite value: NaN -> z (dequantizes to 0), +-Inf -> lv / 0. */
static int code_nonfinite(float x, int z, int lv)
{
    if (isnan(x))
        return z;
    return x > 0 ? lv : 0;
}

/* Working memory of one kvq_quantize_block call, carved from its scratch. */
typedef struct {
    uint32_t *idx; /* [T*D] candidates: element index t*D + c, ascending */
    float *exc;    /* [T*D] their excursion in steps (> 0) */
    float *sel;    /* [T*D] selection workspace */
    uint32_t n;    /* candidates so far */
    float *band;   /* [2][D] V flag band, lo then hi */
    float *rs;     /* [D] grid scale of each channel of the current row */
    int *rz;       /* [D] grid zero, likewise */
    float *rq;     /* [D] x / s of the current row, clamped to +-512 */
    int *rr;       /* [D] unclamped codes of the current row */
    int bits, lv;  /* width of the tensor being quantized, its top code */
} qwork;

size_t kvq_quantize_scratch_bytes(const kvq_layout *L)
{
    size_t td = (size_t)L->block_tokens * (size_t)L->kv_dim;
    size_t D = (size_t)L->kv_dim;
    return 3 * align8(td * 4) + align8(D * 2 * 4) + 4 * align8(D * 4);
}

static void qwork_init(qwork *w, const kvq_layout *L, void *scratch)
{
    size_t td = (size_t)L->block_tokens * (size_t)L->kv_dim;
    size_t D = (size_t)L->kv_dim;
    char *p = scratch;
    w->idx = (uint32_t *)p;  p += align8(td * 4);
    w->exc = (float *)p;     p += align8(td * 4);
    w->sel = (float *)p;     p += align8(td * 4);
    w->band = (float *)p;    p += align8(D * 2 * 4);
    w->rs = (float *)p;      p += align8(D * 4);
    w->rz = (int *)p;        p += align8(D * 4);
    w->rq = (float *)p;      p += align8(D * 4);
    w->rr = (int *)p;
    w->n = 0;
}

static void add_cand(qwork *w, size_t i, float exc)
{
    w->idx[w->n] = (uint32_t)i;
    w->exc[w->n] = exc;
    w->n++;
}

/* The row loops below are branch-free and take restrict pointers so that
 * compilers vectorize them (the float clamp and the rounding are in
 * separate loops: together they are not if-converted under the default
 * -ftrapping-math). Same arithmetic as code_of. */
static void row_scale(const float *restrict x, const float *restrict s,
                      float *restrict rq, int D)
{
    for (int c = 0; c < D; c++) {
        float v = x[c] / s[c];
        v = v < -512.0f ? -512.0f : v;
        rq[c] = v > 512.0f ? 512.0f : v;
    }
}

/* Returns 1 when some unclamped code is outside 0..lv. */
static int row_round(const float *restrict rq, const int *restrict z,
                     int *restrict rr, int D, int lv)
{
    int out = 0;
    for (int c = 0; c < D; c++) {
        int r = round_away(rq[c]) + z[c];
        rr[c] = r;
        out |= (unsigned)r > (unsigned)lv;
    }
    return out;
}

/* Clamps the row's codes to 0..lv and writes them at codes i0 .. i0+D-1 of
 * the (zeroed) b-bit stream q: whole bytes for 8 bits and for 4 bits on a
 * byte boundary, code by code otherwise. */
static void row_pack(int *restrict rr, uint8_t *restrict q, size_t i0, int D, int bits, int lv)
{
    for (int c = 0; c < D; c++)
        rr[c] = rr[c] < 0 ? 0 : (rr[c] > lv ? lv : rr[c]);
    if (bits == 8) {
        for (int c = 0; c < D; c++)
            q[i0 + (size_t)c] = (uint8_t)rr[c];
    } else if (bits == 4 && i0 % 2 == 0 && D % 2 == 0) {
        uint8_t *qr = q + i0 / 2;
        for (int c = 0; c < D / 2; c++)
            qr[c] = (uint8_t)(rr[2 * c] | rr[2 * c + 1] << 4);
    } else {
        for (int c = 0; c < D; c++)
            kvq_put_code(q, i0 + (size_t)c, bits, rr[c]);
    }
}

/* Quantizes one row x[0..D) (token t) on the grids (w->rs[c], w->rz[c])
 * into codes t*D .. t*D + D - 1 of the stream q. Values beyond the grid's half-step band
 * become candidates when `cands` is set and, if flo/fhi are given, they lie
 * outside [flo[c], fhi[c]] (the V flag band). Returns the count of
 * non-finite values (coded by code_nonfinite). */
static uint32_t quant_row(qwork *w, const float *x, int D, size_t t, uint8_t *q,
                          int cands, const float *flo, const float *fhi)
{
    const float *rs = w->rs;
    const int *rz = w->rz;
    int *rr = w->rr;
    const int bits = w->bits, lv = w->lv;
    size_t i0 = t * (size_t)D;
    int bad = 0;
    for (int c = 0; c < D; c++)
        bad |= !(fabsf(x[c]) <= FLT_MAX);
    if (bad) { /* rare: element by element */
        uint32_t n_bad = 0;
        for (int c = 0; c < D; c++) {
            float exc;
            if (!isfinite(x[c])) {
                kvq_put_code(q, i0 + (size_t)c, bits, code_nonfinite(x[c], rz[c], lv));
                n_bad++;
                continue;
            }
            kvq_put_code(q, i0 + (size_t)c, bits, code_of(x[c], rs[c], rz[c], lv, &exc));
            if (cands && exc > 0 && (!flo || x[c] < flo[c] || x[c] > fhi[c]))
                add_cand(w, i0 + (size_t)c, exc);
        }
        return n_bad;
    }
    row_scale(x, rs, w->rq, D);
    int out = row_round(w->rq, rz, rr, D, lv);
    if (out && cands) {
        for (int c = 0; c < D; c++) {
            if ((unsigned)rr[c] <= (unsigned)lv)
                continue;
            float exc;
            code_of(x[c], rs[c], rz[c], lv, &exc);
            if (exc > 0 && (!flo || x[c] < flo[c] || x[c] > fhi[c]))
                add_cand(w, i0 + (size_t)c, exc);
        }
    }
    row_pack(rr, q, i0, D, bits, lv);
    return 0;
}

/* Keeps the out_cap candidates with the largest excursion (ties: lowest
 * index first), compacted in index order; writes them to the outlier lists
 * with their values from x [n][stride]. Returns how many were kept; the
 * caller counts the rest as clamped (their dense codes already are). */
static uint32_t keep_outliers(qwork *w, uint32_t cap, const float *x,
                              size_t stride, int D, int idx_bytes, void *out_idx,
                              uint16_t *out_val)
{
    uint32_t m = w->n, kept = 0;
    if (m > cap) {
        if (cap == 0)
            return 0;
        memcpy(w->sel, w->exc, (size_t)m * sizeof(float));
        /* ascending rank m - cap = the cap-th largest */
        float thr = select_kth(w->sel, (int)m, (int)(m - cap));
        uint32_t n_gt = 0;
        for (uint32_t i = 0; i < m; i++)
            n_gt += w->exc[i] > thr;
        uint32_t n_eq = cap - n_gt;
        for (uint32_t i = 0; i < m; i++) {
            int keep = w->exc[i] > thr;
            if (!keep && w->exc[i] == thr && n_eq > 0) {
                keep = 1;
                n_eq--;
            }
            if (keep)
                w->idx[kept++] = w->idx[i];
        }
    } else {
        kept = m;
    }
    for (uint32_t i = 0; i < kept; i++) {
        uint32_t e = w->idx[i];
        float v = x[(size_t)(e / (uint32_t)D) * stride + e % (uint32_t)D];
        v = minf(maxf(v, -FP16_MAX), FP16_MAX); /* keep it finite */
        if (idx_bytes == 2)
            ((uint16_t *)out_idx)[i] = (uint16_t)e;
        else
            ((uint32_t *)out_idx)[i] = e;
        out_val[i] = kt_f32_to_f16(v);
    }
    return kept;
}

/* Per-(token, group) quantization of x [n][stride] (V, or K per token):
 * values flagged by the per-channel band [flo, fhi] (NULL: none) are left
 * out of the group's min/max and become outlier candidates if they then
 * fall outside the group's grid. Returns the count of non-finite values. */
static uint32_t quant_groups(const kvq_layout *L, qwork *w, const float *x,
                             size_t stride, int n, const float *flo,
                             const float *fhi, uint8_t *q, uint16_t *s16,
                             uint8_t *z)
{
    int D = L->kv_dim, G = L->v_group, ng = D / G;
    uint32_t n_bad = 0;
    w->n = 0;
    for (int t = 0; t < n; t++) {
        const float *row = x + (size_t)t * stride;
        for (int g = 0; g < ng; g++) {
            int c0 = g * G;
            float mn = INFINITY, mx = -INFINITY;   /* unflagged values */
            float amn = INFINITY, amx = -INFINITY; /* all finite values */
            for (int c = c0; c < c0 + G; c++) {
                float v = row[c];
                if (!isfinite(v))
                    continue;
                amn = minf(amn, v);
                amx = maxf(amx, v);
                if (!flo || (v >= flo[c] && v <= fhi[c])) {
                    mn = minf(mn, v);
                    mx = maxf(mx, v);
                }
            }
            if (mn > mx) { /* no unflagged value: use them all */
                mn = amn;
                mx = amx;
            }
            if (mn > mx) /* no finite value at all */
                mn = mx = 0;
            size_t si = (size_t)t * (size_t)ng + (size_t)g;
            uint8_t zz;
            kvq_scale_zero_bits(mn, mx, w->bits, &s16[si], &zz);
            kvq_put_code(z, si, KVQ_ZBITS(w->bits), zz);
            float s = kt_f16_to_f32(s16[si]);
            for (int c = c0; c < c0 + G; c++) {
                w->rs[c] = s;
                w->rz[c] = zz;
            }
        }
        /* Only flagged values can lie outside their group's grid (the rest
         * set its range); a float-rounding sliver of the rest is ignored. */
        n_bad += quant_row(w, row, D, (size_t)t, q, flo != NULL, flo, fhi);
    }
    return n_bad;
}

/* K per channel: grid from [k_lo, k_hi] (NULL: the block's own per-channel
 * min/max, and then no candidates); values beyond the grid's half-step
 * band are candidates. */
static uint32_t quant_k_channels(const kvq_layout *L, qwork *w, const float *k,
                                 size_t stride, int n, const float *k_lo,
                                 const float *k_hi, uint8_t *q, uint16_t *s16,
                                 uint8_t *z)
{
    int D = L->kv_dim;
    uint32_t n_bad = 0;
    for (int c = 0; c < D; c++) {
        float lo, hi;
        if (k_lo && k_hi) {
            lo = k_lo[c];
            hi = k_hi[c];
        } else {
            lo = INFINITY;
            hi = -INFINITY;
            for (int t = 0; t < n; t++) {
                float v = k[(size_t)t * stride + (size_t)c];
                if (isfinite(v)) {
                    lo = minf(lo, v);
                    hi = maxf(hi, v);
                }
            }
            if (lo > hi)
                lo = hi = 0;
        }
        uint8_t zz;
        kvq_scale_zero_bits(lo, hi, w->bits, &s16[c], &zz);
        kvq_put_code(z, (size_t)c, KVQ_ZBITS(w->bits), zz);
        w->rs[c] = kt_f16_to_f32(s16[c]);
        w->rz[c] = zz;
    }
    w->n = 0;
    for (int t = 0; t < n; t++)
        n_bad += quant_row(w, k + (size_t)t * stride, D, (size_t)t, q, k_lo && k_hi,
                           NULL, NULL);
    return n_bad;
}

void kvq_quantize_block(const kvq_layout *L, void *base, const float *k,
                        const float *v, size_t stride, int n,
                        const float *k_lo, const float *k_hi,
                        const float *v_lo, const float *v_hi, void *scratch)
{
    int T = L->block_tokens, D = L->kv_dim;
    if (n < 0)
        n = 0;
    if (n > T)
        n = T;
    memset(base, 0, L->bytes);

    qwork w;
    qwork_init(&w, L, scratch);
    uint32_t cap = (uint32_t)L->out_cap, n_clamped = 0, kept;
    kvq_block_hdr *h = kvq_hdr(base);
    h->n_tok = (uint32_t)n;

    /* K */
    uint8_t *kq = KVQ_AT(base, L->off_kq, uint8_t *);
    uint16_t *ks = KVQ_AT(base, L->off_ks, uint16_t *);
    uint8_t *kz = KVQ_AT(base, L->off_kz, uint8_t *);
    w.bits = L->k_bits;
    w.lv = KVQ_LEVELS_OF(L->k_bits);
    if (L->k_mode == KVQ_K_PER_CHANNEL)
        n_clamped += quant_k_channels(L, &w, k, stride, n, k_lo, k_hi, kq, ks, kz);
    else
        n_clamped += quant_groups(L, &w, k, stride, n, NULL, NULL, kq, ks, kz);
    kept = keep_outliers(&w, cap, k, stride, D,
                         L->idx_bytes, KVQ_AT(base, L->off_kout_idx, void *),
                         KVQ_AT(base, L->off_kout_val, uint16_t *));
    h->n_kout = kept;
    n_clamped += w.n - kept;

    /* V: the per-channel EMA band [lo - s_c/2, hi + s_c/2] flags candidates;
     * a channel with no range (NaN) flags nothing. */
    const float *flo = NULL, *fhi = NULL;
    if (v_lo && v_hi) {
        for (int c = 0; c < D; c++) {
            float lo = v_lo[c], hi = v_hi[c];
            if (isnan(lo) || isnan(hi)) {
                w.band[c] = -INFINITY;
                w.band[D + c] = INFINITY;
                continue;
            }
            float half = 0.5f * maxf(hi - lo, KVQ_EPS) / (float)KVQ_LEVELS_OF(L->v_bits);
            w.band[c] = lo - half;
            w.band[D + c] = hi + half;
        }
        flo = w.band;
        fhi = w.band + D;
    }
    w.bits = L->v_bits;
    w.lv = KVQ_LEVELS_OF(L->v_bits);
    n_clamped += quant_groups(L, &w, v, stride, n, flo, fhi,
                              KVQ_AT(base, L->off_vq, uint8_t *),
                              KVQ_AT(base, L->off_vs, uint16_t *),
                              KVQ_AT(base, L->off_vz, uint8_t *));
    kept = keep_outliers(&w, cap, v, stride, D,
                         L->idx_bytes, KVQ_AT(base, L->off_vout_idx, void *),
                         KVQ_AT(base, L->off_vout_val, uint16_t *));
    h->n_vout = kept;
    n_clamped += w.n - kept;
    h->n_clamped = n_clamped;
}

/* One tensor of a block: dense codes, then the exact outliers on top.
 * Channels go in slices of DQ_SLICE so that each FP16 scale is converted
 * once per channel (K per channel) or once per row and group, not once per
 * element. */
#define DQ_SLICE 256
static void dequant_tensor(const kvq_layout *L, const void *base, int per_channel,
                           int bits, size_t off_q, size_t off_s, size_t off_z,
                           size_t off_idx, size_t off_val, uint32_t n_out,
                           int n, float *x, size_t stride)
{
    int D = L->kv_dim, G = L->v_group, ng = D / G;
    const uint8_t *q = KVQ_CAT(base, off_q, uint8_t *);
    const uint16_t *s16 = KVQ_CAT(base, off_s, uint16_t *);
    const uint8_t *z = KVQ_CAT(base, off_z, uint8_t *);
    float sc[DQ_SLICE];
    int zc[DQ_SLICE];
    for (int c0 = 0; c0 < D; c0 += DQ_SLICE) {
        int w = D - c0 < DQ_SLICE ? D - c0 : DQ_SLICE;
        for (int t = 0; t < n; t++) {
            if (per_channel ? t == 0 : 1) {
                int g_prev = -1;
                float s = 0;
                for (int j = 0; j < w; j++) {
                    int c = c0 + j;
                    size_t si = per_channel ? (size_t)c : (size_t)t * (size_t)ng + (size_t)(c / G);
                    if (per_channel || c / G != g_prev) {
                        s = kt_f16_to_f32(s16[si]);
                        g_prev = c / G;
                    }
                    sc[j] = s;
                    zc[j] = kvq_zero_at(z, si, KVQ_ZBITS(bits));
                }
            }
            size_t i0 = (size_t)t * (size_t)D + (size_t)c0;
            float *row = x + (size_t)t * stride + (size_t)c0;
            for (int j = 0; j < w; j++)
                row[j] = sc[j] * (float)(kvq_get_code(q, i0 + (size_t)j, bits) - zc[j]);
        }
    }
    const uint16_t *val = KVQ_CAT(base, off_val, uint16_t *);
    if (n_out > (uint32_t)L->out_cap)
        n_out = (uint32_t)L->out_cap;
    for (uint32_t i = 0; i < n_out; i++) {
        uint32_t e = kvq_out_idx(L, base, off_idx == L->off_vout_idx, i);
        uint32_t t = e / (uint32_t)D, c = e % (uint32_t)D;
        if (t < (uint32_t)n)
            x[(size_t)t * stride + c] = kt_f16_to_f32(val[i]);
    }
}

void kvq_dequant_block(const kvq_layout *L, const void *base, float *k,
                       float *v, size_t stride)
{
    const kvq_block_hdr *h = kvq_chdr(base);
    int n = (int)(h->n_tok < (uint32_t)L->block_tokens ? h->n_tok
                                                       : (uint32_t)L->block_tokens);
    if (k)
        dequant_tensor(L, base, L->k_mode == KVQ_K_PER_CHANNEL, L->k_bits, L->off_kq,
                       L->off_ks, L->off_kz, L->off_kout_idx, L->off_kout_val,
                       h->n_kout, n, k, stride);
    if (v)
        dequant_tensor(L, base, 0, L->v_bits, L->off_vq, L->off_vs, L->off_vz,
                       L->off_vout_idx, L->off_vout_val, h->n_vout, n, v, stride);
}
