/*
 * kvq_ref.c - reference LiveKVQuant-P cache math (DESIGN.md §4): the block
 * layout, chunk quantiles (Eq. 3-2), the clipped EMA (Eq. 3-2, 3-3) and
 * block quantization with FP16 outliers (Eq. 3-4), plus dequantization, the
 * oracle of the fused attention. See kernels/kvq.h for the contracts and the
 * readings chosen where DESIGN.md is silent.
 *
 * This is also what the engine runs (once per chunk per layer), so every
 * step is O(elements): quantiles and the outlier budget use quickselect, not
 * sorting, and nothing allocates (callers pass scratch).
 * Threading: pure functions; they write only through their arguments.
 */
#include "kernels/kvq.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/ktypes.h"

#define FP16_MAX 65504.0f

static size_t align8(size_t x) { return (x + 7) & ~(size_t)7; }

/* ---- layout ---------------------------------------------------------------- */

int kvq_layout_init(kvq_layout *L, int block_tokens, int kv_dim, int head_dim,
                    int v_group, kvq_k_mode k_mode, float outlier_budget,
                    char *err, size_t errlen)
{
    const char *why = NULL;
    memset(L, 0, sizeof *L);
    if (block_tokens <= 0 || kv_dim <= 0 || head_dim <= 0 || v_group <= 0)
        why = "block_tokens, kv_dim, head_dim and v_group must be positive";
    else if (head_dim % v_group != 0)
        why = "v_group must divide head_dim";
    else if (kv_dim % head_dim != 0)
        why = "head_dim must divide kv_dim";
    else if (kv_dim % 2 != 0)
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
    L->kv_dim = kv_dim;
    L->head_dim = head_dim;
    L->v_group = v_group;
    L->k_mode = k_mode;
    L->out_cap = (int)cap;
    L->n_ksnap = k_mode == KVQ_K_PER_CHANNEL ? kv_dim : (int)n_vsnap;

    size_t ncap = (size_t)L->out_cap, nks = (size_t)L->n_ksnap;
    size_t off = align8(sizeof(kvq_block_hdr));
    L->off_kq = off;        off += align8(td / 2);
    L->off_vq = off;        off += align8(td / 2);
    L->off_ks = off;        off += align8(nks * 2);
    L->off_kz = off;        off += align8(nks);
    L->off_vs = off;        off += align8(n_vsnap * 2);
    L->off_vz = off;        off += align8(n_vsnap);
    L->off_kout_idx = off;  off += align8(ncap * 4);
    L->off_kout_val = off;  off += align8(ncap * 2);
    L->off_vout_idx = off;  off += align8(ncap * 4);
    L->off_vout_val = off;  off += align8(ncap * 2);
    L->bytes = off;
    L->bytes_dense = td; /* two tensors at half a byte per element */
    L->bytes_scales = nks * 3 + n_vsnap * 3;
    L->bytes_outliers = 2 * ncap * 6;
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

/* Quantile of x[0..m) by linear interpolation at rank k + frac; x is
 * reordered (selection). */
static float quantile_at(float *x, int m, int k, double frac)
{
    float lo = select_kth(x, m, k);
    if (frac == 0)
        return lo;
    float hi = min_of(x + k + 1, m - k - 1); /* x[k+1..] >= x[k] */
    return (float)((double)lo + frac * ((double)hi - (double)lo));
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
        float w = hi - lo;
        float band_lo = lo - gamma * w, band_hi = hi + gamma * w;
        /* Eq. 3-2, with both statistics kept inside the band so that a chunk
         * entirely beyond one end cannot invert the range. */
        float ca = fminf(fmaxf(ac, band_lo), band_hi);
        float cb = fminf(fmaxf(bc, band_lo), band_hi);
        e->lo[c] = lo + step * (ca - lo);
        e->hi[c] = hi + step * (cb - hi);
    }
    e->n_chunks = k + 1;
}

/* ---- Eq. 3-4 ------------------------------------------------------------------ */

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

