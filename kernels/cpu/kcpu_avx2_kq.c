/*
 * kcpu_avx2_kq.c - AVX2 + FMA + F16C matmul and dequantization of the
 * K-quant weight types Q4_K, Q5_K, Q6_K (256-element super-blocks; layouts
 * in kernels/ktypes.h). Part of the AVX2 back end (kcpu_avx2.c dispatches
 * here); compiled with -mavx2 -mfma -mf16c and called only after the
 * run-time check.
 *
 * The activations are the back end's int8 32-element blocks (kcpu_q8x), so
 * a super-block is taken as 8 sub-blocks of 32, each against one activation
 * block:
 *  - Q4_K / Q5_K: sub-block j is w = (d sc_j) q - (dmin m_j) with unsigned
 *    codes q, so  sum w x = (d sc_j) dx sum(q qx) - (dmin m_j) s  with s the
 *    activation block sum (smul 1). The super-block's 8 scales and mins are
 *    unpacked once per row with integer ops, converted to f32 in one go.
 *  - Q6_K: codes q - 32 are signed (-32..31) with one int8 scale per 16
 *    elements: maddubs(|q|, sign(qx, q)) gives the products as pairs, madd
 *    with the two scales (int16 lanes 0-7: first 16 elements, 8-15: last
 *    16) sums them scaled, and the block's f32 factor d * dx finishes it.
 *    Bounds: |pair| <= 2 * 32 * 127 < 2^15, |madd lane| <= 2 * 8128 * 128.
 * Tiles and gemv prefetch as in kcpu_avx2.c (MT_RM x MT_TN, GV_RM rows).
 * Dequantization reproduces kref_dequant_row bit for bit (the same f32
 * products and differences, no FMA).
 * Threading: pure functions; the front end splits the work.
 */
#include "kernels/cpu/kcpu_avx2_simd.h"
#include "kernels/cpu/kcpu_impl.h"
#include "kernels/cpu/kcpu_kq_simd.h"

#include <immintrin.h>

#define MT_RM 4
#define MT_TN KCPU_XG
#define GV_RM 2
#define GV_PF 2 /* gemv prefetch distance in row tiles */
#define MAXR 4
#define MAXT 4


AI size_t kq_block_bytes(const int kind)
{
    return kind == KQ_Q4_K ? sizeof(kt_block_q4_k)
         : kind == KQ_Q5_K ? sizeof(kt_block_q5_k) : sizeof(kt_block_q6_k);
}

/* acc[i][t] += (wd_i * dx_t) * sum over the 32-block of w_i * x_t, for
 * unsigned codes wq (maddubs then madd with ones). */
#define KQ_DOT_UNSIGNED(RM, TN, wq, wd, xg, dg, b)                                           \
    do {                                                                                    \
        _Pragma("GCC unroll 4") for (int t = 0; t < (TN); t++) {                           \
            __m256i xv = _mm256_load_si256(                                                 \
                (const __m256i *)((xg) + ((size_t)(b) * KCPU_XG + (size_t)t) * KT_QK));     \
            __m256 dx = _mm256_broadcast_ss((dg) + (size_t)(b) * KCPU_XG + (size_t)t);      \
            _Pragma("GCC unroll 4") for (int i = 0; i < (RM); i++) {                       \
                __m256i pr = _mm256_madd_epi16(_mm256_maddubs_epi16((wq)[i], xv), ones);    \
                acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr),                         \
                                            _mm256_mul_ps((wd)[i], dx), acc[i][t]);         \
            }                                                                               \
        }                                                                                   \
    } while (0)

/* y for rows r..r+RM-1, tokens t0..t0+TN-1 (t0 a multiple of KCPU_XG), as
 * kcpu_avx2.c's tile_q. */
