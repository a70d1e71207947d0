/*
 * kcpu_avx512.c - AVX-512 quantized matmul for the weight types Q5_0, Q5_1,
 * Q4_K, Q5_K, Q6_K; the AVX-512 back ends are the AVX2 one with this
 * mm_quant (kcpu_impl.h), other quantized types go to the AVX2 kernels.
 *
 * Built twice (kernels/meson.build): with -mavx512f/bw/vl/dq as
 * kcpu_avx512_mm_quant, where the u8 x s8 dot is maddubs + madd, and with
 * -mavx512vnni added (KCPU_AVX512_VNNI) as kcpu_avx512vnni_mm_quant, where
 * it is one vpdpbusd. Both give the same integers: the maddubs pairs never
 * saturate (|2 * 63 * 127| < 2^15), so the results are identical. Called
 * only after the run-time check in kcpu.c.
 *
 * A 512-bit register holds two 32-element blocks (b, b+1) - a pair of
 * Q5_0 / Q5_1 blocks, or sub-blocks 2p, 2p+1 of a K-quant super-block -
 * against the same two int8 activation blocks (kcpu_q8x) of one token. The
 * dot's 16 int32 lanes (4 elements each) are converted to f32 and scaled by
 * a per-lane factor, weight factor x activation factor, so a scale per 32
 * (Q5_*, Q4_K, Q5_K) or per 16 (Q6_K) elements is one multiply:
 *   Q5_0 / Q5_1  codes 0..31; the -16 (via smul) or the min through the
 *                activation block sums s, as in kcpu_avx2.c;
 *   Q4_K / Q5_K  lanes scaled by d sc_j; the mins: once per super-block,
 *                dmin m_j (8 lanes) times token t's 8 activation block sums,
 *                folded into the same accumulator;
 *   Q6_K         codes q in 0..63 unsigned; the -32 starts the dot: the
 *                int32 accumulator begins at -32 times the activation sums of
 *                each 4 elements (one dot with ones per token, shared by
 *                the rows), then lanes are scaled by d scale_(16-group).
 * Tiles: MT_RM rows x MT_TN tokens (4 x 4: 16 accumulators in the 32 zmm
 * registers), gemv GV_RM rows with prefetch of the rows ahead.
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

enum { W_Q5_0 = 8, W_Q5_1 }; /* beside KQ_Q4_K, KQ_Q5_K, KQ_Q6_K */

#if defined(KCPU_AVX512_VNNI)
#define MM_QUANT_FN kcpu_avx512vnni_mm_quant
/* acc + sum of 4 u8 x s8 products per int32 lane */
AI __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s)
{
    return _mm512_dpbusd_epi32(acc, u, s);
}
#else
#define MM_QUANT_FN kcpu_avx512_mm_quant
AI __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s)
{
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s),
                                                   _mm512_set1_epi16(1)));
}
#endif

AI __m512i join256(__m256i lo, __m256i hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

AI size_t w_block_bytes(const int kind)
{
    switch (kind) {
    case KQ_Q4_K: return sizeof(kt_block_q4_k);
    case KQ_Q5_K: return sizeof(kt_block_q5_k);
    case KQ_Q6_K: return sizeof(kt_block_q6_k);
    case W_Q5_0: return sizeof(kt_block_q5_0);
    default: return sizeof(kt_block_q5_1);
    }
}

/* Codes of sub-blocks 2p (low 256 bits) and 2p+1 of a Q4_K / Q5_K
 * super-block: the low / high nibbles of qs[32p .. 32p+31], and for Q5_K
 * bit 2p / 2p+1 of qh[l] as 0x10. */
AI __m512i kq_pair_codes(const uint8_t *qs, const uint8_t *qh, int p)
{
    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * p)));
    v = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)),
                         _mm512_set1_epi8(0x0f));
    if (qh) {
        __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh));
        __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * p))),
                                         _mm256_set1_epi8((char)(1 << (2 * p + 1))), 1);
        v = _mm512_mask_add_epi8(v, _mm512_test_epi8_mask(h, bit), v, _mm512_set1_epi8(0x10));
    }
    return v;
}

