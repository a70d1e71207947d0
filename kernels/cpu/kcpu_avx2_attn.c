/*
 * kcpu_avx2_attn.c - AVX2 + FMA + F16C attention work items of kcpu: over
 * one contiguous FP16 cache (kcpu_attn_f16) and over a segmented history
 * of FP32 / FP16 segments and INT4 blocks (kcpu_attn_seg).
 *
 * Both walk positions in tiles with an online softmax (running max and sum
 * per query) and take the item's queries in groups of up to 3 of one KV
 * head, so that one key or value vector brought into registers serves the
 * whole group.
 *
 * INT4 blocks (kernels/kvq.h) are read in place, never expanded to a
 * whole buffer. Two ways, by the number of queries per KV head in the item:
 *
 * Many (prefill chunks: a dozen or more; SEG_DENSE_Q): a tile of KP rows is
 * unpacked once for all of them (q4d_*): K codes transposed to f32,
 * kt[c][r], and scored with outer-product FMAs (one query channel broadcast
 * times 8 rows; blocks of 3 queries x 32 rows in registers, no horizontal
 * sums) against q' = q * scale * s_c, minus bias = sum q' * z_c; V rows
 * dequantized to f32 (bit-identical to kvq_dequant_block) and summed as an
 * F32 segment's. Outliers are written into the tiles (exact V; K as the
 * code-equivalent exact / s_c + z_c). The prepared queries, the V sums and
 * the softmax are those of the float path; unpacking costs about one
 * vector op per 8 codes per item instead of per query group.
 *
 * Few (decoding; fused, the codes unpacked in the dot products):
 *  - K: per (query, block) the query is folded with the block's per-channel
 *    scales, q' = q * scale * s_c, and bias = sum q' * z_c, both in the
 *    even / odd channel order in which 8 code bytes unpack (pmovzxbd, then
 *    low and high nibbles as f32); score = q' . code - bias. Per-token K
 *    scales (KVQ_K_PER_TOKEN) dequantize the unpacked codes in registers.
 *  - V: the softmax weights of a tile are folded with the rows' group
 *    scales, w = p * s, rounded to int16 against their max, and pmaddwd
 *    sums two tokens per step over codes interleaved per channel; the
 *    zeros' share -sum w * z is added per group. The integer sums of a tile
 *    (< 2^31) are scaled into the f32 outputs.
 *  - Outliers are corrections: per (item, block) the entries of the item's
 *    heads are bucketed by head (one branch-free pass over the lists), and
 *    per tile their exact values become deltas against the dense codes
 *    (while the tile's rows are in L1): scores get q_c * scale * delta,
 *    outputs p_t * delta.
 * Sliding windows: tiles start at the first row any query of the item
 * sees; rows before a query's own window are masked (-inf) after scoring.
 * Code widths other than 4 bits (K or V; kvq.h): 8 codes of 2, 3, 4 or 8
 * bits come from one load, shifted per lane (codes8). Decoding (few
 * queries per KV head, per-channel K) is fused, one code path for every
 * width (cx_*): the float path's score and V-sum loops read the codes as
 * an element type (E_C2 .. E_C8), the K scales and zeros folded into the
 * queries as for INT4, the V scales into the softmax weights, outliers as
 * deltas. Prefill chunks take the tile path of INT4 above at every width
 * (the K tile transposed from codes8 by 8 x 8 blocks, V rows dequantized
 * by qx_tensor); decoding with per-token K dequantizes each tile to f32
 * once per item and KV head and attends it like an F32 segment (qx_tile).
 * Layouts this path does not cover (head_dim or v_group not a multiple of
 * 16, head_dim > 512) go to the scalar back end's item.
 *
 * Threading: pure functions; the front end splits the work.
 */
#include "kernels/cpu/kcpu_avx2_simd.h"
#include "kernels/cpu/kcpu_impl.h"

#include <math.h>
#include <string.h>

/* Queries per KV head from which an item unpacks INT4 tiles once for all
 * of them (q4d_tile) instead of in each query group's dot products: at 15
 * (SmolLM2 prefill items) the tile path takes 0.83-0.94x the time of the
 * fused one (bench_attn, 512-query chunk at 3584); decode items (3 per
 * head there) keep the fused path. */
#define SEG_DENSE_Q 6

/* ---- code streams (kernels/kvq.h) ---- */

/* Codes e .. e + 7 (e % 8 == 0) of a b-bit stream as 32-bit lanes. For
 * b < 8 the 8 codes are b bytes at q + e*b/8: one 32-bit load (the code
 * regions are followed by other regions of the block, so it stays inside
 * the block), broadcast, and lane i shifted right by i*b. */
AI __m256i codes8(const uint8_t *q, size_t e, const int bits)
{
    const uint8_t *p = q + e / 8 * (size_t)bits;
    if (bits == 8)
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    uint32_t w;
    memcpy(&w, p, sizeof w);
    const __m256i sh = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits,
                                         6 * bits, 7 * bits);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh),
                            _mm256_set1_epi32(KVQ_LEVELS_OF(bits)));
}

/* Element type of a K/V row: f32, fp16, or the raw codes (0 .. 2^b - 1 as
 * f32) of a b-bit stream (E_C2 .. E_C8; element index i % 8 == 0 for ld8),
 * whose scales and zeros the caller folds into the queries and weights. */
enum { E_F32, E_F16, E_C2, E_C3, E_C4, E_C8 };

/* bits of a code element type */
#define E_BITS(E) ((E) == E_C2 ? 2 : (E) == E_C3 ? 3 : (E) == E_C4 ? 4 : 8)

AI __m256 ld8(const int E, const void *p, size_t i)
{
    if (E == E_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    if (E == E_F32)
        return _mm256_loadu_ps((const float *)p + i);
    return _mm256_cvtepi32_ps(codes8((const uint8_t *)p, i, E_BITS(E)));
}

AI float ld1(const int E, const void *p, size_t i)
{
    if (E == E_F16)
        return f16(((const uint16_t *)p)[i]);
    if (E == E_F32)
        return ((const float *)p)[i];
    return (float)kvq_get_code((const uint8_t *)p, i, E_BITS(E));
}

/* Lane i = sum of a[i] (4 vectors). */
AI __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3)
{
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

AI __m128i hsum4x8i(__m256i a0, __m256i a1, __m256i a2, __m256i a3)
{
    __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

/* Stores 4 scores at s + r, -inf where r + u >= nv. */
AI void store4(float *s, int r, int nv, __m128 sv)
{
    __m128 keep = _mm_castsi128_ps(_mm_cmpgt_epi32(_mm_set1_epi32(nv - r), _mm_setr_epi32(0, 1, 2, 3)));
    _mm_storeu_ps(s + r, _mm_blendv_ps(_mm_set1_ps(-INFINITY), sv, keep));
}

/* Pads scores [r, round8(nmax)) with -inf for the 8-wide exp pass. */
AI void pad_scores(const int QG, float *const *s, int r, int nmax)
{
    for (int g = 0; g < QG; g++)
        for (int rr = r; rr < ((nmax + 7) & ~7); rr++)
            s[g][rr] = -INFINITY;
}

/* Scores of rows before a query's sliding window, s[g][r] for r < lo[g],
 * become -inf (lo NULL: no window). */
AI void mask_low(const int QG, float *const *s, const int *lo)
{
    if (!lo)
        return;
    for (int g = 0; g < QG; g++)
        for (int r = 0; r < lo[g]; r++)
            s[g][r] = -INFINITY;
}

/* Rows [lo[g], nv[g]) of the tile are visible to query g (lo NULL: 0). */
AI int none_visible(const int *nv, const int *lo, int g)
{
    return nv[g] <= (lo ? lo[g] : 0);
}

/* ---- float (FP16 / FP32) tiles ---- */

/* Scaled scores of QG queries (sharing one KV head) against the keys of the
 * tile (element type E, rows ld elements apart), 4 positions per step so
 * each loaded key vector serves every query: s[g][r] = scale * (q[g] . k_r
 * - bias[g]) (bias NULL: 0) for r < round8(nmax), -inf where r >= nv[g]. */
AI void g_scores(const int E, const int QG, float *const *s, const float *const *q,
                 const float *bias, const int *nv, int nmax, const void *kb, size_t ld, int D,
                 float scale)
{
    const int D8 = D & ~7;
    int r = 0;
    for (; r < nmax; r += 4) {
        __m256 a[3][4];
        size_t rows[4];
        for (int u = 0; u < 4; u++) {
            rows[u] = (size_t)(r + u < nmax ? r + u : nmax - 1) * ld;
#pragma GCC unroll 3
            for (int g = 0; g < QG; g++)
                a[g][u] = _mm256_setzero_ps();
        }
        for (int d = 0; d < D8; d += 8) {
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                __m256 kv = ld8(E, kb, rows[u] + (size_t)d);
#pragma GCC unroll 3
                for (int g = 0; g < QG; g++)
                    a[g][u] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q[g] + d), a[g][u]);
            }
        }
#pragma GCC unroll 3
        for (int g = 0; g < QG; g++) {
            __m128 sv = hsum4x8(a[g][0], a[g][1], a[g][2], a[g][3]);
            if (D8 < D) {
                float t4[4];
                for (int u = 0; u < 4; u++) {
                    t4[u] = 0.0f;
                    for (int d = D8; d < D; d++)
                        t4[u] += q[g][d] * ld1(E, kb, rows[u] + (size_t)d);
                }
                sv = _mm_add_ps(sv, _mm_loadu_ps(t4));
            }
            if (bias)
                sv = _mm_sub_ps(sv, _mm_set1_ps(bias[g]));
            store4(s[g], r, nv[g], _mm_mul_ps(sv, _mm_set1_ps(scale)));
        }
    }
    pad_scores(QG, s, r, nmax);
}

/* o[g][d0 .. d0 + 8*NV) += sum_{r < n} p[g][r] * V[r][d0 ..), one loaded
 * value vector serving the QG queries. */
AI void g_oaccum(const int E, const int QG, const int NV, float *const *o,
                 const float *const *p, const void *vb, size_t ld, int n, int d0)
{
    __m256 a[3][8];
#pragma GCC unroll 3
    for (int g = 0; g < QG; g++)
#pragma GCC unroll 8
        for (int c = 0; c < NV; c++)
            a[g][c] = _mm256_loadu_ps(o[g] + d0 + 8 * c);
    for (int r = 0; r < n; r++) {
        __m256 w[3];
#pragma GCC unroll 3
        for (int g = 0; g < QG; g++)
            w[g] = _mm256_broadcast_ss(p[g] + r);
        size_t vr = (size_t)r * ld + (size_t)d0;
#pragma GCC unroll 8
        for (int c = 0; c < NV; c++) {
            __m256 vv = ld8(E, vb, vr + 8 * (size_t)c);
#pragma GCC unroll 3
            for (int g = 0; g < QG; g++)
                a[g][c] = _mm256_fmadd_ps(w[g], vv, a[g][c]);
        }
    }
#pragma GCC unroll 3
    for (int g = 0; g < QG; g++)
#pragma GCC unroll 8
        for (int c = 0; c < NV; c++)
            _mm256_storeu_ps(o[g] + d0 + 8 * c, a[g][c]);
}

/* Weighted V sum of a query group over dims [d0, D) (d0 % 8 == 0): wide
 * passes, then single vectors, then the scalar tail. */