AI void tile_kq(const int kind, const int RM, const int TN, const char *W, size_t row_bytes,
                const kcpu_q8x *xq, float *y, int n_rows, int r, int t0)
{
    __m256 acc[MAXR][MAXT];
    __m256 macc[MAXR]; /* sum of dmin m_j * s: [block 2p tokens 0-3 | 2p+1 tokens 0-3] */
    const __m256i ones = _mm256_set1_epi16(1);
    const int nb = xq->nb, nsb = nb / 8;
    const size_t g0 = (size_t)(t0 / KCPU_XG) * (size_t)nb * KCPU_XG;
    const int8_t *xg = xq->qs + g0 * KT_QK;
    const float *dg = xq->d + g0;
    const float *sg = xq->s + g0;
    const size_t bb = kq_block_bytes(kind);
    const char *rows[MAXR];
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        rows[i] = W + (size_t)(r + i) * row_bytes;
        macc[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            acc[i][t] = _mm256_setzero_ps();
    }
    for (int sb = 0; sb < nsb; sb++) {
        if (TN == 1 && GV_PF) /* gemv: stream the weights ahead */
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++)
                for (size_t o = 0; o < bb; o += 64)
                    _mm_prefetch(rows[i] + (size_t)(GV_PF * RM) * row_bytes + (size_t)sb * bb + o,
                                 _MM_HINT_T0);
        if (kind == KQ_Q6_K) {
            const kt_block_q6_k *blk[MAXR];
            __m256 wd[MAXR];
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++) {
                blk[i] = (const kt_block_q6_k *)rows[i] + sb;
                wd[i] = _mm256_set1_ps(f16(blk[i]->d));
            }
            for (int j = 0; j < 8; j++) {
                const int b = sb * 8 + j;
                __m256i wa[MAXR], wsg[MAXR], wsc[MAXR];
#pragma GCC unroll 4
                for (int i = 0; i < RM; i++) {
                    wsg[i] = q6_codes(blk[i], j);
                    wa[i] = _mm256_sign_epi8(wsg[i], wsg[i]); /* |q| as u8 */
                    wsc[i] = q6_scale_pair(blk[i], j);
                }
#pragma GCC unroll 4
                for (int t = 0; t < TN; t++) {
                    __m256i xv = _mm256_load_si256(
                        (const __m256i *)(xg + ((size_t)b * KCPU_XG + (size_t)t) * KT_QK));
                    __m256 dx = _mm256_broadcast_ss(dg + (size_t)b * KCPU_XG + (size_t)t);
#pragma GCC unroll 4
                    for (int i = 0; i < RM; i++) {
                        __m256i xs = _mm256_sign_epi8(xv, wsg[i]);
                        __m256i pr = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[i], xs), wsc[i]);
                        acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr),
                                                    _mm256_mul_ps(wd[i], dx), acc[i][t]);
                    }
                }
            }
            continue;
        }
        /* Q4_K / Q5_K */
        const uint8_t *qs[MAXR], *qh[MAXR];
        float dsc[MAXR][8];
        __m256 dmv[MAXR];
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++) {
            __m256 dv;
            if (kind == KQ_Q4_K) {
                const kt_block_q4_k *k4 = (const kt_block_q4_k *)rows[i] + sb;
                kq_scales(k4->scales, k4->d, k4->dmin, &dv, &dmv[i]);
                qs[i] = k4->qs;
                qh[i] = NULL;
            } else {
                const kt_block_q5_k *k5 = (const kt_block_q5_k *)rows[i] + sb;
                kq_scales(k5->scales, k5->d, k5->dmin, &dv, &dmv[i]);
                qs[i] = k5->qs;
                qh[i] = k5->qh;
            }
            _mm256_storeu_ps(dsc[i], dv);
        }
        for (int p = 0; p < 4; p++) {
            const int b = sb * 8 + 2 * p;
            /* mins: activation sums of blocks b, b+1 (4 tokens each) */
            __m256 s8 = _mm256_loadu_ps(sg + (size_t)b * KCPU_XG);
            __m256i mi = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p,
                                           2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
            __m256i wlo[MAXR], whi[MAXR];
            __m256 dlo[MAXR], dhi[MAXR];
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++) {
                macc[i] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dmv[i], mi), s8, macc[i]);
                kq_codes_pair(kind, qs[i], qh[i], p, &wlo[i], &whi[i]);
                dlo[i] = _mm256_broadcast_ss(&dsc[i][2 * p]);
                dhi[i] = _mm256_broadcast_ss(&dsc[i][2 * p + 1]);
            }
            KQ_DOT_UNSIGNED(RM, TN, wlo, dlo, xg, dg, b);
            KQ_DOT_UNSIGNED(RM, TN, whi, dhi, xg, dg, b + 1);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        float m[4];
        _mm_storeu_ps(m, _mm_add_ps(_mm256_castps256_ps128(macc[i]),
                                    _mm256_extractf128_ps(macc[i], 1)));
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            y[(size_t)(t0 + t) * (size_t)n_rows + (size_t)(r + i)] = hsum8(acc[i][t]) - m[t];
    }
}

