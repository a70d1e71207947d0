/*
 * kvq.h - the LiveKVQuant-P cache math (../shared/DESIGN.md §4) shared by
 * every kernel layer: the packed layout of one quantized KV block, the
 * clipped-EMA range tracking (Eq. 3-2, 3-3), block quantization with FP16
 * outliers (Eq. 3-4), and attention over a history made of segments of
 * different storage kinds (INT4 blocks, FP16 staging, the exact f32 chunk).
 *
 * Reference implementations live in kernels/ref (kvq_ref.c,
 * kref_attn_seg.c); the optimized attention in kernels/cpu. All functions
 * here are pure and thread-safe (they write only through their arguments).
 *
 * Notation: T = block_tokens, D = kv_dim = n_kv_heads * head_dim,
 * G = v_group (divides head_dim). Element (t, c) of a block is token t,
 * channel c (channel c belongs to KV head c / head_dim). b bits per code
 * (k_bits for K, v_bits for V; b in {2, 3, 4, 8}, default 4), levels
 * 0 .. 2^b - 1.
 */
#ifndef LKQ_KVQ_H
#define LKQ_KVQ_H

#include <stddef.h>
#include <stdint.h>

#define KVQ_LEVELS 15 /* 2^4 - 1: the levels of the default width */
#define KVQ_EPS 1e-6f /* smallest range width: s = max(hi - lo, eps) / levels */

/* ---- code widths ----------------------------------------------------------
 * Codes of b bits are packed as one little-endian bit stream per tensor:
 * element i occupies bits [i*b, i*b + b) counted from bit 0 of byte 0
 * (low bits first), so 2 and 4 bits never straddle a byte, 8 bits are
 * bytes, and 3 bits pack 8 codes in 3 bytes. Widths outside {2, 3, 4, 8}
 * are refused by kvq_layout_init_bits. int3 needs v_group (hence head_dim
 * and kv_dim) a multiple of 8, so that every head and group starts on a
 * whole 3-byte unit (the SIMD and CUDA readers rely on it). */
#define KVQ_BITS_OK(b) ((b) == 2 || (b) == 3 || (b) == 4 || (b) == 8)
#define KVQ_LEVELS_OF(b) ((1 << (b)) - 1)
/* bytes of n codes of b bits */
#define KVQ_CODE_BYTES(n, b) (((size_t)(n) * (size_t)(b) + 7) / 8)

/* Code i of a b-bit stream (b <= 8; reads the second byte only when the
 * code straddles it). */
static inline int kvq_get_code(const uint8_t *q, size_t i, int b)
{
    size_t bit = i * (size_t)b;
    unsigned sh = (unsigned)(bit & 7), v = q[bit >> 3];
    if (sh + (unsigned)b > 8)
        v |= (unsigned)q[(bit >> 3) + 1] << 8;
    return (int)((v >> sh) & (unsigned)KVQ_LEVELS_OF(b));
}

/* ORs code (0 .. 2^b - 1) into slot i of a zeroed b-bit stream. */
static inline void kvq_put_code(uint8_t *q, size_t i, int b, int code)
{
    size_t bit = i * (size_t)b;
    unsigned sh = (unsigned)(bit & 7), v = (unsigned)code << sh;
    q[bit >> 3] |= (uint8_t)v;
    if (sh + (unsigned)b > 8)
        q[(bit >> 3) + 1] |= (uint8_t)(v >> 8);
}

/* How keys are grouped for their scale/zero. */
typedef enum {
    KVQ_K_PER_CHANNEL = 0, /* s,z per channel from the EMA range (default) */
    KVQ_K_PER_TOKEN = 1,   /* s,z per (token, group of G) from min/max like V
                              (the naive baseline; no EMA used for K) */
} kvq_k_mode;

/* Header at the start of every quantized layer-block. */
typedef struct {
    uint32_t n_tok;     /* tokens stored (<= T) */
    uint32_t n_kout;    /* K outliers stored */
    uint32_t n_vout;    /* V outliers stored */
    uint32_t n_clamped; /* values outside the range that did not fit the
                           outlier budget (clamped to the range) */
} kvq_block_hdr;