AI void g_oaccum_all(const int E, const int QG, float *const *o, const float *const *p,
                     const void *vb, size_t ld, int n, int d0, int D)
{
    /* code types keep their unpacking constants in registers too: fewer
     * accumulators, or the 16 ymm registers spill */
    const int D8 = D & ~7, NV = QG == 1 ? 8 : E >= E_C2 ? 2 : 4;
    for (; d0 + 8 * NV <= D8; d0 += 8 * NV)
        g_oaccum(E, QG, NV, o, p, vb, ld, n, d0);
    for (; d0 < D8; d0 += 8)
        g_oaccum(E, QG, 1, o, p, vb, ld, n, d0);
    for (int g = 0; g < QG; g++)
        for (int d = D8; d < D; d++)
            for (int r = 0; r < n; r++)
                o[g][d] += p[g][r] * ld1(E, vb, (size_t)r * ld + (size_t)d);
}

/* Online softmax step of one query over a tile: s [round8(n)] scores (-inf
 * where masked) become exp(s - new max); the running max m, sum l and the
 * output o [D] are rescaled to the new max. */
AI void softmax_tile(float *s, int n, float *m, float *l, float *o, int D)
{
    const int n8 = (n + 7) & ~7, D8 = D & ~7;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int r = 0; r < n8; r += 8)
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + r));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mn = fmaxf(*m, _mm_cvtss_f32(h)), alpha = expf(*m - mn);
    __m256 vmn = _mm256_set1_ps(mn), vsum = _mm256_setzero_ps();
    for (int r = 0; r < n8; r += 8) {
        __m256 pv = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + r), vmn));
        _mm256_storeu_ps(s + r, pv);
        vsum = _mm256_add_ps(vsum, pv);
    }
    *l = *l * alpha + hsum8(vsum);
    *m = mn;
    if (alpha != 1.0f) {
        __m256 va = _mm256_set1_ps(alpha);
        int d = 0;
        for (; d < D8; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), va));
        for (; d < D; d++)
            o[d] *= alpha;
    }
}

/* Final step of an item: partial (m, l) out, or o normalized (zeros for a
 * query that saw nothing). */
static void finish(int nq, float *const *o, const float *m, const float *l, float *ml, int D)
{
    for (int i = 0; i < nq; i++) {
        if (ml) {
            ml[2 * i] = m[i];
            ml[2 * i + 1] = l[i];
            continue;
        }
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        __m256 vinv = _mm256_set1_ps(inv);
        int d = 0;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(o[i] + d, _mm256_mul_ps(_mm256_loadu_ps(o[i] + d), vinv));
        for (; d < D; d++)
            o[i][d] *= inv;
    }
}

/* One tile of QG queries (item queries g0 ..) over float rows: scores,
 * softmax step, V sum. kb / vb: the tile's first row; rows [lo[g], nv[g])
 * visible to query g (lo NULL: from row 0). */
AI void float_tile(const int E, const int QG, float *sc, const float *const *q,
                   float *const *o, float *m, float *l, const int *nv, const int *lo,
                   int nmax, const void *kb, const void *vb, size_t ld, int D, float scale)
{
    float *s[3];
    const float *pc[3];
    for (int g = 0; g < QG; g++) {
        s[g] = sc + (size_t)g * KCPU_ATTN_KPMAX;
        pc[g] = s[g];
    }
    g_scores(E, QG, s, q, NULL, nv, nmax, kb, ld, D, scale);
    mask_low(QG, s, lo);
    for (int g = 0; g < QG; g++) {
        if (none_visible(nv, lo, g))
            memset(s[g], 0, (size_t)((nmax + 7) & ~7) * sizeof(float));
        else
            softmax_tile(s[g], nmax, &m[g], &l[g], o[g], D);
    }
    g_oaccum_all(E, QG, o, pc, vb, ld, nmax, 0, D);
}

/* See kcpu_attn_item. Positions are processed in tiles of KP; the queries
 * of the item in groups of up to 3, each group reading the f16 cache
 * directly so that one converted K or V vector serves the whole group (the
 * f16 -> f32 conversion, not FMA, bounds this kernel; converting a tile to
 * f32 once for all queries measured no faster, because of the extra store
 * traffic). Later groups find the tile's K/V rows in L1. */
void kcpu_avx2_attn_item(const kcpu_attn_item *it, float *sc)
{
    const int D = it->head_dim, nq = it->nq, KP = kcpu_attn_kp(D);
    float m[KCPU_ATTN_QMAX], l[KCPU_ATTN_QMAX];
    int pend = it->p0;
    for (int i = 0; i < nq; i++) {
        int e = it->n_pos[i] < it->p1 ? it->n_pos[i] : it->p1;
        pend = e > pend ? e : pend;
        m[i] = -INFINITY;
        l[i] = 0.0f;
        memset(it->o[i], 0, (size_t)D * sizeof(float));
    }
    for (int p0 = it->p0; p0 < pend; p0 += KP) {
        int np = pend - p0 < KP ? pend - p0 : KP;
        const uint16_t *kb = it->k + (size_t)p0 * it->kv_stride;
        const uint16_t *vb = it->v + (size_t)p0 * it->kv_stride;
        for (int g0 = 0; g0 < nq; g0 += 3) {
            int qg = nq - g0 < 3 ? nq - g0 : 3, nv[3], nmax = 0;
            for (int g = 0; g < qg; g++) {
                int i = g0 + g, e = it->n_pos[i] < it->p1 ? it->n_pos[i] : it->p1;
                nv[g] = (e < p0 + np ? e : p0 + np) - p0;
                nmax = nv[g] > nmax ? nv[g] : nmax;
            }
            if (nmax <= 0)
                continue;
            float *sc_g = sc + (size_t)g0 * KCPU_ATTN_KPMAX;
            switch (qg) {
            case 1: float_tile(E_F16, 1, sc_g, it->q + g0, it->o + g0, m + g0, l + g0, nv, NULL, nmax, kb, vb, it->kv_stride, D, it->scale); break;
            case 2: float_tile(E_F16, 2, sc_g, it->q + g0, it->o + g0, m + g0, l + g0, nv, NULL, nmax, kb, vb, it->kv_stride, D, it->scale); break;
            default: float_tile(E_F16, 3, sc_g, it->q + g0, it->o + g0, m + g0, l + g0, nv, NULL, nmax, kb, vb, it->kv_stride, D, it->scale); break;
            }
        }
    }
    finish(nq, it->o, m, l, it->ml, D);
}

/* Zeros i .. i + 7 (i % 8 == 0) of a zero array of zb (4 or 8) bits per
 * entry as f32 (the 4-bit ones are a 4-bit code stream). */
AI __m256 zeros8(const uint8_t *z, size_t i, int zb)
{
    return _mm256_cvtepi32_ps(zb == 4 ? codes8(z, i, 4) : codes8(z, i, 8));
}

/* ---- INT4 blocks ---- */

/* A block seen from one KV head, plus the per-query prepared keys. */
/* An INT4 block as one KV head of the item sees it. */
typedef struct {
    const uint8_t *kq, *vq; /* 4-bit codes of token 0, first channel of the head */
    const uint8_t *kq0, *vq0; /* the block's code streams (any width) */
    const uint16_t *ks, *vs; /* the block's scale snapshots (all channels) */
    const uint8_t *kz, *vz; /* zeros: kzb / vzb bits each (kvq_zero_at) */
    int kzb, vzb;
    int kbits, vbits; /* code widths of K and V */
    size_t rowb;     /* bytes between tokens (D / 2) */
    int Dk, G, ng;   /* block's kv_dim, v_group, groups per token */
    uint64_t gmagic; /* c / G = (c * gmagic) >> 40 for c < 2^24 */
    int c0;          /* first channel of the head */
    int per_token;   /* K scales per (token, group) */
    int nch;         /* 64-channel chunks of the head */
    int tail;        /* valid 32-bit words of the last chunk (8 when whole) */
    /* this head's outliers in the range being processed: exact values
     * until q4_fix_k / q4_fix_v make them deltas */
    kcpu_kvq_out *kout, *vout;
    int n_kout, n_vout;
} q4_blk;

/* The item's queries prepared for the current block, in even / odd order
 * (see eo_ix): qf = q * scale (* the block's K scale per channel), and
 * bias = sum qf * z (per-channel K; 0 per token). */
typedef struct {
    const float *qf[KCPU_ATTN_QMAX];
    float bias[KCPU_ATTN_QMAX];
} q4_keys;

/* Position of channel c (D % 16 == 0) in the even / odd order in which
 * 16-channel units of codes unpack: unit c / 16, then its even channels,
 * then its odd ones. */
static inline int eo_ix(int c)
{
    return (c & ~15) + (c & 1) * 8 + ((c & 15) >> 1);
}

/* Even (eo_even) and odd (eo_odd) elements of 16 consecutive floats n0, n1. */
AI __m256 eo_even(__m256 n0, __m256 n1)
{
    __m256 e = _mm256_shuffle_ps(n0, n1, 0x88);
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xd8));
}

AI __m256 eo_odd(__m256 n0, __m256 n1)
{
    __m256 o = _mm256_shuffle_ps(n0, n1, 0xdd);
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xd8));
}

/* Loads 32 bytes of codes, or the first `tail` 32-bit words (rest zero). */
AI __m256i ld_codes(const uint8_t *p, int tail)
{
    if (tail == 8)
        return _mm256_loadu_si256((const __m256i *)p);
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_epi32((const int *)p, mask);
}

/* Code vector m (16-bit lane i = channel 4i + m) of 32 bytes of codes. */
AI __m256i code_m(__m256i x, int m)
{
    const __m256i m4 = _mm256_set1_epi16(0x000f);
    switch (m) {
    case 0: return _mm256_and_si256(x, m4);
    case 1: return _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    case 2: return _mm256_and_si256(_mm256_srli_epi16(x, 8), m4);
    default: return _mm256_srli_epi16(x, 12);
    }
}

/* K scores of QG queries over the tile's rows (krow: first row), 4 rows
 * per step: per 16-channel unit, the 8 code bytes unpack to even channels
 * (low nibbles) and odd ones (high) as f32 and meet the prepared keys in
 * the same order: s = sum qf * code - bias. Per-token K (PT) dequantizes the
 * codes first with the row's group scale: kls[(r * units + k) * 2] = s,
 * -s*z of unit k's group. */
AI void q4_scores(const int QG, const int PT, float *const *s, const q4_blk *B,
                  const q4_keys *K, const int *gi, const int *nv, int nmax,
                  const uint8_t *krow, const float *kls, int D)
{
    const __m256i m4 = _mm256_set1_epi32(15);
    const int units = D / 16;
    const float *qf[3];
    for (int g = 0; g < QG; g++)
        qf[g] = K->qf[gi[g]];
    int r = 0;
    for (; r < nmax; r += 4) {
        __m256 a[3][4];
        const uint8_t *rows[4];
        const float *ls[4];
        for (int u = 0; u < 4; u++) {
            int rr = r + u < nmax ? r + u : nmax - 1;
            rows[u] = krow + (size_t)rr * B->rowb;
            ls[u] = kls + (size_t)rr * (size_t)units * 2;
#pragma GCC unroll 3
            for (int g = 0; g < QG; g++)
                a[g][u] = _mm256_setzero_ps();
        }
        for (int k = 0; k < units; k++) {
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(rows[u] + 8 * k)));
                __m256 e = _mm256_cvtepi32_ps(_mm256_and_si256(x, m4));
                __m256 od = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 4));
                if (PT) {
                    __m256 sv = _mm256_broadcast_ss(ls[u] + 2 * k), nz = _mm256_broadcast_ss(ls[u] + 2 * k + 1);
                    e = _mm256_fmadd_ps(e, sv, nz);
                    od = _mm256_fmadd_ps(od, sv, nz);
                }