/* Rows [r0, r1) x all tokens for one kind, tiles as kcpu_avx2.c. */
AI void mm_kq_kind(const int kind, const char *W, size_t rb, const kcpu_q8x *xq, float *y,
                   int n_rows, int r0, int r1)
{
    if (xq->n_tok == 1) {
        int r = r0;
        for (; r + GV_RM <= r1; r += GV_RM)
            tile_kq(kind, GV_RM, 1, W, rb, xq, y, n_rows, r, 0);
        for (; r < r1; r++)
            tile_kq(kind, 1, 1, W, rb, xq, y, n_rows, r, 0);
        return;
    }
    for (int t0 = 0; t0 < xq->n_tok; t0 += MT_TN) {
        int tn = xq->n_tok - t0 < MT_TN ? xq->n_tok - t0 : MT_TN;
        int r = r0;
        for (; r + MT_RM <= r1; r += MT_RM) {
            switch (tn) {
            case 1: tile_kq(kind, MT_RM, 1, W, rb, xq, y, n_rows, r, t0); break;
            case 2: tile_kq(kind, MT_RM, 2, W, rb, xq, y, n_rows, r, t0); break;
            case 3: tile_kq(kind, MT_RM, 3, W, rb, xq, y, n_rows, r, t0); break;
            default: tile_kq(kind, MT_RM, 4, W, rb, xq, y, n_rows, r, t0); break;
            }
        }
        for (; r < r1; r++) {
            switch (tn) {
            case 1: tile_kq(kind, 1, 1, W, rb, xq, y, n_rows, r, t0); break;
            case 2: tile_kq(kind, 1, 2, W, rb, xq, y, n_rows, r, t0); break;
            case 3: tile_kq(kind, 1, 3, W, rb, xq, y, n_rows, r, t0); break;
            default: tile_kq(kind, 1, 4, W, rb, xq, y, n_rows, r, t0); break;
            }
        }
    }
}

/* See kcpu_impl.h. */
void kcpu_avx2_mm_kq(kt_type t, const void *W, size_t row_bytes, const kcpu_q8x *xq,
                     float *y, int n_rows, int r0, int r1)
{
    if (t == KT_Q4_K)
        mm_kq_kind(KQ_Q4_K, W, row_bytes, xq, y, n_rows, r0, r1);
    else if (t == KT_Q5_K)
        mm_kq_kind(KQ_Q5_K, W, row_bytes, xq, y, n_rows, r0, r1);
    else if (t == KT_Q6_K)
        mm_kq_kind(KQ_Q6_K, W, row_bytes, xq, y, n_rows, r0, r1);
}

/* Codes (bytes, any sign) times an f32 factor, minus m: 32 floats, each the
 * f32 product f * q then the f32 difference, as kref_dequant_row. */
AI void store32(float *o, __m256i q, __m256 f, __m256 m)
{
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m128i parts[4] = { lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8) };
    for (int g = 0; g < 4; g++) {
        __m256 q8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[g]));
        _mm256_storeu_ps(o + 8 * g, _mm256_sub_ps(_mm256_mul_ps(f, q8), m));
    }
}

/* See kcpu_impl.h. Bit exact with kref_dequant_row: x = (d sc_j) q -
 * (dmin m_j) (a zero min leaves (d sc_j) q, sign of zero included, as
 * x - 0 does), x = (d scale) (q - 32). */
void kcpu_avx2_dequant_kq(kt_type t, const void *row, float *out, int64_t n)
{
    for (int64_t sb = 0; sb < n / KT_QK_K; sb++) {
        float *o = out + sb * KT_QK_K;
        if (t == KT_Q6_K) {
            const kt_block_q6_k *b = (const kt_block_q6_k *)row + sb;
            float d = f16(b->d);
            for (int j = 0; j < 8; j++) {
                __m256i q = q6_codes(b, j);
                __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
                __m256 f0 = _mm256_set1_ps(d * (float)b->scales[2 * j]);
                __m256 f1 = _mm256_set1_ps(d * (float)b->scales[2 * j + 1]);
                __m128i parts[4] = { lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8) };
                for (int g = 0; g < 4; g++) {
                    __m256 q8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[g]));
                    _mm256_storeu_ps(o + 32 * j + 8 * g, _mm256_mul_ps(g < 2 ? f0 : f1, q8));
                }
            }
            continue;
        }
        const uint8_t *qs, *qh = NULL;
        __m256 dsc, dm;
        if (t == KT_Q4_K) {
            const kt_block_q4_k *b = (const kt_block_q4_k *)row + sb;
            kq_scales(b->scales, b->d, b->dmin, &dsc, &dm);
            qs = b->qs;
        } else {
            const kt_block_q5_k *b = (const kt_block_q5_k *)row + sb;
            kq_scales(b->scales, b->d, b->dmin, &dsc, &dm);
            qs = b->qs;
            qh = b->qh;
        }
        float fs[8], fm[8];
        _mm256_storeu_ps(fs, dsc);
        _mm256_storeu_ps(fm, dm);
        for (int p = 0; p < 4; p++) {
            __m256i lo, hi;
            if (t == KT_Q4_K)
                kq_codes_pair(KQ_Q4_K, qs, qh, p, &lo, &hi);
            else
                kq_codes_pair(KQ_Q5_K, qs, qh, p, &lo, &hi);
            store32(o + 64 * p, lo, _mm256_set1_ps(fs[2 * p]), _mm256_set1_ps(fm[2 * p]));
            store32(o + 64 * p + 32, hi, _mm256_set1_ps(fs[2 * p + 1]),
                    _mm256_set1_ps(fm[2 * p + 1]));
        }
    }
}