/* Byte layout of one quantized layer-block (all offsets from the block
 * base, each region 8-byte aligned):
 *   hdr                          kvq_block_hdr
 *   kq  [T * D / 2]              K codes, token-major, element (t,c) at
 *                                nibble t*D + c (low nibble = even index)
 *   vq  [T * D / 2]              V codes, same layout
 *   ks  [n_ksnap] fp16, kz [n_ksnap] zeros      K scale / zero snapshot:
 *        per channel (n_ksnap = D) or per (token, group) (n_ksnap = T*D/G,
 *        index t*(D/G) + c/G)
 *   vs  [T*D/G] fp16, vz [T*D/G] zeros          V scale / zero per (token, group)
 *        zeros are 4-bit (two per byte, low nibble first: kvq_zero_at) for
 *        codes of up to 4 bits, bytes for 8-bit codes (k_zbits / v_zbits)
 *   kout_idx [out_cap] uint16 or uint32, kout_val [out_cap] fp16   K
 *        outliers: element index t*D + c (16 bits when T*D <= 65536, e.g.
 *        SmolLM2 and Gemma-3 at T = 128; else 32: idx_bytes) and its exact
 *        value (as FP16)
 *   vout_idx [out_cap], vout_val [out_cap]   V outliers, likewise
 * Dequantization: x = s * (q - z), except outliers, which are exact.
 * An outlier's dense slot holds the clamped code (0 or 2^b - 1). */
typedef struct {
    int block_tokens;   /* T */
    int k_bits, v_bits; /* code widths, each in {2, 3, 4, 8} */
    int kv_dim;         /* D */
    int head_dim;
    int v_group;        /* G */
    kvq_k_mode k_mode;
    int out_cap;        /* outlier slots per tensor (K and V each) */
    int idx_bytes;      /* bytes of an outlier index: 2 when T*D <= 65536, else 4 */
    int k_zbits, v_zbits; /* bits of a stored zero: 4 (codes <= 4 bits) or 8 */
    int n_ksnap;
    size_t off_kq, off_vq, off_ks, off_kz, off_vs, off_vz;
    size_t off_kout_idx, off_kout_val, off_vout_idx, off_vout_val;
    size_t bytes;       /* one layer-block, multiple of 8 */
    /* bytes by kind, for accounting (sum <= bytes; the rest is padding
     * and the header) */
    size_t bytes_dense, bytes_scales, bytes_outliers;
} kvq_layout;

/* Fills L. out_cap = ceil(outlier_budget * T * D) per tensor (budget in
 * [0, 1]; computed in double with a 1e-6 slack, so 0.01 * 100 gives 1, not
 * 2). Returns 0, or negative with a reason (T, D, head_dim or G not
 * positive, G not dividing head_dim, head_dim not dividing D, D odd, budget
 * outside [0, 1] or NaN, T * D >= 2^29). bytes is the capacity of a block
 * (outlier slots included), which is what the cache holds per block. */
int kvq_layout_init(kvq_layout *L, int block_tokens, int kv_dim, int head_dim,
                    int v_group, kvq_k_mode k_mode, float outlier_budget,
                    char *err, size_t errlen);

/* The same with the code widths: k_bits, v_bits in {2, 3, 4, 8} (otherwise
 * refused, as is 3 bits with a v_group that is not a multiple of 8). 4-bit
 * codes keep the rule that kv_dim is even. kvq_layout_init is this with
 * 4, 4. */
int kvq_layout_init_bits(kvq_layout *L, int block_tokens, int kv_dim, int head_dim,
                         int v_group, kvq_k_mode k_mode, float outlier_budget,
                         int k_bits, int v_bits, char *err, size_t errlen);

/* Bytes of one layer-block as a constant expression (the layout above,
 * 16-byte header, every region rounded up to 8 bytes; ns = n_ksnap, cap =
 * out_cap). kvq_layout_init_bits gives exactly this; the static_asserts in
 * kvq_ref.c pin it for each width. */
#define KVQ_AL8(x) (((size_t)(x) + 7) & ~(size_t)7)
#define KVQ_IDX_BYTES(T, D) ((size_t)(T) * (size_t)(D) <= 65536 ? 2 : 4)
#define KVQ_ZBITS(b) ((b) <= 4 ? 4 : 8)
#define KVQ_BLOCK_BYTES(T, D, G, ns, cap, kb, vb)                                        \
    (KVQ_AL8(16) + KVQ_AL8(KVQ_CODE_BYTES((size_t)(T) * (D), kb)) +                     \
     KVQ_AL8(KVQ_CODE_BYTES((size_t)(T) * (D), vb)) + KVQ_AL8(2 * (size_t)(ns)) +        \
     KVQ_AL8(KVQ_CODE_BYTES(ns, KVQ_ZBITS(kb))) + KVQ_AL8(2 * (size_t)(T) * (D) / (G)) +   \
     KVQ_AL8(KVQ_CODE_BYTES((size_t)(T) * (D) / (G), KVQ_ZBITS(vb))) +                    \
     2 * (KVQ_AL8(KVQ_IDX_BYTES(T, D) * (size_t)(cap)) + KVQ_AL8(2 * (size_t)(cap))))

/* Zero i of a snapshot's zero array of zbits (4 or 8) bits per entry. */
static inline int kvq_zero_at(const uint8_t *z, size_t i, int zbits)
{
    return zbits == 4 ? (z[i >> 1] >> ((i & 1) * 4)) & 15 : z[i];
}