#pragma GCC unroll 3
                for (int g = 0; g < QG; g++) {
                    a[g][u] = _mm256_fmadd_ps(e, _mm256_loadu_ps(qf[g] + 16 * k), a[g][u]);
                    a[g][u] = _mm256_fmadd_ps(od, _mm256_loadu_ps(qf[g] + 16 * k + 8), a[g][u]);
                }
            }
        }
#pragma GCC unroll 3
        for (int g = 0; g < QG; g++)
            store4(s[g], r, nv[g], _mm_sub_ps(hsum4x8(a[g][0], a[g][1], a[g][2], a[g][3]),
                                              _mm_set1_ps(K->bias[gi[g]])));
    }
    pad_scores(QG, s, r, nmax);
}

/* One code vector m of a chunk for QG queries over the tile's rows, two
 * tokens per step: the codes of tokens r and r+1 interleave per channel,
 * and pmaddwd against the pair (w16[r], w16[r+1]) sums both. 16-bit lane i
 * of code vector m is channel 4i + m; after the interleave, 32-bit lanes
 * j of the low half (unpacklo) hold i = j, 8 + j - 4 and of the high half
 * i = 4 + j, 12 + j - 4 (per 128-bit lane), so the low / high vectors cover
 * channels 0-15 | 32-47 and 16-31 | 48-63: one group each side when
 * G % 16 == 0. GL: the chunk is one group (one weight pair for all).
 * acc[g][0..1] (low, high) get the sums; w16[g][k]: weights of the group of
 * channels 16k.. of the chunk. */
AI void vacc_m(const int QG, const int GL, const int FULL, __m256i acc[3][2],
               const int16_t *w16[3][4], const uint8_t *row0, size_t rowb, int n, int tail,
               const int m)
{
#pragma GCC unroll 3
    for (int g = 0; g < QG; g++)
        acc[g][0] = acc[g][1] = _mm256_setzero_si256();
    for (int r = 0; r < n; r += 2) {
        const uint8_t *p0 = row0 + (size_t)r * rowb, *p1 = r + 1 < n ? p0 + rowb : p0;
        __m256i a = code_m(ld_codes(p0, FULL ? 8 : tail), m);
        __m256i b = code_m(ld_codes(p1, FULL ? 8 : tail), m);
        __m256i plo = _mm256_unpacklo_epi16(a, b), phi = _mm256_unpackhi_epi16(a, b);
#pragma GCC unroll 3
        for (int g = 0; g < QG; g++) {
            __m256i wlo, whi;
            if (GL) {
                int32_t w;
                memcpy(&w, w16[g][0] + r, 4);
                wlo = whi = _mm256_set1_epi32(w);
            } else {
                int32_t w0, w1, w2, w3;
                memcpy(&w0, w16[g][0] + r, 4);
                memcpy(&w1, w16[g][1] + r, 4);
                memcpy(&w2, w16[g][2] + r, 4);
                memcpy(&w3, w16[g][3] + r, 4);
                wlo = _mm256_setr_m128i(_mm_set1_epi32(w0), _mm_set1_epi32(w2));
                whi = _mm256_setr_m128i(_mm_set1_epi32(w1), _mm_set1_epi32(w3));
            }
            acc[g][0] = _mm256_add_epi32(acc[g][0], _mm256_madd_epi16(plo, wlo));
            acc[g][1] = _mm256_add_epi32(acc[g][1], _mm256_madd_epi16(phi, whi));
        }
    }
}

/* o[g] += wq[g] * sum_r w16 * code[r] over the tile's rows (vrow: first
 * row) for every chunk of the head; W16 [QG][ngh][n8] int16 weights
 * (p * s rounded against wq = their max / 32767). Integer sums per tile
 * (at most n8 * 32767 * 15 < 2^31), then scaled into the f32 outputs. */
AI void q4_vacc(const int QG, const int GL, float *const *o, const int16_t *W16, int n8,
                int ngh, const float *wq, const q4_blk *B, const uint8_t *vrow, int n, int D)
{
    float pbuf[3][64];
    for (int ch = 0; ch < B->nch; ch++) {
        int tail = ch == B->nch - 1 ? B->tail : 8;
        const int16_t *w16[3][4];
        for (int g = 0; g < QG; g++)
            for (int k = 0; k < 4; k++) {
                int grp = (ch * 64 + 16 * k) / B->G;
                grp = grp < ngh ? grp : ngh - 1;
                w16[g][k] = W16 + (size_t)(g * ngh + grp) * (size_t)n8;
            }
        /* the code vectors one by one (m a constant in each copy, the
         * chunk's tail known) */
#define VACC_M(m_)                                                                          \
        do {                                                                                \
            __m256i acc[3][2];                                                              \
            if (tail == 8)                                                                  \
                vacc_m(QG, GL, 1, acc, w16, vrow + 32 * ch, B->rowb, n, 8, m_);             \
            else                                                                            \
                vacc_m(QG, GL, 0, acc, w16, vrow + 32 * ch, B->rowb, n, tail, m_);          \
            for (int g = 0; g < QG; g++)                                                    \
                for (int h = 0; h < 2; h++)                                                 \
                    _mm256_storeu_ps(pbuf[g] + ((m_) * 2 + h) * 8,                          \
                                     _mm256_mul_ps(_mm256_cvtepi32_ps(acc[g][h]),           \
                                                   _mm256_set1_ps(wq[g])));                 \
        } while (0)
        VACC_M(0);
        VACC_M(1);
        VACC_M(2);
        VACC_M(3);
#undef VACC_M
        /* entries (m, h, 4 hf + jj) hold channel 16 (2 hf + h) + 4 jj + m:
         * a 4x4 transpose per 128-bit half makes them contiguous */
        int nc = D - ch * 64 < 64 ? D - ch * 64 : 64;
        for (int g = 0; g < QG; g++) {
            float *og = o[g] + ch * 64;
            for (int h = 0; h < 2; h++) {
                __m256 r0 = _mm256_loadu_ps(pbuf[g] + (0 + h) * 8), r1 = _mm256_loadu_ps(pbuf[g] + (2 + h) * 8);
                __m256 r2 = _mm256_loadu_ps(pbuf[g] + (4 + h) * 8), r3 = _mm256_loadu_ps(pbuf[g] + (6 + h) * 8);
                __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
                __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
                __m256 c0 = _mm256_shuffle_ps(t0, t2, 0x44), c1 = _mm256_shuffle_ps(t0, t2, 0xee);
                __m256 c2 = _mm256_shuffle_ps(t1, t3, 0x44), c3 = _mm256_shuffle_ps(t1, t3, 0xee);
                float *d0 = og + 16 * h, *d1 = og + 32 + 16 * h;
                if (16 * h < nc) {
                    _mm256_storeu_ps(d0, _mm256_add_ps(_mm256_loadu_ps(d0), _mm256_permute2f128_ps(c0, c1, 0x20)));
                    _mm256_storeu_ps(d0 + 8, _mm256_add_ps(_mm256_loadu_ps(d0 + 8), _mm256_permute2f128_ps(c2, c3, 0x20)));
                }
                if (32 + 16 * h < nc) {
                    _mm256_storeu_ps(d1, _mm256_add_ps(_mm256_loadu_ps(d1), _mm256_permute2f128_ps(c0, c1, 0x31)));
                    _mm256_storeu_ps(d1 + 8, _mm256_add_ps(_mm256_loadu_ps(d1 + 8), _mm256_permute2f128_ps(c2, c3, 0x31)));
                }
            }
        }
    }
}

/* Code of element (t, c) (c within the head) of a code stream of block B
 * (q: kq0 or vq0, any width). */
static inline int q4_code(const q4_blk *B, const uint8_t *q, int bits, int t, int c)
{
    return kvq_get_code(q, (size_t)t * (size_t)B->Dk + (size_t)(B->c0 + c), bits);
}

/* Turns the exact values of the head's K outliers of tokens [p0, p1) into
 * scale * (exact - s * (code - z)), the correction to their scores. Done
 * once per tile and head, when the tile's rows are in L1 (reading the codes
 * while the lists are gathered would miss the cache for each). */
static void q4_fix_k(const q4_blk *B, int p0, int p1, float scale)
{
    for (int e = 0; e < B->n_kout; e++) {
        kcpu_kvq_out *o = &B->kout[e];
        if (o->t < p0 || o->t >= p1)
            continue;
        uint64_t cc = (uint64_t)(B->c0 + o->c);
        size_t si = B->per_token ? (size_t)o->t * (size_t)B->ng + (size_t)((cc * B->gmagic) >> 40)
                                 : (size_t)cc;
        float deq = f16(B->ks[si]) *
                    (float)(q4_code(B, B->kq0, B->kbits, o->t, o->c) - kvq_zero_at(B->kz, si, B->kzb));
        o->delta = (o->delta - deq) * scale;
    }
}

/* Same for V outliers: exact - s * (code - z), s and z from the tile's
 * constants vsc / vzf [group][KPMAX]. */
static void q4_fix_v(const q4_blk *B, int p0, int p1, const float *vsc, const float *vzf)
{
    for (int e = 0; e < B->n_vout; e++) {
        kcpu_kvq_out *o = &B->vout[e];
        if (o->t < p0 || o->t >= p1)
            continue;
        size_t gi = (size_t)((((uint64_t)o->c) * B->gmagic) >> 40) * KCPU_ATTN_KPMAX +
                    (size_t)(o->t - p0);
        o->delta -= vsc[gi] * ((float)q4_code(B, B->vq0, B->vbits, o->t, o->c) - vzf[gi]);
    }
}

/* K outliers of the tile's rows [p0, p0 + nmax) (deltas, q4_fix_k): s[g][r]
 * += q_c * scale * delta (masked scores stay -inf). */
static void add_k_deltas(int QG, float *const *s, const float *const *q, const q4_blk *B,
                         int p0, int nmax)
{
    for (int e = 0; e < B->n_kout; e++) {
        unsigned r = (unsigned)(B->kout[e].t - p0);
        if (r >= (unsigned)nmax)
            continue;
        for (int g = 0; g < QG; g++)
            s[g][r] += q[g][B->kout[e].c] * B->kout[e].delta;
    }
}

/* V outliers of the tile's rows (deltas, q4_fix_v): o[g][c] += p[g][r] * delta. */
static void add_v_deltas(int QG, float *const *o, float *const *p, const q4_blk *B, int p0,
                         int nmax)
{
    for (int e = 0; e < B->n_vout; e++) {
        unsigned r = (unsigned)(B->vout[e].t - p0);
        if (r >= (unsigned)nmax)
            continue;
        for (int g = 0; g < QG; g++)
            o[g][B->vout[e].c] += p[g][r] * B->vout[e].delta;
    }
}

/* One tile of QG queries (item indices gi, one KV head) over an INT4 block:
 * rows [p0, p0 + nmax) of the block (np rows in the tile), tile rows
 * [lo[g], nv[g]) visible to query g; fixed: this
 * head's outlier deltas done for the tile (bit 0 K, bit 1 V); vsc / vzf:
 * the rows' V group scales and zeros, [group][KPMAX]; W: room for
 * [QG][ngh][round8(nmax)] f32 weights and as many int16. */
