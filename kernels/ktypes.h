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
    KT_Q8_0 = 8,
    KT_BF16 = 30,
} kt_type;

#define KT_QK 32 /* elements per block for Q4_0, Q4_1, Q8_0 */

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

/* Returns 1 when t is a type this project can load. */
static inline int kt_type_valid(uint32_t t)
{
    return t == KT_F32 || t == KT_F16 || t == KT_Q4_0 || t == KT_Q4_1 ||
           t == KT_Q8_0 || t == KT_BF16;
}

/* Elements per block (1 for plain float types). */
static inline int64_t kt_block_elems(kt_type t)
{
    switch (t) {
    case KT_Q4_0: case KT_Q4_1: case KT_Q8_0: return KT_QK;
    default: return 1;
    }
}

/* Bytes per block. */
static inline size_t kt_block_bytes(kt_type t)
{
    switch (t) {
    case KT_F32: return 4;
    case KT_F16: case KT_BF16: return 2;
    case KT_Q4_0: return sizeof(kt_block_q4_0);
    case KT_Q4_1: return sizeof(kt_block_q4_1);
    case KT_Q8_0: return sizeof(kt_block_q8_0);
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
    case KT_Q8_0: return "Q8_0";
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
