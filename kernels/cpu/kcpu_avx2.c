/*
 * kcpu_avx2.c - AVX2 + FMA + F16C back end of kcpu.
 *
 * Compiled on its own with -mavx2 -mfma -mf16c; kcpu.c calls into it only
 * after checking the CPU at run time, so nothing here may run on its own.
 *
 * Matmul: tiles of RM weight rows x TN tokens. A weight block (32 elements)
 * is unpacked once per tile and used against TN tokens, so prompt processing
 * is compute-bound; single tokens (gemv) use small row tiles that share each
 * activation block across rows, with software prefetch of the rows ahead so
 * the weight stream from DRAM keeps up (gemv is bandwidth-bound).
 * Quantized weights meet int8 activations (see kcpu_impl.h): maddubs
 * (u8 x s8 -> s16 pairs) then madd with ones (-> s32), converted to f32 and
 * scaled per block. Q4 / Q5 codes are used as unsigned 0..15 / 0..31 (the
 * fifth bit ORed in), the "-8" / "-16" of Q4_0 / Q5_0 and the min of Q4_1 /
 * Q5_1 are applied through the activation block sums
 * (w = d*q + m  =>  sum w*x = d*dx*sum(q*qx) + m*sx). Products stay within
 * int16: |2 * 31 * 127| < 2^15. The K-quants are in kcpu_avx2_kq.c.
 *
 * Threading: pure functions; the front end splits the work.
 */
#include "kernels/cpu/kcpu_avx2_simd.h"
#include "kernels/cpu/kcpu_impl.h"

#include <immintrin.h>
#include <math.h>


/* Tile shapes: multi-token MT_RM rows x MT_TN tokens, gemv GV_RM rows, and
 * the gemv software prefetch distance in tiles (0: off). Chosen by
 * measurement on Zen 3 (see bench/bench_kernels.c): 4x4 tiles keep the
 * multiply ports busy despite some accumulator spills; 2-row gemv tiles with
 * a prefetch 4 rows ahead stream from DRAM best. */
#ifndef MT_RM
#define MT_RM 4
#endif
#define MT_TN KCPU_XG
#ifndef GV_RM
#define GV_RM 2
#endif
#ifndef GV_PF
#define GV_PF 2
#endif
#define MAXR 4
#define MAXT 4

enum { K_Q4_0, K_Q4_1, K_Q8_0, K_Q5_0, K_Q5_1 };
enum { K_F32, K_F16, K_BF16 };

/* ---- activation quantization ---- */

static void av_quantize_x(const float *x, int n_cols, float smul, int8_t *qs,
                          float *d, float *s)
{
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < n_cols / KT_QK; b++) {
        const float *xb = x + b * KT_QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v0, absm), _mm256_and_ps(v1, absm)),
            _mm256_max_ps(_mm256_and_ps(v2, absm), _mm256_and_ps(v3, absm)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float db = _mm_cvtss_f32(h) / 127.0f;
        __m256 id = _mm256_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
        /* cvtps rounds half to even under the default MXCSR, like nearbyintf */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(qs + b * KCPU_XG * KT_QK),
                            _mm256_permutevar8x32_epi32(p, perm));
        d[b * KCPU_XG] = db;
        s[b * KCPU_XG] = smul * db * (float)_mm_cvtsi128_si32(s4);
    }
}

/* ---- quantized matmul ---- */