AI void q4_tile(const int QG, float *sc, const q4_blk *B, const q4_keys *K, const int *gi,
                const float *const *q, float *const *o, float *m, float *l,
                const int *nv, const int *lo, int nmax, int p0, int np, int *fixed, const float *kls,
                const float *vsc, const float *vzf, float *W, int ngh, int D, float scale)
{
    float *s[3];
    for (int g = 0; g < QG; g++)
        s[g] = sc + (size_t)g * KCPU_ATTN_KPMAX;
    const uint8_t *krow = B->kq + (size_t)p0 * B->rowb, *vrow = B->vq + (size_t)p0 * B->rowb;
    if (B->per_token)
        q4_scores(QG, 1, s, B, K, gi, nv, nmax, krow, kls, D);
    else
        q4_scores(QG, 0, s, B, K, gi, nv, nmax, krow, kls, D);
    if (!(*fixed & 1)) { /* the tile's K rows are in L1 now */
        q4_fix_k(B, p0, p0 + np, scale);
        *fixed |= 1;
    }
    add_k_deltas(QG, s, q, B, p0, nmax);
    mask_low(QG, s, lo);
    const int n8 = (nmax + 7) & ~7;
    float wq[3];
    int16_t *W16 = (int16_t *)(W + (size_t)QG * (size_t)ngh * (size_t)n8);
    for (int g = 0; g < QG; g++) {
        if (none_visible(nv, lo, g))
            memset(s[g], 0, (size_t)n8 * sizeof(float));
        else
            softmax_tile(s[g], nmax, &m[g], &l[g], o[g], D);
        /* weights w = p * s per group, rounded to int16 against their max
         * (w >= 0); the zeros' share -wq * sum w16 * z goes to every
         * channel of the group, computed from the rounded weights so that
         * the tile adds exactly wq * sum w16 * (code - z) */
        __m256 wmax = _mm256_setzero_ps();
        for (int grp = 0; grp < ngh; grp++) {
            float *w = W + (size_t)(g * ngh + grp) * (size_t)n8;
            const float *sv = vsc + (size_t)grp * KCPU_ATTN_KPMAX;
            for (int r = 0; r < n8; r += 8) {
                __m256 wv = _mm256_mul_ps(_mm256_loadu_ps(s[g] + r), _mm256_loadu_ps(sv + r));
                _mm256_storeu_ps(w + r, wv);
                wmax = _mm256_max_ps(wmax, wv);
            }
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(wmax), _mm256_extractf128_ps(wmax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float mx = _mm_cvtss_f32(h);
        wq[g] = mx / 32767.0f;
        __m256 inv = _mm256_set1_ps(mx > 0.0f ? 32767.0f / mx : 0.0f);
        for (int grp = 0; grp < ngh; grp++) {
            const float *w = W + (size_t)(g * ngh + grp) * (size_t)n8;
            const float *zv = vzf + (size_t)grp * KCPU_ATTN_KPMAX;
            int16_t *w16 = W16 + (size_t)(g * ngh + grp) * (size_t)n8;
            __m256 zb = _mm256_setzero_ps();
            for (int r = 0; r < n8; r += 8) {
                __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(w + r), inv));
                _mm_storeu_si128((__m128i *)(w16 + r),
                                 _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
                zb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_loadu_ps(zv + r), zb);
            }
            __m256 bias = _mm256_set1_ps(-wq[g] * hsum8(zb));
            float *og = o[g] + grp * B->G;
            for (int c = 0; c < B->G; c += 8)
                _mm256_storeu_ps(og + c, _mm256_add_ps(_mm256_loadu_ps(og + c), bias));
        }
    }
    if (B->G % 64 == 0 || ngh == 1)
        q4_vacc(QG, 1, o, W16, n8, ngh, wq, B, vrow, nmax, D);
    else
        q4_vacc(QG, 0, o, W16, n8, ngh, wq, B, vrow, nmax, D);
    if (!(*fixed & 2)) {
        q4_fix_v(B, p0, p0 + np, vsc, vzf);
        *fixed |= 2;
    }
    add_v_deltas(QG, o, s, B, p0, nmax);
}

/* 1 when the fused decode path reads nibbles (4-bit K and V: channels in
 * even / odd order, eo_ix), 0 when it reads any width with codes8
 * (natural order). */
static inline int q4_eo(const kvq_layout *L)
{
    return L->k_bits == 4 && L->v_bits == 4;
}

/* 16 consecutive floats n0, n1 stored at p in the order of the fused path:
 * even / odd (eo) or natural. */
AI void st_order(float *p, __m256 n0, __m256 n1, int eo)
{
    _mm256_storeu_ps(p, eo ? eo_even(n0, n1) : n0);
    _mm256_storeu_ps(p + 8, eo ? eo_odd(n0, n1) : n1);
}

/* The item's queries times scale in the fused path's channel order
 * (q4_eo; once per item, before its first quantized block): D floats at
 * the start of each query's qk area. */
static void q4_queries(const kcpu_attn_seg_item *it, float *qk, size_t qk_stride)
{
    const int D = it->head_dim, eo = q4_eo(it->L);
    const __m256 sc = _mm256_set1_ps(it->scale);
    for (int i = 0; i < it->nq; i++) {
        float *qp = qk + (size_t)i * qk_stride;
        for (int u = 0; u < D; u += 16)
            st_order(qp + u, _mm256_mul_ps(_mm256_loadu_ps(it->q[i] + u), sc),
                     _mm256_mul_ps(_mm256_loadu_ps(it->q[i] + u + 8), sc), eo);
    }
}

/* The keys of every query of the item's heads hmin .. hmin + nh - 1
 * prepared for block c's per-channel K scales (see q4_keys); qk: the
 * queries from q4_queries; blk: room for one head's reordered K scales and
 * zeros. */
static void q4_keys_prepare(q4_keys *K, const q4_blk *cb, const kcpu_attn_seg_item *it,
                            int hmin, int nh, float *qk, size_t qk_stride, float *blk)
{
    const q4_blk c = *cb;
    const int D = it->head_dim, eo = q4_eo(it->L);
    /* per channel, q * scale * s with the head's scales in the order of
     * q4_queries, and the bias from its zeros */
    float *sp = blk, *zf = blk + D;
    int i = 0;
    for (int hi = 0; hi < nh; hi++) {
        int c0 = (hmin + hi) * D;
        if (!c.per_token)
            for (int u = 0; u < D; u += 16) {
                st_order(sp + u, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c.ks + c0 + u))),
                         _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c.ks + c0 + u + 8))), eo);
                st_order(zf + u, zeros8(c.kz, (size_t)(c0 + u), c.kzb),
                         zeros8(c.kz, (size_t)(c0 + u + 8), c.kzb), eo);
            }
        for (; i < it->nq && it->kvh[i] == hmin + hi; i++) {
            float *qp = qk + (size_t)i * qk_stride;
            if (c.per_token) {
                K->qf[i] = qp;
                K->bias[i] = 0.0f;
                continue;
            }
            float *qf = qp + D;
            __m256 bias = _mm256_setzero_ps();
            for (int j = 0; j < D; j += 8) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(qp + j), _mm256_loadu_ps(sp + j));
                _mm256_storeu_ps(qf + j, v);
                bias = _mm256_fmadd_ps(v, _mm256_loadu_ps(zf + j), bias);
            }
            K->qf[i] = qf;
            K->bias[i] = hsum8(bias);
        }
    }
}

/* Index e of an outlier index list of 16-bit (i16) or 32-bit entries. */
static inline uint32_t oidx_at(const char *idx, int i16, uint32_t e)
{
    uint16_t h;
    uint32_t w;
    if (i16) {
        memcpy(&h, idx + 2 * (size_t)e, sizeof h);
        return h;
    }
    memcpy(&w, idx + 4 * (size_t)e, sizeof w);
    return w;
}

/* Sets up block sg for the item's KV heads hmin .. hmin + nh - 1: B[h] its
 * view from each head, K (unless NULL: the tile path prepares its own) the
 * keys of every query prepared for its K scales (qk: the queries from
 * q4_queries; blk: room for one head's reordered K scales and zeros), and
 * each head's outliers among tokens [a, b), with their exact values (outs:
 * room for 2 * (QMAX * out_cap + 1) entries; both lists are bucketed by
 * head in one branch-free pass, or with one head picked 8 at a time). */
static void q4_prepare(q4_blk *B, q4_keys *K, const kvs_seg *sg, const kcpu_attn_seg_item *it,
                       int hmin, int nh, int a, int b, float *qk, size_t qk_stride,
                       float *blk, kcpu_kvq_out *outs)
{
    const kvq_layout *L = it->L;
    const void *base = sg->k;
    const int D = it->head_dim, hd64 = (D + 63) / 64 * 64;
    q4_blk c = {
        .kq = KVQ_CAT(base, L->off_kq, uint8_t *), .vq = KVQ_CAT(base, L->off_vq, uint8_t *),
        .kq0 = KVQ_CAT(base, L->off_kq, uint8_t *), .vq0 = KVQ_CAT(base, L->off_vq, uint8_t *),
        .ks = KVQ_CAT(base, L->off_ks, uint16_t *), .vs = KVQ_CAT(base, L->off_vs, uint16_t *),
        .kz = KVQ_CAT(base, L->off_kz, uint8_t *), .vz = KVQ_CAT(base, L->off_vz, uint8_t *),
        .kzb = L->k_zbits, .vzb = L->v_zbits, .kbits = L->k_bits, .vbits = L->v_bits,
        .rowb = (size_t)L->kv_dim / 2, .Dk = L->kv_dim, .G = L->v_group,
        .ng = L->kv_dim / L->v_group,
        .gmagic = ((uint64_t)1 << 40) / (uint64_t)L->v_group + 1,
        .per_token = L->k_mode == KVQ_K_PER_TOKEN, .nch = hd64 / 64,
        .tail = D % 64 ? D % 64 / 8 : 8,
    };
    for (int hi = 0; hi < nh; hi++) {
        B[hi] = c;
        B[hi].c0 = (hmin + hi) * D;
        B[hi].kq += B[hi].c0 / 2;
        B[hi].vq += B[hi].c0 / 2;
    }
    if (K)
        q4_keys_prepare(K, &c, it, hmin, nh, qk, qk_stride, blk);
    /* outliers: t = idx / Dk and head = channel / D by multiplies (exact
     * while idx * Dk < 2^40); entries outside [a, b) or the item's heads go
     * to a dummy slot */
    const kvq_block_hdr *hdr = kvq_chdr(base);
    const uint64_t tmagic = ((uint64_t)1 << 40) / (uint64_t)c.Dk + 1;
    const uint64_t hmagic = ((uint64_t)1 << 40) / (uint64_t)D + 1;
    for (int x = 0; x < 2; x++) {
        const char *idx = KVQ_CAT(base, x ? L->off_vout_idx : L->off_kout_idx, char *);
        const int i16 = L->idx_bytes == 2;
        const uint16_t *val = KVQ_CAT(base, x ? L->off_vout_val : L->off_kout_val, uint16_t *);
        uint32_t n = x ? hdr->n_vout : hdr->n_kout;
        n = n < (uint32_t)L->out_cap ? n : (uint32_t)L->out_cap;
        /* per head out_cap slots, then one dummy slot for the rest */
        const int cap = L->out_cap, dummy = KCPU_ATTN_QMAX * cap;
        kcpu_kvq_out *dst = outs + (size_t)x * (size_t)(dummy + 1);
        int cnt[KCPU_ATTN_QMAX] = { 0 };
        if (nh == 1) { /* one head (prefill items): one counter, in a register */
            int k = 0, c0 = hmin * D;
            uint32_t e = 0;
            if ((int64_t)L->block_tokens * c.Dk <= (1 << 22)) {
                /* 8 at a time: t = floor((idx + 1/2) / Dk) in f32 is exact
                 * while T * Dk <= 2^22 (the rounding error, below
                 * T * 2^-23, stays under the distance 1 / (2 Dk) to the
                 * next integer); the kept entries are copied one by one */
                const __m256 inv = _mm256_set1_ps(1.0f / (float)c.Dk), half = _mm256_set1_ps(0.5f);
                const __m256i vdk = _mm256_set1_epi32(c.Dk), lo = _mm256_set1_epi32(a - 1);
                const __m256i hi = _mm256_set1_epi32(b), cl = _mm256_set1_epi32(c0 - 1);
                const __m256i ch_hi = _mm256_set1_epi32(c0 + D);
                for (; e + 8 <= n; e += 8) {
                    __m256i ix = i16 ? _mm256_cvtepu16_epi32(_mm_loadu_si128(
                                           (const __m128i *)(idx + 2 * (size_t)e)))
                                     : _mm256_loadu_si256((const __m256i *)(idx + 4 * (size_t)e));
                    __m256i t = _mm256_cvttps_epi32(
                        _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(ix), half), inv));
                    __m256i ch = _mm256_sub_epi32(ix, _mm256_mullo_epi32(t, vdk));
                    __m256i keep = _mm256_and_si256(
                        _mm256_and_si256(_mm256_cmpgt_epi32(t, lo), _mm256_cmpgt_epi32(hi, t)),
                        _mm256_and_si256(_mm256_cmpgt_epi32(ch, cl), _mm256_cmpgt_epi32(ch_hi, ch)));
                    unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(keep));
                    if (!mask)
                        continue;
                    int t8[8], c8[8];
                    _mm256_storeu_si256((__m256i *)t8, t);
                    _mm256_storeu_si256((__m256i *)c8, ch);
                    for (; mask; mask &= mask - 1) {
                        int j = __builtin_ctz(mask);
                        dst[k].t = t8[j];
                        dst[k].c = c8[j] - c0;
                        dst[k].delta = f16(val[e + (uint32_t)j]);
                        k++;
                    }
                }
            }
            for (; e < n; e++) {
                uint32_t ie = oidx_at(idx, i16, e);
                uint32_t t = (uint32_t)(((uint64_t)ie * tmagic) >> 40);
                int ch = (int)(ie - t * (uint32_t)c.Dk) - c0;
                dst[k].t = (int)t;
                dst[k].c = ch;
                dst[k].delta = f16(val[e]);
                k += ((int)t >= a) & ((int)t < b) & ((unsigned)ch < (unsigned)D);
            }
            cnt[0] = k;
            n = 0;
        }
        for (uint32_t e = 0; e < n; e++) {
            uint32_t ie = oidx_at(idx, i16, e);
            uint32_t t = (uint32_t)(((uint64_t)ie * tmagic) >> 40);
            uint32_t ch = ie - t * (uint32_t)c.Dk;
            int h = (int)(((uint64_t)ch * hmagic) >> 40) - hmin;
            int keep = ((int)t >= a) & ((int)t < b) & (h >= 0) & (h < nh);
            int hb = h & -keep, slot = dummy + ((hb * cap + cnt[hb] - dummy) & -keep);
            dst[slot].t = (int)t;
            dst[slot].c = (int)ch - (hmin + hb) * D;
            dst[slot].delta = f16(val[e]);
            cnt[hb] += keep;
        }
        for (int hi = 0; hi < nh; hi++) {
            if (x) {
                B[hi].vout = dst + (size_t)hi * (size_t)L->out_cap;
                B[hi].n_vout = cnt[hi];
            } else {
                B[hi].kout = dst + (size_t)hi * (size_t)L->out_cap;
                B[hi].n_kout = cnt[hi];
            }
        }
    }
}