/* Element index of outlier i of tensor v (0 K, 1 V) of the block at base. */
static inline uint32_t kvq_out_idx(const kvq_layout *L, const void *base, int v, uint32_t i)
{
    const char *p = (const char *)base + (v ? L->off_vout_idx : L->off_kout_idx);
    return L->idx_bytes == 2 ? ((const uint16_t *)(const void *)p)[i]
                             : ((const uint32_t *)(const void *)p)[i];
}

/* Typed views of a block's regions (base = block start). */
static inline kvq_block_hdr *kvq_hdr(void *base) { return (kvq_block_hdr *)base; }
static inline const kvq_block_hdr *kvq_chdr(const void *base) { return (const kvq_block_hdr *)base; }
#define KVQ_AT(base, off, type) ((type)((char *)(base) + (off)))
#define KVQ_CAT(base, off, type) ((const type)((const char *)(base) + (off)))

/* ---- Eq. 3-2 / 3-3: range statistics ---------------------------------- */

typedef struct {
    float ema_decay;     /* beta in [0, 1) */
    float ema_clip;      /* gamma >= 0: max move per chunk, in range widths */
    float clip_quantile; /* alpha in [0, 0.5) */
    int warmup_chunks;   /* W >= 0 */
} kvq_ema_params;

/* Range state of one tensor (K or V) of one layer of one sequence. */
typedef struct {
    float *lo, *hi;       /* [D] current range (valid when n_chunks > 0) */
    float *sum_a, *sum_b; /* [D] sums of unclipped stats during warm-up */
    int n_chunks;         /* chunks folded in so far */
} kvq_ema;

/* a[c] = Q_alpha(x[:, c]), b[c] = Q_{1-alpha}(x[:, c]) over n tokens of
 * x [n][stride] (channels 0..D-1). Quantile = linear interpolation between
 * order statistics at rank alpha*(m-1) of the m finite values (numpy's
 * default method; a rank within 1e-6 of an integer is snapped to it, since
 * alpha is a float); non-finite values are ignored; a channel with no finite
 * value gets a = b = NaN (and kvq_ema_update leaves that channel alone).
 * alpha is clamped to [0, 0.5]. O(n) per channel: ranks within 24 of the
 * ends use insertion buffers over 16-channel tiles (scratch unused), other
 * ranks a gathered column and quickselect.
 * scratch: at least n floats. */
void kvq_chunk_quantiles(const float *x, int n, int D, size_t stride,
                         float alpha, float *a, float *b, float *scratch);

/* Folds one chunk's statistics into e (Eq. 3-2 clipping, Eq. 3-3 EMA):
 *  - while n_chunks < W (warm-up): sums += a, b; lo/hi = mean of the
 *    unclipped a, b so far (no clipping); weight is ignored here (each call
 *    counts as one chunk). A caller whose prompt ends inside warm-up ends
 *    it by setting n_chunks = W (lo/hi then keep the mean so far);
 *  - after: w = max(hi - lo, KVQ_EPS) (as in s; a constant channel's band
 *    is not empty); a' = max(a, lo - gamma*w), b' = min(b, hi + gamma*w),
 *    and both are also kept inside [lo - gamma*w, hi + gamma*w] (so a chunk
 *    lying wholly beyond one end cannot invert the range: the near end moves
 *    out by at most gamma*w times the EMA step, the far end follows it);
 *    lo += (1 - beta) * weight * (a' - lo); hi likewise (weight 1 for a full
 *    chunk, block/C for a decode block);
 *  - the very first chunk when W = 0 sets lo = a, hi = b.
 * Then n_chunks++. The arrays need no initialization (chunk 0 writes them).
 * Non-finite stats (a channel with no finite value) leave the channel's
 * lo/hi unchanged (during warm-up the missing chunk counts as the channel's
 * current mean); a channel that has never had data has lo = hi = NaN, and
 * its first finite stats set lo = a, hi = b. */
void kvq_ema_update(kvq_ema *e, const kvq_ema_params *p, const float *a,
                    const float *b, int D, float weight);

/* 1 while e is still in warm-up (fewer than W chunks folded). */
static inline int kvq_ema_warming(const kvq_ema *e, const kvq_ema_params *p)
{
    return e->n_chunks < p->warmup_chunks;
}

/* ---- Eq. 3-4: quantization ----------------------------------------------- */

/* s and z for a range on b-bit codes (levels m = 2^b - 1):
 * s = max(hi - lo, KVQ_EPS) / m, z = clamp(round(-lo / s), 0, m). */
void kvq_scale_zero_bits(float lo, float hi, int bits, uint16_t *s_f16, uint8_t *z);