/* 32 nibbles of a Q4 block as bytes 0..15, in element order. */
AI __m256i unpack_q4(const uint8_t *qs)
{
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    v = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

/* The fifth bits of a Q5_0 / Q5_1 block as 0x10 in byte j for bit j of qh
 * (little-endian uint32), to OR into unpack_q4's codes. */
AI __m256i unpack_q5_high(const uint8_t *qh)
{
    uint32_t h;
    memcpy(&h, qh, 4);
    /* byte j <- byte j/8 of h (shuffle works per 128-bit lane; both lanes
     * hold h), then test bit j%8 */
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
                                    _mm256_setr_epi64x(0, 0x0101010101010101LL,
                                                       0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* fp16 scale at p, converted and broadcast to 8 lanes */
AI __m256 bcast_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_set1_epi16((short)*p));
}

/* y for rows r..r+RM-1, tokens t0..t0+TN-1 (t0 a multiple of KCPU_XG; RM,
 * TN compile-time after inlining, so the accumulators live in registers).
 * The block-sum term (Q4 offsets) is accumulated for all KCPU_XG tokens of
 * the group at once in a 128-bit vector; lanes >= TN are ignored. */
AI void tile_q(const int kind, const int RM, const int TN, const char *W,
               size_t row_bytes, const kcpu_q8x *xq, float *y, int n_rows,
               int r, int t0)
{
    __m256 acc[MAXR][MAXT];
    __m128 macc[MAXR];
    const __m256i ones = _mm256_set1_epi16(1);
    const int nb = xq->nb;
    const size_t g0 = (size_t)(t0 / KCPU_XG) * (size_t)nb * KCPU_XG;
    const int8_t *xg = xq->qs + g0 * KT_QK;
    const float *dg = xq->d + g0;
    const float *sg = xq->s + g0;
    const char *rows[MAXR];
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        rows[i] = W + (size_t)(r + i) * row_bytes;
        macc[i] = _mm_setzero_ps();
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            acc[i][t] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        __m256i wq[MAXR], wsg[MAXR];
        __m256 wd[MAXR];
        __m128 s4 = kind == K_Q8_0 ? _mm_setzero_ps() : _mm_loadu_ps(sg + (size_t)b * KCPU_XG);
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++) {
            if (TN == 1 && GV_PF) /* gemv: stream the weights ahead */
                _mm_prefetch(rows[i] + (size_t)(GV_PF * RM) * row_bytes +
                             (size_t)b * (kind == K_Q8_0   ? sizeof(kt_block_q8_0)
                                          : kind == K_Q4_1 ? sizeof(kt_block_q4_1)
                                          : kind == K_Q5_0 ? sizeof(kt_block_q5_0)
                                          : kind == K_Q5_1 ? sizeof(kt_block_q5_1)
                                                           : sizeof(kt_block_q4_0)),
                             _MM_HINT_T0);
            if (kind == K_Q5_0) {
                const kt_block_q5_0 *blk = (const kt_block_q5_0 *)rows[i] + b;
                wq[i] = _mm256_or_si256(unpack_q4(blk->qs), unpack_q5_high(blk->qh));
                wd[i] = bcast_f16(&blk->d);
                /* s carries the -16 (smul), so the factor is d */
                macc[i] = _mm_fmadd_ps(_mm256_castps256_ps128(wd[i]), s4, macc[i]);
            } else if (kind == K_Q5_1) {
                const kt_block_q5_1 *blk = (const kt_block_q5_1 *)rows[i] + b;
                uint32_t dm_bits;
                memcpy(&dm_bits, blk, 4); /* d and m side by side */
                __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm_bits));
                wq[i] = _mm256_or_si256(unpack_q4(blk->qs), unpack_q5_high(blk->qh));
                wd[i] = _mm256_broadcastss_ps(dm);
                macc[i] = _mm_fmadd_ps(_mm_permute_ps(dm, 0x55), s4, macc[i]);
            } else if (kind == K_Q4_0) {
                const kt_block_q4_0 *blk = (const kt_block_q4_0 *)rows[i] + b;
                wq[i] = unpack_q4(blk->qs);
                wd[i] = bcast_f16(&blk->d);
                /* s carries the -8 (smul), so the factor is d */
                macc[i] = _mm_fmadd_ps(_mm256_castps256_ps128(wd[i]), s4, macc[i]);
            } else if (kind == K_Q4_1) {
                const kt_block_q4_1 *blk = (const kt_block_q4_1 *)rows[i] + b;
                uint32_t dm_bits;
                memcpy(&dm_bits, blk, 4); /* d and m side by side */
                __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm_bits));
                wq[i] = unpack_q4(blk->qs);
                wd[i] = _mm256_broadcastss_ps(dm);
                macc[i] = _mm_fmadd_ps(_mm_permute_ps(dm, 0x55), s4, macc[i]);
            } else {
                const kt_block_q8_0 *blk = (const kt_block_q8_0 *)rows[i] + b;
                wsg[i] = _mm256_loadu_si256((const __m256i *)blk->qs);
                wq[i] = _mm256_sign_epi8(wsg[i], wsg[i]); /* |w| as u8 */
                wd[i] = bcast_f16(&blk->d);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++) {
            __m256i xv = _mm256_load_si256((const __m256i *)(xg + ((size_t)b * KCPU_XG + (size_t)t) * KT_QK));
            __m256 dx = _mm256_broadcast_ss(dg + (size_t)b * KCPU_XG + (size_t)t);
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++) {
                __m256i xs = kind == K_Q8_0 ? _mm256_sign_epi8(xv, wsg[i]) : xv;
                __m256i pr = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[i], xs), ones);
                acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_mul_ps(wd[i], dx), acc[i][t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        float m[4];
        _mm_storeu_ps(m, macc[i]);
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            y[(size_t)(t0 + t) * (size_t)n_rows + (size_t)(r + i)] = hsum8(acc[i][t]) + m[t];
    }
}