/* Per-row constants of a tile [p0, p0 + np) of block B: V group scales
 * vsc[grp][r] = s and zeros vzf[grp][r] = z ([ngh][KPMAX], zero-padded to
 * a multiple of 8 rows) and, for per-token K, the lane scales and zeros
 * (kls, 16 floats per row and chunk). */
static void q4_tile_consts(const q4_blk *B, int p0, int np, int D, float *vsc,
                           float *vzf, float *kls)
{
    int ngh = D / B->G, g0 = B->c0 / B->G, np8 = (np + 7) & ~7;
    size_t st = (size_t)B->ng;
    for (int grp = 0; grp < ngh; grp++) {
        const uint16_t *sp = B->vs + (size_t)p0 * st + (size_t)(g0 + grp);
        size_t zi = (size_t)p0 * st + (size_t)(g0 + grp); /* zero of row r: zi + r * st */
        float *so = vsc + (size_t)grp * KCPU_ATTN_KPMAX, *zo = vzf + (size_t)grp * KCPU_ATTN_KPMAX;
        int r = 0;
        for (; r + 8 <= np; r += 8, sp += 8 * st, zi += 8 * st) {
            __m128i h = _mm_setr_epi16((short)sp[0], (short)sp[st], (short)sp[2 * st], (short)sp[3 * st],
                                       (short)sp[4 * st], (short)sp[5 * st], (short)sp[6 * st],
                                       (short)sp[7 * st]);
            __m256i z8 = _mm256_setr_epi32(
                kvq_zero_at(B->vz, zi, B->vzb), kvq_zero_at(B->vz, zi + st, B->vzb),
                kvq_zero_at(B->vz, zi + 2 * st, B->vzb), kvq_zero_at(B->vz, zi + 3 * st, B->vzb),
                kvq_zero_at(B->vz, zi + 4 * st, B->vzb), kvq_zero_at(B->vz, zi + 5 * st, B->vzb),
                kvq_zero_at(B->vz, zi + 6 * st, B->vzb), kvq_zero_at(B->vz, zi + 7 * st, B->vzb));
            _mm256_storeu_ps(so + r, _mm256_cvtph_ps(h));
            _mm256_storeu_ps(zo + r, _mm256_cvtepi32_ps(z8));
        }
        for (; r < np; r++, sp += st, zi += st) {
            so[r] = f16(*sp);
            zo[r] = (float)kvq_zero_at(B->vz, zi, B->vzb);
        }
        for (; r < np8; r++)
            so[r] = zo[r] = 0.0f;
    }
    if (!B->per_token)
        return;
    const int units = D / 16;
    for (int r = 0; r < np; r++) {
        size_t row = (size_t)(p0 + r) * st;
        for (int k = 0; k < units; k++) {
            size_t si = row + (size_t)((B->c0 + 16 * k) / B->G);
            float sv = f16(B->ks[si]);
            kls[((size_t)r * (size_t)units + (size_t)k) * 2] = sv;
            kls[((size_t)r * (size_t)units + (size_t)k) * 2 + 1] =
                -sv * (float)kvq_zero_at(B->kz, si, B->kzb);
        }
    }
}

/* Rows [p0, p0 + np) of one tensor of block B's head (D % 16 == 0, G % 16
 * == 0) into out [np][D], x = fma(code, s, -s*z): per-channel snapshots
 * (s16 / z at the head's channels; sc / nz: room for D floats each, filled
 * once) or one per (token, group of G), broadcast over the group. */
AI void qx_rows_w(const int bits, const q4_blk *B, const uint8_t *q, const uint16_t *s16,
                  const uint8_t *z, int zb, int per_channel, int p0, int np, int D,
                  float *sc, float *nz, float *out)
{
    if (per_channel)
        for (int c = 0; c < D; c++) {
            float sv = f16(s16[B->c0 + c]);
            sc[c] = sv;
            nz[c] = -(sv * (float)kvq_zero_at(z, (size_t)(B->c0 + c), zb));
        }
    const int g0 = B->c0 / B->G;
    for (int r = 0; r < np; r++) {
        size_t e0 = (size_t)(p0 + r) * (size_t)B->Dk + (size_t)B->c0;
        float *o = out + (size_t)r * (size_t)D;
        if (per_channel) {
            for (int c = 0; c < D; c += 8) {
                __m256 f = _mm256_cvtepi32_ps(codes8(q, e0 + (size_t)c, bits));
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(f, _mm256_loadu_ps(sc + c),
                                                        _mm256_loadu_ps(nz + c)));
            }
            continue;
        }
        size_t gs = (size_t)(p0 + r) * (size_t)B->ng + (size_t)g0;
        for (int c0 = 0; c0 < D; c0 += B->G) {
            size_t si = gs + (size_t)(c0 / B->G);
            float sv = f16(s16[si]);
            __m256 s8 = _mm256_set1_ps(sv);
            __m256 n8 = _mm256_set1_ps(-(sv * (float)kvq_zero_at(z, si, zb)));
            for (int c = c0; c < c0 + B->G; c += 8) {
                __m256 f = _mm256_cvtepi32_ps(codes8(q, e0 + (size_t)c, bits));
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(f, s8, n8));
            }
        }
    }
}

static void qx_tensor(const q4_blk *B, const uint8_t *q, int bits, const uint16_t *s16,
                      const uint8_t *z, int zb, int per_channel, int p0, int np, int D, float *sc,
                      float *nz, float *out)
{
    switch (bits) {
    case 2: qx_rows_w(2, B, q, s16, z, zb, per_channel, p0, np, D, sc, nz, out); break;
    case 3: qx_rows_w(3, B, q, s16, z, zb, per_channel, p0, np, D, sc, nz, out); break;
    case 4: qx_rows_w(4, B, q, s16, z, zb, per_channel, p0, np, D, sc, nz, out); break;
    default: qx_rows_w(8, B, q, s16, z, zb, per_channel, p0, np, D, sc, nz, out); break;
    }
}

/* ---- INT4 blocks, many queries per KV head (prefill chunks) ----
 *
 * With a dozen queries per KV head, unpacking each code once per item beats
 * unpacking it once per query group: a tile's K codes are unpacked
 * transposed, kt[c][r] (channel-major, rows along the vector), so that
 * scores are plain outer-product FMAs (a query channel broadcast times 8
 * rows) with no horizontal sums; its V rows are dequantized in natural
 * order and summed like an F32 segment's. */

/* Per block and head: queries i0 .. i1 - 1 (one KV head) prepared for
 * scores against the block's K codes, qf [D] at qk + i * qk_stride and
 * bias[i]: per-channel K, qf = q * scale * s_c and bias = sum qf * z_c
 * (score = qf . code - bias); per-token K, qf = q * scale and bias 0 (the
 * tile's K is dequantized instead). sk: the head's K scales as f32 [D]
 * (per-channel K). */
static void q4d_keys(const q4_blk *B, const kcpu_attn_seg_item *it, int i0, int i1, float *qk,
                     size_t qk_stride, float *bias, float *sk)
{
    const int D = it->head_dim;
    const __m256 scale = _mm256_set1_ps(it->scale);
    if (!B->per_token)
        for (int c = 0; c < D; c += 8)
            _mm256_storeu_ps(sk + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(B->ks + B->c0 + c))));
    for (int i = i0; i < i1; i++) {
        float *qf = qk + (size_t)i * qk_stride;
        __m256 bs = _mm256_setzero_ps();
        for (int c = 0; c < D; c += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(it->q[i] + c), scale);
            if (!B->per_token) {
                v = _mm256_mul_ps(v, _mm256_loadu_ps(sk + c));
                __m256 z = zeros8(B->kz, (size_t)(B->c0 + c), B->kzb);
                bs = _mm256_fmadd_ps(v, z, bs);
            }
            _mm256_storeu_ps(qf + c, v);
        }
        bias[i] = hsum8(bs);
    }
}

/* Per-token K (the naive baseline): the tile's row scales and -s*z per
 * group of the head, ksr / knz [group][KPMAX], rows [p0, p0 + round8(np))
 * (rows past np repeat row np - 1). */