/* Unsigned codes 0..63 of sub-blocks 2p, 2p+1 of a Q6_K super-block (both
 * in half h = p / 2: low 4 bits from the 64 bytes ql[64h ..], nibble
 * p % 2; top 2 bits from qh[32h + l], bits 2k, 2k+1 for k = 2(p%2) and
 * 2(p%2) + 1). */
AI __m512i q6_pair_codes(const kt_block_q6_k *b, int p)
{
    const int h = p / 2, k0 = 2 * (p % 2);
    __m512i l = _mm512_loadu_si512((const void *)(b->ql + 64 * h));
    l = _mm512_and_si512(_mm512_srl_epi16(l, _mm_cvtsi32_si128(4 * (p % 2))),
                         _mm512_set1_epi8(0x0f));
    __m512i u = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
    u = _mm512_srlv_epi64(u, _mm512_setr_epi64(2 * k0, 2 * k0, 2 * k0, 2 * k0, 2 * k0 + 2,
                                                2 * k0 + 2, 2 * k0 + 2, 2 * k0 + 2));
    u = _mm512_and_si512(u, _mm512_set1_epi8(3));
    return _mm512_or_si512(l, _mm512_slli_epi16(u, 4));
}

/* Codes 0..31 of Q5_0 / Q5_1 blocks A and B (B NULL: zeros) in element
 * order, A in the low 256 bits. */
AI __m512i q5_pair_codes(const uint8_t *qsa, const uint8_t *qha, const uint8_t *qsb,
                         const uint8_t *qhb)
{
    __m128i a = _mm_loadu_si128((const __m128i *)qsa);
    __m128i b = qsb ? _mm_loadu_si128((const __m128i *)qsb) : _mm_setzero_si128();
    /* 128-bit lanes [qs_a, qs_a, qs_b, qs_b], the 2nd of each shifted to
     * the high nibbles */
    __m512i v = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(a), 0xff00, b);
    v = _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    v = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
    uint32_t ha, hb = 0;
    memcpy(&ha, qha, 4);
    if (qhb)
        memcpy(&hb, qhb, 4);
    __mmask64 hi = _cvtu64_mask64((uint64_t)ha | (uint64_t)hb << 32);
    return _mm512_or_si512(v, _mm512_maskz_mov_epi8(hi, _mm512_set1_epi8(0x10)));
}

/* One pair of blocks (b, b+1; two == 0: only b) of RM rows against TN
 * tokens: acc[i][t] += cvt(dot) * (wd[i] * dx_t), and for Q5_0 / Q5_1
 * macc[i] += mv[i] * s. The Q6_K dot starts at -32 times the activations'
 * 4-element sums. */
AI void pair_dot(const int kind, const int RM, const int TN, const int two,
                 const __m512i *w, const __m512 *wd, const __m256 *mv,
                 __m512 acc[MAXR][MAXT], __m256 *macc, const int8_t *xg, const float *dg,
                 const float *sg, int b)
{
    const size_t o = (size_t)b * KCPU_XG;
    if (kind == W_Q5_0 || kind == W_Q5_1) { /* K-quant mins: tile512 */
        __m256 s8 = two ? _mm256_loadu_ps(sg + o) : _mm256_zextps128_ps256(_mm_loadu_ps(sg + o));
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++)
            macc[i] = _mm256_fmadd_ps(mv[i], s8, macc[i]);
    }
    __m512 d8 = two ? _mm512_castps256_ps512(_mm256_loadu_ps(dg + o))
                    : _mm512_zextps128_ps512(_mm_loadu_ps(dg + o));