void kvq_scale_zero(float lo, float hi, uint16_t *s_f16, uint8_t *z)
{
    float l = isfinite(lo) ? fminf(lo, 0.0f) : 0.0f;
    float h = isfinite(hi) ? fmaxf(hi, 0.0f) : 0.0f;
    float w = fmaxf(h - l, KVQ_EPS);
    uint16_t s16 = f16_round_up(w / (float)KVQ_LEVELS);
    float s = kt_f16_to_f32(s16);
    float zf = roundf(-l / s);
    if (!(zf >= 0))
        zf = 0;
    if (zf > KVQ_LEVELS)
        zf = KVQ_LEVELS;
    *s_f16 = s16;
    *z = (uint8_t)zf;
}

static void put_code(uint8_t *q, size_t i, int code)
{
    q[i >> 1] |= (uint8_t)(code << ((i & 1) * 4));
}

static int get_code(const uint8_t *q, size_t i)
{
    return (q[i >> 1] >> ((i & 1) * 4)) & 0xf;
}

/* Code of x on the grid s * (q - z), q in 0..15 (x finite). Returns the
 * clamped code and sets *exc to how far x lies beyond the grid's half-step
 * band [s(-z - 1/2), s(15 - z + 1/2)], in steps (<= 0: inside). */
static int code_of(float x, float s, int z, float *exc)
{
    float q = x / s;
    float r = roundf(q) + (float)z;
    if (r < 0) {
        *exc = (-(float)z - 0.5f) - q;
        return 0;
    }
    if (r > KVQ_LEVELS) {
        *exc = q - ((float)(KVQ_LEVELS - z) + 0.5f);
        return KVQ_LEVELS;
    }
    *exc = 0;
    return (int)r;
}

/* Code of a non-finite value: NaN -> z (dequantizes to 0), +-Inf -> 15 / 0. */
static int code_nonfinite(float x, int z)
{
    if (isnan(x))
        return z;
    return x > 0 ? KVQ_LEVELS : 0;
}

/* Candidate lists of one tensor, in scratch. */
typedef struct {
    uint32_t *idx; /* element index t*D + c, ascending */
    float *exc;    /* excursion in steps, > 0 */
    float *sel;    /* selection workspace */
    uint32_t n;
} cand_list;

size_t kvq_quantize_scratch_bytes(const kvq_layout *L)
{
    size_t td = (size_t)L->block_tokens * (size_t)L->kv_dim;
    return 3 * align8(td * 4) + align8((size_t)L->kv_dim * 2 * sizeof(float));
}

/* Keeps the out_cap candidates with the largest excursion (ties: lowest
 * index first), compacted in index order; writes them to the outlier lists
 * with their values from x [n][stride]. Returns how many were kept; the
 * caller counts the rest as clamped (their dense codes already are). */
static uint32_t keep_outliers(cand_list *cl, uint32_t cap, const float *x,
                              size_t stride, int D, uint32_t *out_idx,
                              uint16_t *out_val)
{
    uint32_t m = cl->n, kept = 0;
    if (m > cap) {
        if (cap == 0)
            return 0;
        memcpy(cl->sel, cl->exc, (size_t)m * sizeof(float));
        /* ascending rank m - cap = the cap-th largest */
        float thr = select_kth(cl->sel, (int)m, (int)(m - cap));
        uint32_t n_gt = 0;
        for (uint32_t i = 0; i < m; i++)
            n_gt += cl->exc[i] > thr;
        uint32_t n_eq = cap - n_gt;
        for (uint32_t i = 0; i < m; i++) {
            int keep = cl->exc[i] > thr;
            if (!keep && cl->exc[i] == thr && n_eq > 0) {
                keep = 1;
                n_eq--;
            }
            if (keep)
                cl->idx[kept++] = cl->idx[i];
        }
    } else {
        kept = m;
    }
    for (uint32_t i = 0; i < kept; i++) {
        uint32_t e = cl->idx[i];
        float v = x[(size_t)(e / (uint32_t)D) * stride + e % (uint32_t)D];
        v = fminf(fmaxf(v, -FP16_MAX), FP16_MAX); /* keep it finite */
        out_idx[i] = e;
        out_val[i] = kt_f32_to_f16(v);
    }
    return kept;
}

/* Per-(token, group) quantization of x [n][stride] (V, or K per token):
 * values flagged by the per-channel band [band_lo, band_hi] (NULL: none) are
 * left out of the group's min/max and become outlier candidates if they then
 * fall outside the group's grid. Returns the count of non-finite values. */