static void q4d_krows(const q4_blk *B, int p0, int np, int D, float *ksr, float *knz)
{
    const int ngh = D / B->G, g0 = B->c0 / B->G, np8 = (np + 7) & ~7;
    for (int grp = 0; grp < ngh; grp++)
        for (int r = 0; r < np8; r++) {
            size_t si = (size_t)(p0 + (r < np ? r : np - 1)) * (size_t)B->ng + (size_t)(g0 + grp);
            float sv = f16(B->ks[si]);
            ksr[grp * KCPU_ATTN_KPMAX + r] = sv;
            knz[grp * KCPU_ATTN_KPMAX + r] = -(sv * (float)kvq_zero_at(B->kz, si, B->kzb));
        }
}

/* 8 x 8 transpose: lane j of r[i] goes to lane i of r[j]. */
AI void tr8x8(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) /* rows 4h .. 4h + 3: columns j | j + 4 in u[4h + j] */
        for (int j = 0; j < 2; j++) {
            u[4 * h + 2 * j] = _mm256_shuffle_ps(t[4 * h + j], t[4 * h + j + 2], 0x44);
            u[4 * h + 2 * j + 1] = _mm256_shuffle_ps(t[4 * h + j], t[4 * h + j + 2], 0xee);
        }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

/* q4d_kt's tile for codes of another width (bits): per 8 rows x 8
 * channels, codes8 of each row, then an 8 x 8 transpose. */
AI void qx_kt_w(const int bits, const q4_blk *B, int p0, int np, int D, float *kt, int kts,
                const float *ksr, const float *knz)
{
    for (int rb = 0; rb < np; rb += 8) {
        size_t e[8];
        for (int i = 0; i < 8; i++)
            e[i] = (size_t)(p0 + (rb + i < np ? rb + i : np - 1)) * (size_t)B->Dk + (size_t)B->c0;
        for (int c = 0; c < D; c += 8) {
            __m256 x[8];
            for (int i = 0; i < 8; i++)
                x[i] = _mm256_cvtepi32_ps(codes8(B->kq0, e[i] + (size_t)c, bits));
            tr8x8(x);
            for (int j = 0; j < 8; j++) {
                if (B->per_token) {
                    const float *sr = ksr + (c + j) / B->G * KCPU_ATTN_KPMAX + rb;
                    x[j] = _mm256_fmadd_ps(x[j], _mm256_loadu_ps(sr),
                                           _mm256_loadu_ps(knz + (sr - ksr)));
                }
                _mm256_storeu_ps(kt + (size_t)(c + j) * (size_t)kts + rb, x[j]);
            }
        }
    }
}

/* The K codes of rows [p0, p0 + np) of block B (one KV head) transposed:
 * kt[c * kts + r] for r < round8(np) (rows past np repeat row np - 1), as
 * f32 codes (per-channel K) or dequantized with the rows' scales ksr / knz
 * (per-token K). Per 8 rows x 16 channels: the 8 code bytes of each row
 * are transposed (byte j of each row -> one 8-byte column), and each
 * column splits into its two channels (low / high nibble); other widths
 * take qx_kt_w. Then the head's
 * K outliers among the rows replace their elements: exact / s_c + z_c
 * (per channel, so that qf . kt - bias gives q . exact there; sk: the K
 * scales as f32) or the exact value (per token). */
static void q4d_kt(const q4_blk *B, int p0, int np, int D, float *kt, int kts, const float *sk,
                   const float *ksr, const float *knz)
{
    const __m128i m4 = _mm_set1_epi8(15);
    switch (B->kbits) { /* other widths: codes8 and a transpose */
    case 2: qx_kt_w(2, B, p0, np, D, kt, kts, ksr, knz); break;
    case 3: qx_kt_w(3, B, p0, np, D, kt, kts, ksr, knz); break;
    case 8: qx_kt_w(8, B, p0, np, D, kt, kts, ksr, knz); break;
    default: break;
    }
    for (int rb = 0; B->kbits == 4 && rb < np; rb += 8) {
        const uint8_t *rp[8];
        for (int i = 0; i < 8; i++)
            rp[i] = B->kq + (size_t)(p0 + (rb + i < np ? rb + i : np - 1)) * B->rowb;
        for (int k = 0; k < D / 16; k++) {
            __m128i x[8];
            for (int i = 0; i < 8; i++)
                x[i] = _mm_loadl_epi64((const __m128i *)(rp[i] + 8 * k));
            __m128i a0 = _mm_unpacklo_epi8(x[0], x[1]), a1 = _mm_unpacklo_epi8(x[2], x[3]);
            __m128i a2 = _mm_unpacklo_epi8(x[4], x[5]), a3 = _mm_unpacklo_epi8(x[6], x[7]);
            __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
            __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
            /* col[m]: bytes 0-7 = byte column 2m of the 8 rows, 8-15 = 2m + 1 */
            __m128i col[4] = { _mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2),
                               _mm_unpacklo_epi32(b1, b3), _mm_unpackhi_epi32(b1, b3) };
            __m256 s8 = _mm256_setzero_ps(), nz = _mm256_setzero_ps();
            if (B->per_token) {
                int grp = 16 * k / B->G;
                s8 = _mm256_loadu_ps(ksr + grp * KCPU_ATTN_KPMAX + rb);
                nz = _mm256_loadu_ps(knz + grp * KCPU_ATTN_KPMAX + rb);
            }
            for (int m = 0; m < 4; m++) {
                __m128i lo = _mm_and_si128(col[m], m4);
                __m128i hi = _mm_and_si128(_mm_srli_epi16(col[m], 4), m4);
                /* channels 16k + 4m + (0: lo low, 1: hi low, 2: lo high, 3: hi high) */
                __m128i part[4] = { lo, hi, _mm_unpackhi_epi64(lo, lo), _mm_unpackhi_epi64(hi, hi) };
                for (int j = 0; j < 4; j++) {
                    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[j]));
                    if (B->per_token)
                        f = _mm256_fmadd_ps(f, s8, nz);
                    _mm256_storeu_ps(kt + (size_t)(16 * k + 4 * m + j) * (size_t)kts + rb, f);
                }
            }
        }
    }
    for (int e = 0; e < B->n_kout; e++) {
        unsigned r = (unsigned)(B->kout[e].t - p0);
        if (r >= (unsigned)np)
            continue;
        int c = B->kout[e].c;
        float x = B->kout[e].delta; /* still the exact value */
        if (!B->per_token)
            x = x / sk[c] + (float)kvq_zero_at(B->kz, (size_t)(B->c0 + c), B->kzb);
        kt[(size_t)c * (size_t)kts + r] = x;
    }
}

/* Scores of QB queries (prepared keys qf, bias) over the rows [0, np) of
 * a transposed K tile: s[g][r] = qf[g] . kt[:, r] - bias[g], -inf where
 * r >= nv[g], for r < round8(np). Blocks of up to 32 rows (NR vectors) x
 * QB queries stay in registers over all channels. */
AI void q4d_scores_nr(const int QB, const int NR, float *const *s, const float *const *qf,
                      const float *bias, const int *nv, const float *kt, int kts, int r0, int D)
{
    __m256 acc[3][4];
#pragma GCC unroll 3
    for (int g = 0; g < QB; g++)
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++)
            acc[g][j] = _mm256_setzero_ps();
    const float *kp = kt + r0;
    for (int c = 0; c < D; c++, kp += kts) {
        __m256 kv[4];
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++)
            kv[j] = _mm256_loadu_ps(kp + 8 * j);
#pragma GCC unroll 3
        for (int g = 0; g < QB; g++) {
            __m256 qb = _mm256_broadcast_ss(qf[g] + c);
#pragma GCC unroll 4
            for (int j = 0; j < NR; j++)
                acc[g][j] = _mm256_fmadd_ps(qb, kv[j], acc[g][j]);
        }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
#pragma GCC unroll 3
    for (int g = 0; g < QB; g++) {
        __m256 b = _mm256_set1_ps(bias[g]);
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) {
            int r = r0 + 8 * j;
            __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nv[g] - r), lane));
            _mm256_storeu_ps(s[g] + r, _mm256_blendv_ps(ninf, _mm256_sub_ps(acc[g][j], b), keep));
        }
    }
}

AI void q4d_scores(const int QB, float *const *s, const float *const *qf, const float *bias,
                   const int *nv, int np, const float *kt, int kts, int D)
{
    const int np8 = (np + 7) & ~7;
    int r0 = 0;
    for (; r0 + 32 <= np8; r0 += 32)
        q4d_scores_nr(QB, 4, s, qf, bias, nv, kt, kts, r0, D);
    switch ((np8 - r0) / 8) {
    case 3: q4d_scores_nr(QB, 3, s, qf, bias, nv, kt, kts, r0, D); break;
    case 2: q4d_scores_nr(QB, 2, s, qf, bias, nv, kt, kts, r0, D); break;
    case 1: q4d_scores_nr(QB, 1, s, qf, bias, nv, kt, kts, r0, D); break;
    default: break;
    }
}

/* Codes of 16 channels (8 bytes at p, low nibble = even channel) as f32 in
 * natural channel order: c0 channels 0-7, c1 channels 8-15. */
AI void unpack16(const uint8_t *p, __m256 *c0, __m256 *c1)
{
    const __m128i m4 = _mm_set1_epi8(15);
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    __m128i x = _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
    *c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
    *c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(x, x)));
}

/* Dequantizes the V rows [p0, p0 + np) of block B (one KV head) into
 * vn [np][D] (natural channel order), to the bit what kvq_dequant_block
 * gives: x = s * (code - z), computed as fma(code, s, -s*z) (s*z and
 * s*(code - z) are exact in f32: an FP16 s times an integer below 256;
 * codes of other widths through qx_tensor);
 * then the head's V outliers among those rows get their exact values. */
static void q4d_vn(const q4_blk *B, int p0, int np, int D, float *vn)
{
    const int ngh = D / B->G, upg = B->G / 16, g0 = B->c0 / B->G;
    if (B->vbits != 4) /* x = fma(code, s, -s*z) likewise */
        qx_tensor(B, B->vq0, B->vbits, B->vs, B->vz, B->vzb, 0, p0, np, D, NULL, NULL, vn);
    for (int r = 0; B->vbits == 4 && r < np; r++) {
        size_t t = (size_t)(p0 + r), gs = t * (size_t)B->ng + (size_t)g0;
        const uint8_t *vc = B->vq + t * B->rowb;
        float *vo = vn + (size_t)r * (size_t)D;
        for (int grp = 0; grp < ngh; grp++) {
            float sv = f16(B->vs[gs + (size_t)grp]);
            __m256 s8 = _mm256_set1_ps(sv);
            __m256 nz = _mm256_set1_ps(-(sv * (float)kvq_zero_at(B->vz, gs + (size_t)grp, B->vzb)));
            for (int u = 0; u < upg; u++) {
                int c = (grp * upg + u) * 16;
                __m256 c0, c1;
                unpack16(vc + c / 2, &c0, &c1);
                _mm256_storeu_ps(vo + c, _mm256_fmadd_ps(c0, s8, nz));
                _mm256_storeu_ps(vo + c + 8, _mm256_fmadd_ps(c1, s8, nz));
            }
        }
    }
    for (int e = 0; e < B->n_vout; e++) {
        unsigned r = (unsigned)(B->vout[e].t - p0);
        if (r < (unsigned)np)
            vn[(size_t)r * (size_t)D + (size_t)B->vout[e].c] = B->vout[e].delta;
    }
}

/* The query groups (ngr groups from gr0; grp0 / grpn as in the item
 * function) of one KV head over rows [p0, p0 + np) of block B (segment
 * position pos0): scores against the transposed K tile, online softmax,
 * then the dequantized V rows (np <= kts). qk / bias: the keys from
 * q4d_keys; kt, vn: room for D * kts floats each (kts: the tiles' row
 * capacity, a multiple of 8); sk: the K scales from q4d_keys; ksr / knz:
 * room for the per-token K row constants ([D / G][KPMAX] each). */
