/*
 * kcpu_kq_simd.h - AVX2-level helpers to unpack the K-quant weight blocks
 * (kernels/ktypes.h), shared by kcpu_avx2_kq.c and kcpu_avx512.c. Include
 * only from files compiled with at least -mavx2 -mfma -mf16c.
 * Thread-safety: pure inline functions.
 */
#ifndef LKQ_KCPU_KQ_SIMD_H
#define LKQ_KCPU_KQ_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cpu/kcpu_avx2_simd.h"
#include "kernels/ktypes.h"

enum { KQ_Q4_K, KQ_Q5_K, KQ_Q6_K };

/* The 8 scales and mins of a Q4_K / Q5_K super-block (kt_kq_scale_min) as
 * f32 vectors: *dsc = d * sc_j, *dm = dmin * m_j, lane j. */
AI void kq_scales(const uint8_t *scales, uint16_t d, uint16_t dmin, __m256 *dsc, __m256 *dm)
{
    uint32_t a[3];
    memcpy(a, scales, 12);
    /* bytes of a[0]: sc_0..3 in the low 6 bits, their top 2 bits are the
     * high bits of sc_4..7; a[1] likewise for the mins; a[2]: nibbles of
     * sc_4..7 (low) and m_4..7 (high). (x >> 2) & 0x30 moves bits 6-7 of
     * every byte to bits 4-5 of the same byte. */
    uint64_t sc = (uint64_t)(a[0] & 0x3f3f3f3fu) |
                  (uint64_t)((a[2] & 0x0f0f0f0fu) | ((a[0] >> 2) & 0x30303030u)) << 32;
    uint64_t mn = (uint64_t)(a[1] & 0x3f3f3f3fu) |
                  (uint64_t)(((a[2] >> 4) & 0x0f0f0f0fu) | ((a[1] >> 2) & 0x30303030u)) << 32;
    __m256 fsc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)));
    __m256 fmn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn)));
    *dsc = _mm256_mul_ps(_mm256_set1_ps(f16(d)), fsc);
    *dm = _mm256_mul_ps(_mm256_set1_ps(f16(dmin)), fmn);
}

/* Codes of sub-blocks 2p (low nibbles) and 2p+1 (high nibbles) of a Q4_K /
 * Q5_K super-block, bytes in element order; Q5_K ORs in bit j of qh[l]. */
AI void kq_codes_pair(const int kind, const uint8_t *qs, const uint8_t *qh, int p,
                      __m256i *lo, __m256i *hi)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (kind == KQ_Q5_K) {
        const __m256i one = _mm256_set1_epi8(1);
        __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        /* bit j of every byte -> 0x10 (16-bit shifts: bits that cross into
         * the neighbouring byte are masked off) */
        __m256i b0 = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * p)), one);
        __m256i b1 = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * p + 1)), one);
        *lo = _mm256_or_si256(*lo, _mm256_slli_epi16(b0, 4));
        *hi = _mm256_or_si256(*hi, _mm256_slli_epi16(b1, 4));
    }
}

/* Signed codes q - 32 of sub-block j (elements 32j..32j+31) of a Q6_K
 * super-block. */
AI __m256i q6_codes(const kt_block_q6_k *b, int j)
{
    const int h = j / 4, k = j % 4;
    __m256i l = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32 * (k & 1)));
    __m256i u = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
    l = _mm256_and_si256(_mm256_srl_epi16(l, _mm_cvtsi32_si128(4 * (k >> 1))),
                         _mm256_set1_epi8(0x0f));
    u = _mm256_and_si256(_mm256_srl_epi16(u, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
    __m256i q = _mm256_or_si256(l, _mm256_slli_epi16(u, 4));
    return _mm256_sub_epi8(q, _mm256_set1_epi8(32));
}

/* int16 lanes 0-7 = scales[2j], lanes 8-15 = scales[2j+1] of a Q6_K block. */
AI __m256i q6_scale_pair(const kt_block_q6_k *b, int j)
{
    return _mm256_setr_m128i(_mm_set1_epi16(b->scales[2 * j]),
                             _mm_set1_epi16(b->scales[2 * j + 1]));
}

/* Unsigned codes q (0..63) of sub-block j of a Q6_K super-block. */
AI __m256i q6_codes_u(const kt_block_q6_k *b, int j)
{
    return _mm256_add_epi8(q6_codes(b, j), _mm256_set1_epi8(32));
}

#endif