/* Rows [r0, r1) x all tokens for one weight kind: MT_RM x MT_TN tiles (the
 * last token group and the last rows with smaller tiles); n_tok == 1 uses
 * GV_RM-row tiles. */
AI void mm_quant_kind(const int kind, const char *W, size_t rb,
                      const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1)
{
    if (xq->n_tok == 1) {
        int r = r0;
        for (; r + GV_RM <= r1; r += GV_RM)
            tile_q(kind, GV_RM, 1, W, rb, xq, y, n_rows, r, 0);
        for (; r < r1; r++)
            tile_q(kind, 1, 1, W, rb, xq, y, n_rows, r, 0);
        return;
    }
    for (int t0 = 0; t0 < xq->n_tok; t0 += MT_TN) {
        int tn = xq->n_tok - t0 < MT_TN ? xq->n_tok - t0 : MT_TN;
        int r = r0;
        for (; r + MT_RM <= r1; r += MT_RM) {
            switch (tn) {
            case 1: tile_q(kind, MT_RM, 1, W, rb, xq, y, n_rows, r, t0); break;
            case 2: tile_q(kind, MT_RM, 2, W, rb, xq, y, n_rows, r, t0); break;
            case 3: tile_q(kind, MT_RM, 3, W, rb, xq, y, n_rows, r, t0); break;
            default: tile_q(kind, MT_RM, 4, W, rb, xq, y, n_rows, r, t0); break;
            }
        }
        for (; r < r1; r++) {
            switch (tn) {
            case 1: tile_q(kind, 1, 1, W, rb, xq, y, n_rows, r, t0); break;
            case 2: tile_q(kind, 1, 2, W, rb, xq, y, n_rows, r, t0); break;
            case 3: tile_q(kind, 1, 3, W, rb, xq, y, n_rows, r, t0); break;
            default: tile_q(kind, 1, 4, W, rb, xq, y, n_rows, r, t0); break;
            }
        }
    }
}

/* Q4_K / Q5_K / Q6_K are in kcpu_avx2_kq.c. */
static void av_mm_quant(kt_type t, const void *W, size_t row_bytes,
                        const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1)
{
    switch (t) {
    case KT_Q4_0: mm_quant_kind(K_Q4_0, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q4_1: mm_quant_kind(K_Q4_1, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q5_0: mm_quant_kind(K_Q5_0, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q5_1: mm_quant_kind(K_Q5_1, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q8_0: mm_quant_kind(K_Q8_0, W, row_bytes, xq, y, n_rows, r0, r1); break;
    case KT_Q4_K: case KT_Q5_K: case KT_Q6_K:
        kcpu_avx2_mm_kq(t, W, row_bytes, xq, y, n_rows, r0, r1);
        break;
    case KT_F32: case KT_F16: case KT_BF16:
        break; /* not quantized: kcpu.c never sends them here */
    }
}

/* ---- float-weight matmul ---- */

AI __m256 load_w8(const int kind, const char *row, int j)
{
    if (kind == K_F32)
        return _mm256_loadu_ps((const float *)row + j);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + j));
    if (kind == K_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AI float load_w1(const int kind, const char *row, int j)
{
    if (kind == K_F32)
        return ((const float *)row)[j];
    uint16_t h = ((const uint16_t *)row)[j];
    return kind == K_F16 ? f16(h) : kt_bf16_to_f32(h);
}

AI void tile_f(const int kind, const int RM, const int TN, const char *W,
               size_t row_bytes, const float *x, int n_cols, float *y,
               int n_rows, int r, int t0)
{
    __m256 acc[MAXR][MAXT];
    const float *xt = x + (size_t)t0 * (size_t)n_cols;
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++)
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++)
            acc[i][t] = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n_cols; j += 8) {
        __m256 w[MAXR];
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++)
            w[i] = load_w8(kind, W + (size_t)(r + i) * row_bytes, j);
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++) {
            __m256 xv = _mm256_loadu_ps(xt + (size_t)t * (size_t)n_cols + j);
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++)
                acc[i][t] = _mm256_fmadd_ps(w[i], xv, acc[i][t]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++) {
        const char *row = W + (size_t)(r + i) * row_bytes;
#pragma GCC unroll 4
        for (int t = 0; t < TN; t++) {
            float s = hsum8(acc[i][t]);
            for (int jj = j; jj < n_cols; jj++)
                s += load_w1(kind, row, jj) * xt[(size_t)t * (size_t)n_cols + jj];
            y[(size_t)(t0 + t) * (size_t)n_rows + (size_t)(r + i)] = s;
        }
    }
}

/* As mm_quant_kind, for float weights. */
AI void mm_float_kind(const int kind, const char *W, size_t rb, const float *x,
                      int n_cols, int n_tok, float *y, int n_rows, int r0, int r1)
{
    if (n_tok == 1) {
        int r = r0;
        for (; r + GV_RM <= r1; r += GV_RM)
            tile_f(kind, GV_RM, 1, W, rb, x, n_cols, y, n_rows, r, 0);
        for (; r < r1; r++)
            tile_f(kind, 1, 1, W, rb, x, n_cols, y, n_rows, r, 0);
        return;
    }
    for (int t0 = 0; t0 < n_tok; t0 += MT_TN) {
        int tn = n_tok - t0 < MT_TN ? n_tok - t0 : MT_TN;
        int r = r0;
        for (; r + MT_RM <= r1; r += MT_RM) {
            switch (tn) {
            case 1: tile_f(kind, MT_RM, 1, W, rb, x, n_cols, y, n_rows, r, t0); break;
            case 2: tile_f(kind, MT_RM, 2, W, rb, x, n_cols, y, n_rows, r, t0); break;
            case 3: tile_f(kind, MT_RM, 3, W, rb, x, n_cols, y, n_rows, r, t0); break;
            default: tile_f(kind, MT_RM, 4, W, rb, x, n_cols, y, n_rows, r, t0); break;
            }
        }
        for (; r < r1; r++) {
            switch (tn) {
            case 1: tile_f(kind, 1, 1, W, rb, x, n_cols, y, n_rows, r, t0); break;
            case 2: tile_f(kind, 1, 2, W, rb, x, n_cols, y, n_rows, r, t0); break;
            case 3: tile_f(kind, 1, 3, W, rb, x, n_cols, y, n_rows, r, t0); break;
            default: tile_f(kind, 1, 4, W, rb, x, n_cols, y, n_rows, r, t0); break;
            }
        }
    }
}

static void av_mm_float(kt_type t, const void *W, size_t row_bytes,
                        const float *x, int n_cols, int n_tok, float *y,
                        int n_rows, int r0, int r1)
{
    if (t == KT_F32)
        mm_float_kind(K_F32, W, row_bytes, x, n_cols, n_tok, y, n_rows, r0, r1);
    else if (t == KT_F16)
        mm_float_kind(K_F16, W, row_bytes, x, n_cols, n_tok, y, n_rows, r0, r1);
    else
        mm_float_kind(K_BF16, W, row_bytes, x, n_cols, n_tok, y, n_rows, r0, r1);
}

/* ---- small ops ---- */

static void av_softmax(float *x, int n)
{
    if (n <= 0)
        return;
    int i = 0;
    __m256 mv = _mm256_set1_ps(x[0]);
    for (; i + 8 <= n; i += 8)
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    for (; i < n; i++)
        mx = fmaxf(mx, x[i]);
    __m256 vmx = _mm256_set1_ps(mx), vs = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmx));
        _mm256_storeu_ps(x + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum8(vs);
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    for (; i < n; i++)
        x[i] *= 1.0f / sum;
}

static void av_rmsnorm(float *out, const float *x, const float *w, int n,
                       float eps)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 v0 = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
    }
    float ss = hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++)
        ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv),
                                                _mm256_loadu_ps(w + i)));
    for (; i < n; i++)
        out[i] = x[i] * inv * w[i];
}

static void av_swiglu(float *gate, const float *up, int n)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++)
        gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* gelu_tanh(g) = g/2 (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3),
 * is g sigmoid(2u) = g / (1 + e^(-2u)) - the swiglu form with 2u, so it
 * costs one exp8 per 8 elements instead of a libm tanhf per element. For
 * g << 0, e^(-2u) saturates at e^88 (exp8's clamp) and the result is a
 * tiny -0-ish value, as tanh's -1 gives. */
static void av_geglu(float *gate, const float *up, int n)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 m2k = _mm256_set1_ps(-2.0f * 0.7978845608f);
    const __m256 c3 = _mm256_set1_ps(0.044715f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 g2 = _mm256_mul_ps(g, g);
        __m256 m2u = _mm256_mul_ps(_mm256_mul_ps(m2k, g), _mm256_fmadd_ps(c3, g2, one));
        __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(m2u)));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    const float k = 0.7978845608f;
    for (; i < n; i++) {
        float g = gate[i];
        gate[i] = 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * up[i];
    }
}

/* Bit exact with kref_dequant_row (same float operations, no FMA). */
static void av_dequant_row(kt_type t, const void *row, float *out, int64_t n)
{
    if (t == KT_F32 || t == KT_F16 || t == KT_BF16) {
        int kind = t == KT_F32 ? K_F32 : t == KT_F16 ? K_F16 : K_BF16;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(out + j, load_w8(kind, row, (int)j));
        for (; j < n; j++)
            out[j] = load_w1(kind, row, (int)j);
        return;
    }
    if (t == KT_Q4_K || t == KT_Q5_K || t == KT_Q6_K) {
        kcpu_avx2_dequant_kq(t, row, out, n);
        return;
    }
    for (int64_t b = 0; b < n / KT_QK; b++) {
        __m256i q;
        float dd, mm = 0.0f;
        if (t == KT_Q5_0) {
            const kt_block_q5_0 *blk = (const kt_block_q5_0 *)row + b;
            q = _mm256_or_si256(unpack_q4(blk->qs), unpack_q5_high(blk->qh));
            q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
            dd = f16(blk->d);
        } else if (t == KT_Q5_1) {
            const kt_block_q5_1 *blk = (const kt_block_q5_1 *)row + b;
            q = _mm256_or_si256(unpack_q4(blk->qs), unpack_q5_high(blk->qh));
            dd = f16(blk->d);
            mm = f16(blk->m);
        } else if (t == KT_Q4_0) {
            const kt_block_q4_0 *blk = (const kt_block_q4_0 *)row + b;
            q = _mm256_sub_epi8(unpack_q4(blk->qs), _mm256_set1_epi8(8));
            dd = f16(blk->d);
        } else if (t == KT_Q4_1) {
            const kt_block_q4_1 *blk = (const kt_block_q4_1 *)row + b;
            q = unpack_q4(blk->qs);
            dd = f16(blk->d);
            mm = f16(blk->m);
        } else { /* Q8_0 */
            const kt_block_q8_0 *blk = (const kt_block_q8_0 *)row + b;
            q = _mm256_loadu_si256((const __m256i *)blk->qs);
            dd = f16(blk->d);
        }
        __m256 vd = _mm256_set1_ps(dd), vm = _mm256_set1_ps(mm);
        __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        __m128i parts[4] = { lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8) };
        for (int g = 0; g < 4; g++) {
            __m256 f = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[g])));
            if (t == KT_Q4_1 || t == KT_Q5_1)
                f = _mm256_add_ps(f, vm);
            _mm256_storeu_ps(out + b * KT_QK + 8 * g, f);
        }
    }
}

static void av_f32_to_f16(uint16_t *dst, const float *src, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = kt_f32_to_f16(src[i]);
}

/* The AVX2 table, and the AVX-512 ones that differ from it only in the
 * quantized matmul (kcpu_impl.h). */
#define AVX2_OPS(name_, mm_quant_)                                                    \
    {                                                                                 \
        .name = name_, .quantize_x = av_quantize_x, .mm_quant = mm_quant_,            \
        .mm_float = av_mm_float, .attn_item = kcpu_avx2_attn_item,                    \
        .attn_seg_item = kcpu_avx2_attn_seg_item, .rmsnorm = av_rmsnorm,              \
        .softmax = av_softmax, .swiglu = av_swiglu, .geglu = av_geglu,                \
        .dequant_row = av_dequant_row, .f32_to_f16 = av_f32_to_f16,                   \
    }

const kcpu_ops kcpu_avx2_ops = AVX2_OPS("avx2", av_mm_quant);
#if defined(LKQ_HAVE_AVX512)
const kcpu_ops kcpu_avx512_ops = AVX2_OPS("avx512", kcpu_avx512_mm_quant);
const kcpu_ops kcpu_avx512vnni_ops = AVX2_OPS("avx512vnni", kcpu_avx512vnni_mm_quant);
#endif