static void q4d_tile(const kcpu_attn_seg_item *it, const q4_blk *B, int pos0, int p0, int np,
                     const int *grp0, const int *grpn, int gr0, int ngr, float *sc,
                     const float *qk, size_t qk_stride, const float *bias, float *m, float *l,
                     float *kt, int kts, float *vn, const float *sk, float *ksr, float *knz)
{
    const int D = it->head_dim;
    int nvq[KCPU_ATTN_QMAX], loq[KCPU_ATTN_QMAX], nmaxg[KCPU_ATTN_QMAX], any = 0;
    int anyg[KCPU_ATTN_QMAX];
    for (int gr = gr0; gr < gr0 + ngr; gr++) {
        nmaxg[gr] = 0;
        anyg[gr] = 0;
        for (int g = 0; g < grpn[gr]; g++) {
            int i = grp0[gr] + g, e = it->qpos[i] - (pos0 + p0) + 1;
            int lw = kcpu_win_lo(it->qpos[i], it->window) - (pos0 + p0);
            nvq[i] = e < np ? e : np;
            loq[i] = lw > 0 ? lw : 0;
            nmaxg[gr] = nvq[i] > nmaxg[gr] ? nvq[i] : nmaxg[gr];
            anyg[gr] |= nvq[i] > loq[i];
        }
        any |= anyg[gr];
    }
    if (!any)
        return;
    if (B->per_token)
        q4d_krows(B, p0, np, D, ksr, knz);
    q4d_kt(B, p0, np, D, kt, kts, sk, ksr, knz);
    for (int gr = gr0; gr < gr0 + ngr; gr++) {
        int g0 = grp0[gr], qg = grpn[gr];
        if (!anyg[gr])
            continue;
        float *s[3];
        const float *qf[3];
        for (int g = 0; g < qg; g++) {
            s[g] = sc + (size_t)(g0 + g) * KCPU_ATTN_KPMAX;
            qf[g] = qk + (size_t)(g0 + g) * qk_stride;
        }
        switch (qg) {
        case 1: q4d_scores(1, s, qf, bias + g0, nvq + g0, nmaxg[gr], kt, kts, D); break;
        case 2: q4d_scores(2, s, qf, bias + g0, nvq + g0, nmaxg[gr], kt, kts, D); break;
        default: q4d_scores(3, s, qf, bias + g0, nvq + g0, nmaxg[gr], kt, kts, D); break;
        }
        mask_low(qg, s, it->window > 0 ? loq + g0 : NULL);
        for (int g = 0; g < qg; g++) {
            if (nvq[g0 + g] <= loq[g0 + g])
                memset(s[g], 0, (size_t)((nmaxg[gr] + 7) & ~7) * sizeof(float));
            else
                softmax_tile(s[g], nmaxg[gr], &m[g0 + g], &l[g0 + g], it->o[g0 + g], D);
        }
    }
    q4d_vn(B, p0, np, D, vn);
    for (int gr = gr0; gr < gr0 + ngr; gr++) {
        int g0 = grp0[gr], qg = grpn[gr];
        if (!anyg[gr])
            continue;
        const float *p[3];
        for (int g = 0; g < qg; g++)
            p[g] = sc + (size_t)(g0 + g) * KCPU_ATTN_KPMAX;
        switch (qg) {
        case 1: g_oaccum_all(E_F32, 1, it->o + g0, p, vn, (size_t)D, nmaxg[gr], 0, D); break;
        case 2: g_oaccum_all(E_F32, 2, it->o + g0, p, vn, (size_t)D, nmaxg[gr], 0, D); break;
        default: g_oaccum_all(E_F32, 3, it->o + g0, p, vn, (size_t)D, nmaxg[gr], 0, D); break;
        }
    }
}

/* ---- blocks of other code widths (2, 3, 8 bits, or K and V apart) ----
 *
 * A tile's rows of one KV head are dequantized to f32 once per item and
 * head (x = s * (code - z) as fma(code, s, -s*z): bit-identical to
 * kvq_dequant_block, outliers exact) and attended as an F32 segment's
 * (float_group), for prefill and decode alike. */

/* K and V rows [p0, p0 + np) of block B (one KV head) as f32, kt / vt
 * [np][D], the head's outliers among them exact (their delta fields still
 * hold the exact values: the generic path never makes them deltas). */
static void qx_tile(const q4_blk *B, const kvq_layout *L, int p0, int np, int D, float *kt,
                    float *vt, float *sc, float *nz)
{
    qx_tensor(B, B->kq0, L->k_bits, B->ks, B->kz, B->kzb, !B->per_token, p0, np, D, sc, nz, kt);
    qx_tensor(B, B->vq0, L->v_bits, B->vs, B->vz, B->vzb, 0, p0, np, D, sc, nz, vt);
    for (int e = 0; e < B->n_kout; e++) {
        unsigned r = (unsigned)(B->kout[e].t - p0);
        if (r < (unsigned)np)
            kt[(size_t)r * (size_t)D + (size_t)B->kout[e].c] = B->kout[e].delta;
    }
    for (int e = 0; e < B->n_vout; e++) {
        unsigned r = (unsigned)(B->vout[e].t - p0);
        if (r < (unsigned)np)
            vt[(size_t)r * (size_t)D + (size_t)B->vout[e].c] = B->vout[e].delta;
    }
}

/* ---- blocks of any code width, few queries per KV head (decoding) ----
 *
 * Fused, one code path for every width (K and V apart): the codes are
 * unpacked by codes8 (E_C2 .. E_C8) inside the float path's g_scores and
 * g_oaccum, never written to a tile.
 *  - K (per channel): the keys of q4_keys_prepare in natural order, qf =
 *    q * scale * s_c and bias = qf . z_c, so qf . code - bias is the scaled
 *    score against x = s_c (code - z_c);
 *  - V: a tile's softmax weights folded with the rows' group scales, w =
 *    p * s, summed over the raw codes in f32; the zeros' share -sum w * z
 *    is added to the group's channels;
 *  - outliers: deltas against the dense codes, as in the INT4 path. */

enum { CX_SCORES, CX_VSUM };

/* One pass of a query group over a tile's codes: scores (s, q, bias, nv;
 * channels [0, d1)) or a V sum (o += sum_r p[r] * code_r over channels
 * [d0, d1)). rows: the codes of the tile's first row at the head's first
 * channel, ld elements between rows. */
typedef struct {
    int op;
    float *const *s;
    const float *const *q;
    const float *bias;
    const int *nv;
    float *const *o;
    const float *const *p;
    const uint8_t *rows;
    size_t ld;
    int n, d0, d1;
} cx_pass;

AI void cx_pass_eq(const int E, const int QG, const cx_pass *a)
{
    if (a->op == CX_SCORES)
        g_scores(E, QG, a->s, a->q, a->bias, a->nv, a->n, a->rows, a->ld, a->d1, 1.0f);
    else
        g_oaccum_all(E, QG, a->o, a->p, a->rows, a->ld, a->n, a->d0, a->d1);
}

AI void cx_pass_e(const int E, int qg, const cx_pass *a)
{
    switch (qg) {
    case 1: cx_pass_eq(E, 1, a); break;
    case 2: cx_pass_eq(E, 2, a); break;
    default: cx_pass_eq(E, 3, a); break;
    }
}

/* Runs pass a over codes of `bits` bits for a group of qg (1..3) queries. */
static void cx_run(int bits, int qg, const cx_pass *a)
{
    switch (bits) {
    case 2: cx_pass_e(E_C2, qg, a); break;
    case 3: cx_pass_e(E_C3, qg, a); break;
    case 4: cx_pass_e(E_C4, qg, a); break;
    default: cx_pass_e(E_C8, qg, a); break;
    }
}

/* One tile of qg queries (item indices gi, one KV head) over a block of any
 * code widths with per-channel K, fused; arguments as q4_tile's (K: keys
 * in natural order; W: room for qg * round8(nmax) floats). */
static void cx_tile(int qg, float *sc, const q4_blk *B, const q4_keys *K, const int *gi,
                    const float *const *q, float *const *o, float *m, float *l, const int *nv,
                    const int *lo, int nmax, int p0, int np, int *fixed, const float *vsc,
                    const float *vzf, float *W, int ngh, int D, float scale)
{
    const int n8 = (nmax + 7) & ~7;
    float *s[3], *w[3], bias[3];
    const float *qf[3];
    for (int g = 0; g < qg; g++) {
        s[g] = sc + (size_t)g * KCPU_ATTN_KPMAX;
        w[g] = W + (size_t)g * (size_t)n8;
        qf[g] = K->qf[gi[g]];
        bias[g] = K->bias[gi[g]];
    }
    /* element p0 * Dk + c0 is a multiple of 8: its codes start on a byte */
    const size_t e0 = ((size_t)p0 * (size_t)B->Dk + (size_t)B->c0) / 8;
    cx_pass a = { .op = CX_SCORES, .s = s, .q = qf, .bias = bias, .nv = nv,
                  .rows = B->kq0 + e0 * (size_t)B->kbits, .ld = (size_t)B->Dk, .n = nmax,
                  .d1 = D };
    cx_run(B->kbits, qg, &a);
    if (!(*fixed & 1)) { /* the tile's K rows are in L1 now */
        q4_fix_k(B, p0, p0 + np, scale);
        *fixed |= 1;
    }
    add_k_deltas(qg, s, q, B, p0, nmax);
    mask_low(qg, s, lo);
    for (int g = 0; g < qg; g++) {
        if (none_visible(nv, lo, g))
            memset(s[g], 0, (size_t)n8 * sizeof(float));
        else
            softmax_tile(s[g], nmax, &m[g], &l[g], o[g], D);
    }
    a = (cx_pass){ .op = CX_VSUM, .o = o, .p = (const float *const *)w,
                   .rows = B->vq0 + e0 * (size_t)B->vbits, .ld = (size_t)B->Dk, .n = nmax };
    for (int grp = 0; grp < ngh; grp++) {
        const float *sv = vsc + (size_t)grp * KCPU_ATTN_KPMAX;
        const float *zv = vzf + (size_t)grp * KCPU_ATTN_KPMAX;
        a.d0 = grp * B->G;
        a.d1 = a.d0 + B->G;
        for (int g = 0; g < qg; g++) { /* w = p * s; o -= sum w * z */
            __m256 zb = _mm256_setzero_ps();
            for (int r = 0; r < n8; r += 8) {
                __m256 wv = _mm256_mul_ps(_mm256_loadu_ps(s[g] + r), _mm256_loadu_ps(sv + r));
                _mm256_storeu_ps(w[g] + r, wv);
                zb = _mm256_fmadd_ps(wv, _mm256_loadu_ps(zv + r), zb);
            }
            __m256 bz = _mm256_set1_ps(hsum8(zb));
            for (int c = a.d0; c < a.d1; c += 8)
                _mm256_storeu_ps(o[g] + c, _mm256_sub_ps(_mm256_loadu_ps(o[g] + c), bz));
        }
        cx_run(B->vbits, qg, &a);
    }
    if (!(*fixed & 2)) {
        q4_fix_v(B, p0, p0 + np, vsc, vzf);
        *fixed |= 2;
    }
    add_v_deltas(qg, o, s, B, p0, nmax);
}

/* Prefetches the parts of block base that q4_prepare and q4_tile_consts
 * read scattered (snapshots, outlier lists; the codes stream in order and
 * the hardware prefetcher finds them), so that they arrive while the
 * current block is computed. */
static void q4_prefetch(const kvq_layout *L, const void *base)
{
    const char *b = base;
    size_t nv = (size_t)L->block_tokens * (size_t)L->kv_dim / (size_t)L->v_group;
    size_t nk = (size_t)L->n_ksnap, cap = (size_t)L->out_cap;
    const size_t span[9][2] = {
        { 0, sizeof(kvq_block_hdr) }, { L->off_ks, 2 * nk },
        { L->off_kz, KVQ_CODE_BYTES(nk, L->k_zbits) }, { L->off_vs, 2 * nv },
        { L->off_vz, KVQ_CODE_BYTES(nv, L->v_zbits) }, { L->off_kout_idx, (size_t)L->idx_bytes * cap },
        { L->off_kout_val, 2 * cap }, { L->off_vout_idx, (size_t)L->idx_bytes * cap },
        { L->off_vout_val, 2 * cap },
    };
    for (int i = 0; i < 9; i++)
        for (size_t o = 0; o < span[i][1]; o += 64)
            _mm_prefetch(b + span[i][0] + o, _MM_HINT_T0);
}

/* Float (F32 / F16) tile of one query group: dispatch on element type and
 * group size. */
static void float_group(int kind, int qg, float *sc, const float *const *q, float *const *o,
                        float *m, float *l, const int *nv, const int *lo, int nmax,
                        const void *kb, const void *vb, size_t ld, int D, float scale)
{
    if (kind == KVS_F16) {
        switch (qg) {
        case 1: float_tile(E_F16, 1, sc, q, o, m, l, nv, lo, nmax, kb, vb, ld, D, scale); break;
        case 2: float_tile(E_F16, 2, sc, q, o, m, l, nv, lo, nmax, kb, vb, ld, D, scale); break;
        default: float_tile(E_F16, 3, sc, q, o, m, l, nv, lo, nmax, kb, vb, ld, D, scale); break;
        }
    } else {
        switch (qg) {
        case 1: float_tile(E_F32, 1, sc, q, o, m, l, nv, lo, nmax, kb, vb, ld, D, scale); break;
        case 2: float_tile(E_F32, 2, sc, q, o, m, l, nv, lo, nmax, kb, vb, ld, D, scale); break;
        default: float_tile(E_F32, 3, sc, q, o, m, l, nv, lo, nmax, kb, vb, ld, D, scale); break;
        }
    }
}

/* See kcpu_attn_seg_item. The item's queries are taken in groups of up to
 * 3 of one KV head. Segments are walked in array order over the item's
 * range; each is cut in tiles (float kinds: kcpu_attn_kp positions, INT4:
 * twice that, as their rows are 4x smaller) and every tile runs every
 * group. An INT4 block is prepared once for all the item's heads
 * (q4_prepare), its per-row constants once per tile and head. With
 * SEG_DENSE_Q or more queries per head, an INT4 block is walked head by
 * head instead, in tiles of kcpu_attn_kp positions unpacked once per head
 * (q4d_tile). */
void kcpu_avx2_attn_seg_item(const kcpu_attn_seg_item *it, float *tmp)
{
    const int D = it->head_dim, nq = it->nq;
    const kvq_layout *L = it->L;
    for (int si = 0; si < it->n_segs; si++)
        if (it->segs[si].kind == KVS_Q4 && (D % 16 || L->v_group % 16 || D > 512)) {
            kcpu_scalar_ops.attn_seg_item(it, tmp);
            return;
        }
    /* the 4-bit paths below read nibbles; other widths (gen) decode with
     * the fused code path (cx_tile), or with dequantized tiles (qx_tile)
     * for per-token K; prefill chunks (dense) take q4d_tile at every width */
    const int gen = L && (L->k_bits != 4 || L->v_bits != 4);
    const kcpu_seg_tmp ly = kcpu_seg_tmp_layout(L, D);
    float *sc = tmp + ly.sc, *kls = tmp + ly.tile, *qk = tmp + ly.qk, *blk = tmp + ly.blk;
    float *vsc = tmp + ly.vsc, *vzf = vsc + ly.vs_len, *W = kls + 4096;
    kcpu_kvq_out *outs = (kcpu_kvq_out *)(tmp + ly.outs);
    const int KP = kcpu_attn_kp(D);
    const int KPQ = 2 * KP < KCPU_ATTN_KPMAX ? 2 * KP : KCPU_ATTN_KPMAX;
    const int hmin = it->kvh[0], nh = it->kvh[nq - 1] - hmin + 1;
    /* many queries per KV head (prefill): INT4 tiles of KP rows are
     * unpacked once for all of them (q4d_tile; kt, vt: its K and V, in the
     * tile area: KP * D <= KCPU_ATTN_TILE as D <= 512 here) */
    const int dense = nq >= SEG_DENSE_Q * nh;
    const int qx = gen && !dense && L->k_mode == KVQ_K_PER_TOKEN;
    const int fused = !qx && !dense; /* q4_tile or cx_tile */
    float *kt = kls, *vt = kls + (size_t)KP * (size_t)D;
    float m[KCPU_ATTN_QMAX], l[KCPU_ATTN_QMAX];
    int gi_all[KCPU_ATTN_QMAX], grp0[KCPU_ATTN_QMAX], grpn[KCPU_ATTN_QMAX], n_grp = 0;
    for (int i = 0; i < nq; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        gi_all[i] = i;
        memset(it->o[i], 0, (size_t)D * sizeof(float));
    }
    int hg0[KCPU_ATTN_QMAX] = { 0 }, hgn[KCPU_ATTN_QMAX] = { 0 }; /* groups of each head */
    float bias[KCPU_ATTN_QMAX];
    for (int i = 0; i < nq;) { /* groups: up to 3 queries of one head */
        int j = i + 1;
        while (j < nq && j - i < 3 && it->kvh[j] == it->kvh[i])
            j++;
        int h = it->kvh[i] - hmin;
        if (hgn[h]++ == 0)
            hg0[h] = n_grp;
        grp0[n_grp] = i;
        grpn[n_grp++] = j - i;
        i = j;
    }
    q4_blk B[KCPU_ATTN_QMAX];
    q4_keys K;
    int queries_ready = 0, cum = 0;
    for (int si = 0; si < it->n_segs; si++) {
        const kvs_seg *sg = &it->segs[si];
        int n = kcpu_seg_span(sg, it->L, it->lo), a = it->v0 - cum, b = it->v1 - cum;
        int vmax = 0, vmin = n;
        cum += n;
        a = a > 0 ? a : 0;
        b = b < n ? b : n;
        for (int i = 0; i < nq; i++) {
            int vis = it->qpos[i] - sg->pos0 + 1;
            int low = kcpu_win_lo(it->qpos[i], it->window) - sg->pos0;
            vmax = vis > vmax ? vis : vmax;
            vmin = low < vmin ? low : vmin;
        }
        b = b < vmax ? b : vmax;
        a = a > vmin ? a : vmin; /* rows before every query's window */
        if (a >= b)
            continue;
        if (sg->kind == KVS_Q4) {
            if (si + 1 < it->n_segs && it->segs[si + 1].kind == KVS_Q4)
                q4_prefetch(L, it->segs[si + 1].k);
            if (!queries_ready && fused) {
                q4_queries(it, qk, ly.qk_stride);
                queries_ready = 1;
            }
            q4_prepare(B, fused ? &K : NULL, sg, it, hmin, nh, a, b, qk, ly.qk_stride,
                       blk, outs);
            if (dense) {
                for (int h = 0; h < nh; h++) {
                    if (hgn[h] == 0)
                        continue;
                    int gl = hg0[h] + hgn[h] - 1; /* the head's last group */
                    q4d_keys(&B[h], it, grp0[hg0[h]], grp0[gl] + grpn[gl], qk, ly.qk_stride,
                             bias, blk);
                    for (int p0 = a; p0 < b; p0 += KP)
                        q4d_tile(it, &B[h], sg->pos0, p0, b - p0 < KP ? b - p0 : KP, grp0, grpn,
                                 hg0[h], hgn[h], sc, qk, ly.qk_stride, bias, m, l, kt, KP, vt,
                                 blk, vsc, vzf);
                }
                continue;
            }
        }
        int step = sg->kind != KVS_Q4 || qx ? KP : KPQ;
        for (int p0 = a; p0 < b; p0 += step) {
            int np = b - p0 < step ? b - p0 : step, cur = -1;
            int fixed[KCPU_ATTN_QMAX] = { 0 }; /* per head: outlier deltas done, 1 K, 2 V */
            for (int gr = 0; gr < n_grp; gr++) {
                int g0 = grp0[gr], qg = grpn[gr], nv[3], lo[3], nmax = 0, vis = 0;
                for (int g = 0; g < qg; g++) {
                    int e = it->qpos[g0 + g] - (sg->pos0 + p0) + 1;
                    int lw = kcpu_win_lo(it->qpos[g0 + g], it->window) - (sg->pos0 + p0);
                    nv[g] = e < np ? e : np;
                    lo[g] = lw > 0 ? lw : 0;
                    nmax = nv[g] > nmax ? nv[g] : nmax;
                    vis |= nv[g] > lo[g];
                }
                if (!vis)
                    continue;
                const int *lop = it->window > 0 ? lo : NULL;
                float *sg_sc = sc + (size_t)g0 * KCPU_ATTN_KPMAX;
                const float *const *q = it->q + g0;
                float *const *o = it->o + g0;
                int h = it->kvh[g0] - hmin;
                if (sg->kind != KVS_Q4) {
                    size_t el = sg->kind == KVS_F16 ? sizeof(uint16_t) : sizeof(float);
                    size_t off = ((size_t)p0 * sg->stride + (size_t)it->kvh[g0] * (size_t)D) * el;
                    float_group(sg->kind, qg, sg_sc, q, o, m + g0, l + g0, nv, lop, nmax,
                                (const char *)sg->k + off, (const char *)sg->v + off, sg->stride,
                                D, it->scale);
                    continue;
                }
                if (qx) { /* kt, vt: this head's rows as f32 (blk: scratch) */
                    if (h != cur) {
                        qx_tile(&B[h], L, p0, np, D, kt, vt, blk, blk + (D + 63) / 64 * 64);
                        cur = h;
                    }
                    float_group(KVS_F32, qg, sg_sc, q, o, m + g0, l + g0, nv, lop, nmax, kt, vt,
                                (size_t)D, D, it->scale);
                    continue;
                }
                if (h != cur) {
                    q4_tile_consts(&B[h], p0, np, D, vsc, vzf, kls);
                    cur = h;
                }
                const int *gi = gi_all + g0, ngh = D / L->v_group;
                if (gen) {
                    cx_tile(qg, sg_sc, &B[h], &K, gi, q, o, m + g0, l + g0, nv, lop, nmax, p0, np,
                            &fixed[h], vsc, vzf, W, ngh, D, it->scale);
                    continue;
                }
                switch (qg) {
                case 1: q4_tile(1, sg_sc, &B[h], &K, gi, q, o, m + g0, l + g0, nv, lop, nmax, p0, np, &fixed[h], kls, vsc, vzf, W, ngh, D, it->scale); break;
                case 2: q4_tile(2, sg_sc, &B[h], &K, gi, q, o, m + g0, l + g0, nv, lop, nmax, p0, np, &fixed[h], kls, vsc, vzf, W, ngh, D, it->scale); break;
                default: q4_tile(3, sg_sc, &B[h], &K, gi, q, o, m + g0, l + g0, nv, lop, nmax, p0, np, &fixed[h], kls, vsc, vzf, W, ngh, D, it->scale); break;
                }
            }
        }
    }
    finish(nq, it->o, m, l, it->ml, D);
}