#pragma GCC unroll 4
    for (int t = 0; t < TN; t++) {
        const int8_t *xa = xg + (o + (size_t)t) * KT_QK;
        __m256i xlo = _mm256_load_si256((const __m256i *)xa);
        __m512i x = two ? join256(xlo, _mm256_load_si256((const __m256i *)(xa + KCPU_XG * KT_QK)))
                        : _mm512_zextsi256_si512(xlo);
        __m512 dx = _mm512_permutexvar_ps(
            _mm512_setr_epi32(t, t, t, t, t, t, t, t, 4 + t, 4 + t, 4 + t, 4 + t, 4 + t, 4 + t,
                              4 + t, 4 + t),
            d8);
        __m512i init = _mm512_setzero_si512();
        if (kind == KQ_Q6_K) { /* -32 * (sum of each 4 activations) */
            __m512i sum4 = dot_u8s8(_mm512_setzero_si512(), _mm512_set1_epi8(1), x);
            init = _mm512_sub_epi32(init, _mm512_slli_epi32(sum4, 5));
        }
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++)
            acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8s8(init, w[i], x)),
                                        _mm512_mul_ps(wd[i], dx), acc[i][t]);
    }
}

/* y for rows r..r+RM-1, tokens t0..t0+TN-1 (t0 a multiple of KCPU_XG). */
AI void tile512(const int kind, const int RM, const int TN, const char *W, size_t row_bytes,
                const kcpu_q8x *xq, float *y, int n_rows, int r, int t0)
{
    __m512 acc[MAXR][MAXT];
    __m256 macc[MAXR]; /* [block b tokens 0-3 | block b+1 tokens 0-3], summed */
    const int nb = xq->nb;
    const size_t g0 = (size_t)(t0 / KCPU_XG) * (size_t)nb * KCPU_XG;
    const int8_t *xg = xq->qs + g0 * KT_QK;
    const float *dg = xq->d + g0;
    const float *sg = xq->s + g0;
    const size_t bb = w_block_bytes(kind);
    const char *rows[MAXR];
    /* lane pattern [p x 8 | p+1 x 8] / [p x 4 | p+1 x 4] pickers */
    const __m512i pick01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        rows[i] = W + (size_t)(r + i) * row_bytes;
        macc[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            acc[i][t] = _mm512_setzero_ps();
    }
    __m512i w[MAXR];
    __m512 wd[MAXR];
    __m256 mv[MAXR];
    if (kind == W_Q5_0 || kind == W_Q5_1) {
        int b = 0;
        for (; b < nb; b += 2) {
            const int two = b + 1 < nb;
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++) {
                if (TN == 1 && GV_PF)
                    _mm_prefetch(rows[i] + (size_t)(GV_PF * RM) * row_bytes + (size_t)b * bb,
                                 _MM_HINT_T0);
                __m128 f; /* d_a, d_b or d_a, m_a, d_b, m_b */
                if (kind == W_Q5_0) {
                    const kt_block_q5_0 *a = (const kt_block_q5_0 *)rows[i] + b;
                    const kt_block_q5_0 *c = two ? a + 1 : NULL;
                    w[i] = q5_pair_codes(a->qs, a->qh, c ? c->qs : NULL, c ? c->qh : NULL);
                    f = _mm_cvtph_ps(_mm_setr_epi16((short)a->d, (short)(c ? c->d : 0), 0, 0,
                                                    0, 0, 0, 0));
                    /* s carries the -16, so the sums' factor is d */
                    mv[i] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f),
                                                     _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
                    wd[i] = _mm512_permutexvar_ps(pick01, _mm512_castps128_ps512(f));
                } else {
                    const kt_block_q5_1 *a = (const kt_block_q5_1 *)rows[i] + b;
                    const kt_block_q5_1 *c = two ? a + 1 : NULL;
                    w[i] = q5_pair_codes(a->qs, a->qh, c ? c->qs : NULL, c ? c->qh : NULL);
                    f = _mm_cvtph_ps(_mm_setr_epi16((short)a->d, (short)a->m, (short)(c ? c->d : 0),
                                                    (short)(c ? c->m : 0), 0, 0, 0, 0));
                    mv[i] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f),
                                                     _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3));
                    wd[i] = _mm512_permutexvar_ps(
                        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                        _mm512_castps128_ps512(f));
                }
            }
            if (two)
                pair_dot(kind, RM, TN, 1, w, wd, mv, acc, macc, xg, dg, sg, b);
            else
                pair_dot(kind, RM, TN, 0, w, wd, mv, acc, macc, xg, dg, sg, b);
        }
    } else {
        for (int sb = 0; sb < nb / 8; sb++) {
            __m256 dsc[MAXR], dmn[MAXR];
            __m512 d6[MAXR];
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++) {
                if (TN == 1 && GV_PF)
                    for (size_t off = 0; off < bb; off += 64)
                        _mm_prefetch(rows[i] + (size_t)(GV_PF * RM) * row_bytes +
                                         (size_t)sb * bb + off, _MM_HINT_T0);
                if (kind == KQ_Q4_K) {
                    const kt_block_q4_k *k4 = (const kt_block_q4_k *)rows[i] + sb;
                    kq_scales(k4->scales, k4->d, k4->dmin, &dsc[i], &dmn[i]);
                } else if (kind == KQ_Q5_K) {
                    const kt_block_q5_k *k5 = (const kt_block_q5_k *)rows[i] + sb;
                    kq_scales(k5->scales, k5->d, k5->dmin, &dsc[i], &dmn[i]);
                } else {
                    d6[i] = _mm512_set1_ps(f16(((const kt_block_q6_k *)rows[i] + sb)->d));
                }
                if (kind != KQ_Q6_K) /* the mins are subtracted */
                    dmn[i] = _mm256_sub_ps(_mm256_setzero_ps(), dmn[i]);
            }
            if (kind != KQ_Q6_K) {
                /* mins of the 8 sub-blocks against token t's activation
                 * sums s[(8 sb + j) KCPU_XG + t], j = 0..7, gathered once
                 * for all rows; lanes 8-15 meet zeros */
                const float *s0 = sg + (size_t)sb * 8 * KCPU_XG;
                __m512 slo = _mm512_loadu_ps(s0), shi = _mm512_loadu_ps(s0 + 16);
#pragma GCC unroll 4
                for (int t = 0; t < TN; t++) {
                    __m512 st = _mm512_permutex2var_ps(
                        slo, _mm512_setr_epi32(t, 4 + t, 8 + t, 12 + t, 16 + t, 20 + t, 24 + t,
                                               28 + t, 0, 0, 0, 0, 0, 0, 0, 0), shi);
#pragma GCC unroll 4
                    for (int i = 0; i < RM; i++)
                        acc[i][t] = _mm512_fmadd_ps(_mm512_zextps256_ps512(dmn[i]), st, acc[i][t]);
                }
            }
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
#pragma GCC unroll 4
                for (int i = 0; i < RM; i++) {
                    if (kind == KQ_Q6_K) {
                        const kt_block_q6_k *k6 = (const kt_block_q6_k *)rows[i] + sb;
                        w[i] = q6_pair_codes(k6, p);
                        /* lanes 4g..4g+3 <- scales[4p + g] */
                        int32_t s4;
                        memcpy(&s4, k6->scales + 4 * p, 4);
                        __m128 sc = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(s4)));
                        wd[i] = _mm512_mul_ps(d6[i], _mm512_permutexvar_ps(
                            _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                            _mm512_castps128_ps512(sc)));
                    } else {
                        const kt_block_q4_k *k4 = (const kt_block_q4_k *)rows[i] + sb;
                        const kt_block_q5_k *k5 = (const kt_block_q5_k *)rows[i] + sb;
                        w[i] = kind == KQ_Q4_K ? kq_pair_codes(k4->qs, NULL, p)
                                               : kq_pair_codes(k5->qs, k5->qh, p);
                        wd[i] = _mm512_permutexvar_ps(
                            _mm512_add_epi32(pick01, _mm512_set1_epi32(2 * p)),
                            _mm512_castps256_ps512(dsc[i]));
                    }
                }
                pair_dot(kind, RM, TN, 1, w, wd, mv, acc, macc, xg, dg, sg, sb * 8 + 2 * p);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        float m[4];
        _mm_storeu_ps(m, _mm_add_ps(_mm256_castps256_ps128(macc[i]),
                                    _mm256_extractf128_ps(macc[i], 1)));
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            y[(size_t)(t0 + t) * (size_t)n_rows + (size_t)(r + i)] =
                _mm512_reduce_add_ps(acc[i][t]) + m[t];
    }
}

/* Rows [r0, r1) x all tokens for one kind: MT_RM x MT_TN tiles, gemv
 * GV_RM-row tiles. */
AI void mm_kind(const int kind, const char *W, size_t rb, const kcpu_q8x *xq, float *y,
                int n_rows, int r0, int r1)
{
    if (xq->n_tok == 1) {
        int r = r0;
        for (; r + GV_RM <= r1; r += GV_RM)
            tile512(kind, GV_RM, 1, W, rb, xq, y, n_rows, r, 0);
        for (; r < r1; r++)
            tile512(kind, 1, 1, W, rb, xq, y, n_rows, r, 0);
        return;
    }
    for (int t0 = 0; t0 < xq->n_tok; t0 += MT_TN) {
        int tn = xq->n_tok - t0 < MT_TN ? xq->n_tok - t0 : MT_TN;
        int r = r0;
        for (; r + MT_RM <= r1; r += MT_RM) {
            switch (tn) {
            case 1: tile512(kind, MT_RM, 1, W, rb, xq, y, n_rows, r, t0); break;
            case 2: tile512(kind, MT_RM, 2, W, rb, xq, y, n_rows, r, t0); break;
            case 3: tile512(kind, MT_RM, 3, W, rb, xq, y, n_rows, r, t0); break;
            default: tile512(kind, MT_RM, 4, W, rb, xq, y, n_rows, r, t0); break;
            }
        }
        for (; r < r1; r++) {
            switch (tn) {
            case 1: tile512(kind, 1, 1, W, rb, xq, y, n_rows, r, t0); break;
            case 2: tile512(kind, 1, 2, W, rb, xq, y, n_rows, r, t0); break;
            case 3: tile512(kind, 1, 3, W, rb, xq, y, n_rows, r, t0); break;
            default: tile512(kind, 1, 4, W, rb, xq, y, n_rows, r, t0); break;
            }
        }
    }
}

/* See kcpu_impl.h: Q5_0, Q5_1, Q4_K, Q5_K, Q6_K here, the other quantized
 * types through the AVX2 back end. */
void MM_QUANT_FN(kt_type t, const void *W, size_t row_bytes, const kcpu_q8x *xq, float *y,
                 int n_rows, int r0, int r1)
{
    switch (t) {
    case KT_Q5_0: mm_kind(W_Q5_0, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q5_1: mm_kind(W_Q5_1, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q4_K: mm_kind(KQ_Q4_K, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q5_K: mm_kind(KQ_Q5_K, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q6_K: mm_kind(KQ_Q6_K, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q4_0: case KT_Q4_1: case KT_Q8_0:
        kcpu_avx2_ops.mm_quant(t, W, row_bytes, xq, y, n_rows, r0, r1);
        break;
    case KT_F32: case KT_F16: case KT_BF16:
        break; /* not quantized: kcpu.c never sends them here */
    }
}

#if defined(KCPU_AVX512_VNNI)
/* ---- the repacked matmul (struct kcpu_rp, kcpu_impl.h) ----
 * One vpdpbusd = 16 rows x 4 columns of one token: the 64-byte code vector
 * of a record's step s against the token's 4 activation bytes broadcast to
 * every lane, so after sub / 4 steps each int32 lane holds its row's whole
 * sub-block dot and no horizontal sum is ever needed. Per sub-block and
 * (row group, token) three float ops remain: cvt, x d_x, fma with the
 * scales, plus the bias fma against xs. Tile: NG (1, 2) row groups x TN
 * (1..4) tokens of one activation group (KCPU_XG): 8 int32 + 8 f32
 * accumulators. */
AI void rp_tile(const int NG, const int TN, const struct kcpu_rp *rp, const kcpu_q8x *xq,
                const float *xs, float *y, int g, int t0)
{
    const int sub = rp->sub, nb = xq->nb, n_sb = rp->n_sb;
    __m512 acc[2][MAXT];
#pragma GCC unroll 2
    for (int i = 0; i < NG; i++)
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            acc[i][t] = _mm512_setzero_ps();
    const uint8_t *base = rp->data + (size_t)g * rp->rg_bytes;
    for (int j = 0; j < n_sb; j++) {
        const uint8_t *rec = base + (size_t)j * rp->sb_bytes;
        const int e0 = j * sub;
        const size_t xi0 = kcpu_q8x_index(nb, t0, e0 / KT_QK);
        const int8_t *xb = xq->qs + xi0 * KT_QK + (e0 % KT_QK);
        __m512i dot[2][MAXT];
#pragma GCC unroll 2
        for (int i = 0; i < NG; i++)
#pragma GCC unroll 4
            for (int t = 0; t < TN; t++)
                dot[i][t] = _mm512_setzero_si512();
        for (int s = 0; s < sub / 4; s++) {
            __m512i w[2];
#pragma GCC unroll 2
            for (int i = 0; i < NG; i++)
                w[i] = _mm512_load_si512((const void *)(rec + (size_t)i * rp->rg_bytes + 64 * s));
#pragma GCC unroll 4
            for (int t = 0; t < TN; t++) {
                int32_t v;
                memcpy(&v, xb + t * KT_QK + 4 * s, 4);
                __m512i xv = _mm512_set1_epi32(v);
#pragma GCC unroll 2
                for (int i = 0; i < NG; i++)
                    dot[i][t] = _mm512_dpbusd_epi32(dot[i][t], w[i], xv);
            }
        }
#pragma GCC unroll 2
        for (int i = 0; i < NG; i++) {
            const float *f = (const float *)(rec + (size_t)i * rp->rg_bytes +
                                             (size_t)sub * KCPU_RP_RG);
            __m512 sc = _mm512_load_ps(f), bi = _mm512_load_ps(f + KCPU_RP_RG);
#pragma GCC unroll 4
            for (int t = 0; t < TN; t++) {
                __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][t]),
                                         _mm512_set1_ps(xq->d[xi0 + (size_t)t]));
                acc[i][t] = _mm512_fmadd_ps(v, sc, acc[i][t]);
                acc[i][t] = _mm512_fmadd_ps(
                    bi, _mm512_set1_ps(xs[(size_t)(t0 + t) * (size_t)n_sb + (size_t)j]),
                    acc[i][t]);
            }
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < NG; i++) {
        const int r0 = (g + i) * KCPU_RP_RG;
        const int n = rp->rows - r0 < KCPU_RP_RG ? rp->rows - r0 : KCPU_RP_RG;
        const __mmask16 m = (__mmask16)((1u << n) - 1u);
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            _mm512_mask_storeu_ps(y + (size_t)(t0 + t) * (size_t)rp->rows + (size_t)r0, m,
                                  acc[i][t]);
    }
}

AI void rp_groups(const int TN, const struct kcpu_rp *rp, const kcpu_q8x *xq, const float *xs,
                  float *y, int g0, int g1, int t0)
{
    int g = g0;
    for (; g + 2 <= g1; g += 2)
        rp_tile(2, TN, rp, xq, xs, y, g, t0);
    if (g < g1)
        rp_tile(1, TN, rp, xq, xs, y, g, t0);
}

void kcpu_avx512vnni_mm_rp(const struct kcpu_rp *rp, const kcpu_q8x *xq, const float *xs,
                           float *y, int g0, int g1)
{
    for (int t0 = 0; t0 < xq->n_tok; t0 += KCPU_XG) {
        switch (xq->n_tok - t0 < KCPU_XG ? xq->n_tok - t0 : KCPU_XG) {
        case 1: rp_groups(1, rp, xq, xs, y, g0, g1, t0); break;
        case 2: rp_groups(2, rp, xq, xs, y, g0, g1, t0); break;
        case 3: rp_groups(3, rp, xq, xs, y, g0, g1, t0); break;
        default: rp_groups(4, rp, xq, xs, y, g0, g1, t0); break;
        }
    }
}
#endif
