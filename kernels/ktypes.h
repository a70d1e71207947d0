/*
 * ktypes.h - tensor element types and packed block layouts shared by every
 * kernel layer (ref, cpu, cuda) and by the model loaders.
 *
 * The numeric values of kt_type are the GGUF/GGML type ids, so a type read
 * from a GGUF file can be used directly after kt_type_valid().
 * Packed layouts are pinned with static_assert: they are the on-disk format.
 * Thread-safety: everything here is pure.
 */
#ifndef LKQ_KTYPES_H
#define LKQ_KTYPES_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum {
    KT_F32 = 0,
    KT_F16 = 1,
    KT_Q4_0 = 2,
    KT_Q4_1 = 3,
    KT_Q5_0 = 6,
    KT_Q5_1 = 7,
    KT_Q8_0 = 8,
    KT_Q4_K = 12,
    KT_Q5_K = 13,
    KT_Q6_K = 14,
    KT_BF16 = 30,
} kt_type;

#define KT_QK 32   /* elements per block for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 */
#define KT_QK_K 256 /* elements per super-block for Q4_K, Q5_K, Q6_K */

/* Q4_0: x = d * (q - 8), q in 0..15; element j<16 in low nibble of qs[j],
 * element j+16 in the high nibble of qs[j]. */
typedef struct {
    uint16_t d; /* fp16 */
    uint8_t qs[KT_QK / 2];
} kt_block_q4_0;
static_assert(sizeof(kt_block_q4_0) == 18, "q4_0 layout");

/* Q4_1: x = d * q + m, q in 0..15; nibble order as Q4_0. */
typedef struct {
    uint16_t d; /* fp16 */
    uint16_t m; /* fp16 */
    uint8_t qs[KT_QK / 2];
} kt_block_q4_1;
static_assert(sizeof(kt_block_q4_1) == 20, "q4_1 layout");

/* Q8_0: x = d * q, q in -127..127 */
typedef struct {
    uint16_t d; /* fp16 */
    int8_t qs[KT_QK];
} kt_block_q8_0;
static_assert(sizeof(kt_block_q8_0) == 34, "q8_0 layout");

/* Q5_0: x = d * (q - 16), q in 0..31. The low 4 bits are packed as Q4_0
 * (element j<16 in the low nibble of qs[j], j+16 in the high nibble); bit 4
 * of element j is bit j of qh read as a little-endian uint32. */
typedef struct {
    uint16_t d; /* fp16 */
    uint8_t qh[4];
    uint8_t qs[KT_QK / 2];
} kt_block_q5_0;
static_assert(sizeof(kt_block_q5_0) == 22, "q5_0 layout");
static_assert(offsetof(kt_block_q5_0, qh) == 2 && offsetof(kt_block_q5_0, qs) == 6,
              "q5_0 layout");

/* Q5_1: x = d * q + m, q in 0..31; bits packed as Q5_0. */
typedef struct {
    uint16_t d; /* fp16 */
    uint16_t m; /* fp16 */
    uint8_t qh[4];
    uint8_t qs[KT_QK / 2];
} kt_block_q5_1;
static_assert(sizeof(kt_block_q5_1) == 24, "q5_1 layout");
static_assert(offsetof(kt_block_q5_1, qh) == 4 && offsetof(kt_block_q5_1, qs) == 8,
              "q5_1 layout");

/* K-quants: 256-element super-blocks made of sub-blocks with their own
 * integer scales (and mins), the super-block holding fp16 factors for them.
 *
 * Q4_K: 8 sub-blocks of 32. Sub-block j (elements 32j..32j+31) has a 6-bit
 * scale sc_j and 6-bit min m_j (kt_kq_scale_min), and
 *   x = (d * sc_j) * q - (dmin * m_j), q in 0..15.
 * The codes of sub-blocks 2i and 2i+1 share qs[32i .. 32i+31]: element l of
 * sub-block 2i is the low nibble of qs[32i + l], of 2i+1 the high nibble. */
#define KT_K_SCALE_SIZE 12
typedef struct {
    uint16_t d;    /* fp16, factor of the sub-block scales */
    uint16_t dmin; /* fp16, factor of the sub-block mins */
    uint8_t scales[KT_K_SCALE_SIZE];
    uint8_t qs[KT_QK_K / 2];
} kt_block_q4_k;
static_assert(sizeof(kt_block_q4_k) == 144, "q4_k layout");
static_assert(offsetof(kt_block_q4_k, dmin) == 2 && offsetof(kt_block_q4_k, scales) == 4 &&
              offsetof(kt_block_q4_k, qs) == 16, "q4_k layout");

/* Q5_K: Q4_K with a fifth bit, q in 0..31: bit 4 of element l of sub-block
 * j is bit j of qh[l]. */
typedef struct {
    uint16_t d;    /* fp16 */
    uint16_t dmin; /* fp16 */
    uint8_t scales[KT_K_SCALE_SIZE];
    uint8_t qh[KT_QK_K / 8];
    uint8_t qs[KT_QK_K / 2];
} kt_block_q5_k;
static_assert(sizeof(kt_block_q5_k) == 176, "q5_k layout");
static_assert(offsetof(kt_block_q5_k, scales) == 4 && offsetof(kt_block_q5_k, qh) == 16 &&
              offsetof(kt_block_q5_k, qs) == 48, "q5_k layout");

