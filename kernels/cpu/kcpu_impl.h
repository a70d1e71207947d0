/*
 * kcpu_impl.h - internal interface between the kcpu front end (kcpu.c:
 * dispatch, threading, scratch layout) and the per-ISA back ends
 * (kcpu_scalar.c: portable C; kcpu_avx2.c: AVX2+FMA+F16C, compiled with
 * those flags in its own library and only called after a run-time check).
 *
 * Back-end functions are single-threaded and pure: the front end splits the
 * work (rows of a matmul, (token, head) pairs of attention) over the pool.
 */
#ifndef LKQ_KCPU_IMPL_H
#define LKQ_KCPU_IMPL_H

#include "kernels/ktypes.h"

/* Activations quantized to int8 per 32-element block, for integer dot
 * products against Q4_0 / Q4_1 / Q8_0 weights. Tokens are packed in groups
 * of KCPU_XG so that a tile of up to KCPU_XG tokens finds the data of one
 * block side by side: for token t = g*KCPU_XG + u and block b, with
 * i = (g*nb + b)*KCPU_XG + u (kcpu_q8x_index):
 *   x[t][b*32 + j] ~= d[i] * qs[i*32 + j]
 *   s[i] = smul * d[i] * sum_j qs[i*32 + j]
 * where smul is -8 for Q4_0 weights (their "q - 8") and 1 otherwise.
 * Padding tokens of the last group are all zero. */
#define KCPU_XG 4

typedef struct {
    const int8_t *qs;
    const float *d;
    const float *s;
    int nb;    /* blocks per token row (n_cols / 32) */
    int n_tok;
} kcpu_q8x;

static inline size_t kcpu_q8x_index(int nb, int t, int b)
{
    return ((size_t)(t / KCPU_XG) * (size_t)nb + (size_t)b) * KCPU_XG +
           (size_t)(t % KCPU_XG);
}

/* Quantization rule shared by all back ends (and mirrored by the tests):
 * amax = max |x| over the block, d = amax / 127, id = d ? 1 / d : 0,
 * q = round-half-even(x * id). */

typedef struct {
    const char *name;
    /* Quantizes one token row x[n_cols] (n_cols % 32 == 0) into the packed
     * layout: block b goes to qs + b*KCPU_XG*32, d[b*KCPU_XG], s[b*KCPU_XG]
     * (pointers already offset to the token). */
    void (*quantize_x)(const float *x, int n_cols, float smul, int8_t *qs,
                       float *d, float *s);
    /* y[t*n_rows + r] for r in [r0, r1), every token t: rows of W (type
     * Q4_0/Q4_1/Q8_0, row_bytes apart) dotted with the quantized xq. */
    void (*mm_quant)(kt_type t, const void *W, size_t row_bytes,
                     const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1);
    /* Same for F32/F16/BF16 weights against f32 x [n_tok, n_cols]. */
    void (*mm_float)(kt_type t, const void *W, size_t row_bytes,
                     const float *x, int n_cols, int n_tok, float *y,
                     int n_rows, int r0, int r1);
    /* One query head over n_pos cached positions: k, v point at the kv
     * head's first element of position 0, positions kv_stride apart.
     * sc: n_pos + 16 floats of scratch. out[head_dim]. */
    void (*attn_head)(float *out, const float *q, const uint16_t *k,
                      const uint16_t *v, size_t kv_stride, int n_pos,
                      int head_dim, float scale, float *sc);
    void (*rmsnorm)(float *out, const float *x, const float *w, int n,
                    float eps);
    void (*softmax)(float *x, int n);
    void (*swiglu)(float *gate, const float *up, int n);
    void (*dequant_row)(kt_type t, const void *row, float *out, int64_t n);
    void (*f32_to_f16)(uint16_t *dst, const float *src, int64_t n);
} kcpu_ops;

extern const kcpu_ops kcpu_scalar_ops;
#if defined(LKQ_HAVE_AVX2)
extern const kcpu_ops kcpu_avx2_ops;
#endif

#endif