static uint32_t quant_groups(const kvq_layout *L, const float *x, size_t stride,
                             int n, const float *band_lo, const float *band_hi,
                             uint8_t *q, uint16_t *s16, uint8_t *z,
                             cand_list *cl)
{
    int D = L->kv_dim, G = L->v_group, ng = D / G;
    uint32_t n_bad = 0;
    cl->n = 0;
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
                amn = fminf(amn, v);
                amx = fmaxf(amx, v);
                if (!band_lo || (v >= band_lo[c] && v <= band_hi[c])) {
                    mn = fminf(mn, v);
                    mx = fmaxf(mx, v);
                }
            }
            if (mn > mx) { /* no unflagged value: use them all */
                mn = amn;
                mx = amx;
            }
            if (mn > mx) /* no finite value at all */
                mn = mx = 0;
            size_t si = (size_t)t * (size_t)ng + (size_t)g;
            kvq_scale_zero(mn, mx, &s16[si], &z[si]);
            float s = kt_f16_to_f32(s16[si]);
            int zz = z[si];
            for (int c = c0; c < c0 + G; c++) {
                float v = row[c];
                size_t i = (size_t)t * (size_t)D + (size_t)c;
                if (!isfinite(v)) {
                    put_code(q, i, code_nonfinite(v, zz));
                    n_bad++;
                    continue;
                }
                float exc;
                put_code(q, i, code_of(v, s, zz, &exc));
                /* Only flagged values can lie outside the grid (the rest
                 * set its range); a float-rounding sliver is ignored. */
                int flagged = band_lo && (v < band_lo[c] || v > band_hi[c]);
                if (flagged && exc > 0) {
                    cl->idx[cl->n] = (uint32_t)i;
                    cl->exc[cl->n] = exc;
                    cl->n++;
                }
            }
        }
    }
    return n_bad;
}

/* K per channel: grid from [k_lo, k_hi] (NULL: the block's own per-channel
 * min/max); values beyond the grid's half-step band are candidates. */
static uint32_t quant_k_channels(const kvq_layout *L, const float *k,
                                 size_t stride, int n, const float *k_lo,
                                 const float *k_hi, uint8_t *q, uint16_t *s16,
                                 uint8_t *z, float *sc, cand_list *cl)
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
                    lo = fminf(lo, v);
                    hi = fmaxf(hi, v);
                }
            }
            if (lo > hi)
                lo = hi = 0;
        }
        kvq_scale_zero(lo, hi, &s16[c], &z[c]);
        sc[c] = kt_f16_to_f32(s16[c]);
    }
    cl->n = 0;
    for (int t = 0; t < n; t++) {
        const float *row = k + (size_t)t * stride;
        for (int c = 0; c < D; c++) {
            float v = row[c];
            size_t i = (size_t)t * (size_t)D + (size_t)c;
            if (!isfinite(v)) {
                put_code(q, i, code_nonfinite(v, z[c]));
                n_bad++;
                continue;
            }
            float exc;
            put_code(q, i, code_of(v, sc[c], z[c], &exc));
            if (exc > 0 && k_lo && k_hi) { /* own min/max: no candidates */
                cl->idx[cl->n] = (uint32_t)i;
                cl->exc[cl->n] = exc;
                cl->n++;
            }
        }
    }
    return n_bad;
}

void kvq_quantize_block(const kvq_layout *L, void *base, const float *k,
                        const float *v, size_t stride, int n,
                        const float *k_lo, const float *k_hi,
                        const float *v_lo, const float *v_hi, void *scratch)
{
    int T = L->block_tokens, D = L->kv_dim;
    size_t td = (size_t)T * (size_t)D;
    if (n < 0)
        n = 0;
    if (n > T)
        n = T;
    memset(base, 0, L->bytes);

    char *sp = scratch;
    cand_list cl;
    cl.idx = (uint32_t *)sp;
    cl.exc = (float *)(sp + align8(td * 4));
    cl.sel = (float *)(sp + 2 * align8(td * 4));
    float *band = (float *)(sp + 3 * align8(td * 4)); /* [2][D] */
    uint32_t cap = (uint32_t)L->out_cap, n_clamped = 0, kept;

    kvq_block_hdr *h = kvq_hdr(base);
    h->n_tok = (uint32_t)n;

    /* K */
    uint8_t *kq = KVQ_AT(base, L->off_kq, uint8_t *);
    uint16_t *ks = KVQ_AT(base, L->off_ks, uint16_t *);
    uint8_t *kz = KVQ_AT(base, L->off_kz, uint8_t *);
    if (L->k_mode == KVQ_K_PER_CHANNEL)
        n_clamped += quant_k_channels(L, k, stride, n, k_lo, k_hi, kq, ks, kz,
                                      band, &cl);
    else
        n_clamped += quant_groups(L, k, stride, n, NULL, NULL, kq, ks, kz, &cl);
    kept = keep_outliers(&cl, cap, k, stride, D,
                         KVQ_AT(base, L->off_kout_idx, uint32_t *),
                         KVQ_AT(base, L->off_kout_val, uint16_t *));
    h->n_kout = kept;
    n_clamped += cl.n - kept;

    /* V: the per-channel EMA band [lo - s_c/2, hi + s_c/2] flags candidates;
     * a channel with no range (NaN) flags nothing. */
    const float *blo = NULL, *bhi = NULL;
    if (v_lo && v_hi) {
        for (int c = 0; c < D; c++) {
            float lo = v_lo[c], hi = v_hi[c];
            if (isnan(lo) || isnan(hi)) {
                band[c] = -INFINITY;
                band[D + c] = INFINITY;
                continue;
            }
            float half = 0.5f * fmaxf(hi - lo, KVQ_EPS) / (float)KVQ_LEVELS;
            band[c] = lo - half;
            band[D + c] = hi + half;
        }
        blo = band;
        bhi = band + D;
    }
    n_clamped += quant_groups(L, v, stride, n, blo, bhi,
                              KVQ_AT(base, L->off_vq, uint8_t *),
                              KVQ_AT(base, L->off_vs, uint16_t *),
                              KVQ_AT(base, L->off_vz, uint8_t *), &cl);
    kept = keep_outliers(&cl, cap, v, stride, D,
                         KVQ_AT(base, L->off_vout_idx, uint32_t *),
                         KVQ_AT(base, L->off_vout_val, uint16_t *));
    h->n_vout = kept;
    n_clamped += cl.n - kept;
    h->n_clamped = n_clamped;
}

/* One tensor of a block: dense codes, then the exact outliers on top. */
static void dequant_tensor(const kvq_layout *L, const void *base, int per_channel,
                           size_t off_q, size_t off_s, size_t off_z,
                           size_t off_idx, size_t off_val, uint32_t n_out,
                           int n, float *x, size_t stride)
{
    int D = L->kv_dim, ng = D / L->v_group, G = L->v_group;
    const uint8_t *q = KVQ_CAT(base, off_q, uint8_t *);
    const uint16_t *s16 = KVQ_CAT(base, off_s, uint16_t *);
    const uint8_t *z = KVQ_CAT(base, off_z, uint8_t *);
    for (int t = 0; t < n; t++) {
        for (int c = 0; c < D; c++) {
            size_t si = per_channel ? (size_t)c : (size_t)t * (size_t)ng + (size_t)(c / G);
            float s = kt_f16_to_f32(s16[si]);
            int code = get_code(q, (size_t)t * (size_t)D + (size_t)c);
            x[(size_t)t * stride + (size_t)c] = s * (float)(code - (int)z[si]);
        }
    }
    const uint32_t *idx = KVQ_CAT(base, off_idx, uint32_t *);
    const uint16_t *val = KVQ_CAT(base, off_val, uint16_t *);
    if (n_out > (uint32_t)L->out_cap)
        n_out = (uint32_t)L->out_cap;
    for (uint32_t i = 0; i < n_out; i++) {
        uint32_t t = idx[i] / (uint32_t)D, c = idx[i] % (uint32_t)D;
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
        dequant_tensor(L, base, L->k_mode == KVQ_K_PER_CHANNEL, L->off_kq,
                       L->off_ks, L->off_kz, L->off_kout_idx, L->off_kout_val,
                       h->n_kout, n, k, stride);
    if (v)
        dequant_tensor(L, base, 0, L->off_vq, L->off_vs, L->off_vz,
                       L->off_vout_idx, L->off_vout_val, h->n_vout, n, v, stride);
}