/* The 4-bit case, in detail: s = max(hi - lo, KVQ_EPS) / 15,
 * z = clamp(round(-lo / s), 0, 15) (round half away from zero, as roundf).
 * The snapshot stores s as FP16; z and all codes use the FP16-rounded s.
 * Readings: (1) since z is in 0..15 the grid s*(q - z) always contains 0, so
 * the range is first widened to include 0: lo' = min(lo, 0), hi' =
 * max(hi, 0) (otherwise a range like [5, 6] would reconstruct as 1);
 * (2) s is rounded UP to the next FP16 (capped at 65504), so the 16 levels
 * always cover [lo', hi'] and every x in [lo, hi] is within s/2 of a level;
 * (3) a non-finite lo or hi counts as 0 (a channel with no data: [0, 0],
 * s = the smallest FP16 >= KVQ_EPS/15 = 2^-23, z = 0). */
void kvq_scale_zero(float lo, float hi, uint16_t *s_f16, uint8_t *z);

/* Quantizes n (1..T; clamped to that) tokens of K and V, k/v [n][stride]
 * f32 (channels 0..D-1), into the block at base (which it fully rewrites:
 * header, snapshots, codes, outlier lists; unused token slots are zero).
 * K per channel: s,z from [k_lo, k_hi] (EMA); an element outside
 *   [lo - s/2, hi + s/2] is an outlier candidate. The band is taken on the
 *   stored grid, [s(-z - 1/2), s(m - z + 1/2)] (m = 2^b - 1; 15 at 4 bits)
 *   with the FP16 s and integer
 *   z (it differs from the EMA's lo/hi by at most s/2), so that a value is a
 *   candidate exactly when its clamped code would be off by more than s/2.
 *   k_lo/k_hi NULL: the block's own per-channel min/max (no outliers).
 * K per token (k_mode): like V below, with no EMA band (k_lo/k_hi unused;
 *   every value is in range, so no K outliers).
 * V: per (token, group of G channels): candidates are the values outside
 *   their channel's EMA band [v_lo - s_c/2, v_hi + s_c/2] (s_c from the
 *   channel's EMA range); s,z from the min/max of the group's other values
 *   (a group with no other value uses the min/max of all its values). A
 *   candidate that still lies within the group's grid band (it is
 *   representable to s/2) is quantized normally and costs no outlier slot.
 *   A channel whose EMA range is NaN (never had data) flags nothing.
 * Budget: per tensor, the out_cap candidates with the largest excursion
 * (distance outside the grid band divided by s, i.e. in steps; ties: lower
 * element index first) are stored exactly as FP16 (dense slot = clamped
 * code; values beyond the FP16 range are saturated to +-65504); the rest are
 * clamped and counted in n_clamped (K and V together). Outlier lists are in
 * ascending element index. Non-finite inputs: NaN is stored as code z
 * (dequantizes to 0) and counted as clamped; +-Inf clamp to m/0 and count
 * as clamped; neither is ever an outlier.
 * v_lo/v_hi NULL: no V outlier band (all values in range, min/max per group).
 * Guarantee: every finite value that is neither an outlier nor clamped
 * dequantizes within s/2 of itself (s the FP16 scale; up to the f32
 * rounding of x/s, so |x - x^| <= s/2 * (1 + 2^-19)).
 * Cost O(T*D); no allocation.
 * scratch: at least kvq_quantize_scratch_bytes(L) bytes (8-aligned). */
size_t kvq_quantize_scratch_bytes(const kvq_layout *L);
void kvq_quantize_block(const kvq_layout *L, void *base, const float *k,
                        const float *v, size_t stride, int n,
                        const float *k_lo, const float *k_hi,
                        const float *v_lo, const float *v_hi, void *scratch);

/* Dequantizes the block's n_tok tokens into k/v [n_tok][stride] (outliers
 * exact): x = s * (float)(q - z) with s the FP16 snapshot as f32 (the
 * product is exact in f32), then each outlier's FP16 value overwrites its
 * element. k or v may be NULL (that tensor is skipped). The oracle for the
 * fused attention. */
void kvq_dequant_block(const kvq_layout *L, const void *base, float *k,
                       float *v, size_t stride);

/* ---- attention over a segmented history ---------------------------------- */

typedef enum {
    KVS_F32 = 0, /* k, v: float [n][stride] at channel 0 */
    KVS_F16 = 1, /* k, v: fp16 [n][stride] at channel 0 */
    KVS_Q4 = 2,  /* k: a kvq block base (layout L); v unused; n = hdr n_tok */
} kvs_kind;

/* n consecutive positions pos0 .. pos0+n-1 of one layer's history. */
typedef struct {
    int kind;
    int pos0;
    int n;
    const void *k, *v;
    size_t stride; /* elements between positions (F32/F16), usually D */
} kvs_seg;

#endif