/* Q6_K: 16 sub-blocks of 16 with signed 8-bit scales, no min:
 *   x = (d * scales[e / 16]) * (q - 32), q in 0..63, element e.
 * The super-block is two halves of 128; in half h (elements 128h + 32k + l,
 * k = 0..3, l = 0..31) the low 4 bits of q are in ql[64h + 32(k&1) + l]
 * (low nibble for k < 2, high nibble for k >= 2) and the top 2 bits are
 * bits 2k, 2k+1 of qh[32h + l]. */
typedef struct {
    uint8_t ql[KT_QK_K / 2];
    uint8_t qh[KT_QK_K / 4];
    int8_t scales[KT_QK_K / 16];
    uint16_t d; /* fp16 */
} kt_block_q6_k;
static_assert(sizeof(kt_block_q6_k) == 210, "q6_k layout");
static_assert(offsetof(kt_block_q6_k, qh) == 128 && offsetof(kt_block_q6_k, scales) == 192 &&
              offsetof(kt_block_q6_k, d) == 208, "q6_k layout");

/* The 6-bit scale *sc and min *m of sub-block j (0..7) of a Q4_K / Q5_K
 * super-block, from its 12 packed bytes: for j < 4 the low 6 bits of
 * scales[j] and scales[j + 4]; for j >= 4 the nibbles of scales[j + 4]
 * (low: scale, high: min) topped with the 2 spare high bits of
 * scales[j - 4] (scale) and scales[j] (min). Part of the format. */
static inline void kt_kq_scale_min(const uint8_t *scales, int j, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = scales[j] & 63;
        *m = scales[j + 4] & 63;
    } else {
        *sc = (uint8_t)((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4));
        *m = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
    }
}

/* Returns 1 when t is a type this project can load. */
static inline int kt_type_valid(uint32_t t)
{
    switch (t) {
    case KT_F32: case KT_F16: case KT_BF16: case KT_Q4_0: case KT_Q4_1:
    case KT_Q5_0: case KT_Q5_1: case KT_Q8_0: case KT_Q4_K: case KT_Q5_K:
    case KT_Q6_K:
        return 1;
    }
    return 0;
}

/* Names of the loadable types, for error messages. */
#define KT_SUPPORTED_NAMES "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K"

/* 1 for the block-quantized types (the ones whose matmul quantizes x). */
static inline int kt_is_quant(kt_type t)
{
    return t != KT_F32 && t != KT_F16 && t != KT_BF16;
}

/* Elements per block (1 for plain float types). */
static inline int64_t kt_block_elems(kt_type t)
{
    switch (t) {
    case KT_Q4_0: case KT_Q4_1: case KT_Q5_0: case KT_Q5_1: case KT_Q8_0:
        return KT_QK;
    case KT_Q4_K: case KT_Q5_K: case KT_Q6_K:
        return KT_QK_K;
    case KT_F32: case KT_F16: case KT_BF16:
        return 1;
    }
    return 1;
}

/* Bytes per block. */
static inline size_t kt_block_bytes(kt_type t)
{
    switch (t) {
    case KT_F32: return 4;
    case KT_F16: case KT_BF16: return 2;
    case KT_Q4_0: return sizeof(kt_block_q4_0);
    case KT_Q4_1: return sizeof(kt_block_q4_1);
    case KT_Q5_0: return sizeof(kt_block_q5_0);
    case KT_Q5_1: return sizeof(kt_block_q5_1);
    case KT_Q8_0: return sizeof(kt_block_q8_0);
    case KT_Q4_K: return sizeof(kt_block_q4_k);
    case KT_Q5_K: return sizeof(kt_block_q5_k);
    case KT_Q6_K: return sizeof(kt_block_q6_k);
    }
    return 0;
}

/* Bytes of a row of n elements; n must be a multiple of kt_block_elems(t). */
static inline size_t kt_row_bytes(kt_type t, int64_t n)
{
    return (size_t)(n / kt_block_elems(t)) * kt_block_bytes(t);
}

static inline const char *kt_name(kt_type t)
{
    switch (t) {
    case KT_F32: return "F32";
    case KT_F16: return "F16";
    case KT_Q4_0: return "Q4_0";
    case KT_Q4_1: return "Q4_1";
    case KT_Q5_0: return "Q5_0";
    case KT_Q5_1: return "Q5_1";
    case KT_Q8_0: return "Q8_0";
    case KT_Q4_K: return "Q4_K";
    case KT_Q5_K: return "Q5_K";
    case KT_Q6_K: return "Q6_K";
    case KT_BF16: return "BF16";
    }
    return "?";
}

/* IEEE half <-> float, exact for all halfs, round-to-nearest-even the other
 * way (inf/nan preserved). Plain C so every layer agrees bit for bit. */
static inline float kt_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t kt_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (absx < 0x38800000u) { /* below 2^-14: subnormal half or zero */
        if (absx < 0x33000000u) /* < 2^-25 rounds to zero */
            return (uint16_t)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* value = m * 2^(e-150); unit 2^-24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    /* normal: rebias exponent, round mantissa to 10 bits (nearest even) */
    uint32_t r = absx - ((127u - 15u) << 23);
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}

static inline float kt_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif
