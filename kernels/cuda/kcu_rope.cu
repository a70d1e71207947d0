/*
 * kcu_rope.cu - RoPE kernel and launchers (see kcu_rope.cuh): one thread per
 * rotated pair; the frequency (and its divisor), the angle, its sine and
 * cosine and the rotation are computed in double without contraction, as
 * kref_rope_ex does.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_rope.cuh"

static __global__ void kcu_rope_kernel(float *x, int n_tok, size_t row_stride, int n_heads,
                                       int head_dim, int n_rot, int pos0,
                                       const int32_t *pos, float theta, float freq_scale,
                                       const float *freqs, int neox)
{
    int half = n_rot / 2;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t total = (size_t)n_tok * (size_t)n_heads * (size_t)half;
    if (i >= total)
        return;
    int j = (int)(i % (size_t)half);
    int h = (int)((i / (size_t)half) % (size_t)n_heads);
    int t = (int)(i / ((size_t)half * (size_t)n_heads));
    double freq = pow((double)theta, -2.0 * j / n_rot);
    if (freqs)
        freq = freq / (double)freqs[j]; /* IEEE division: never contracted */
    int at = pos ? pos[t] : pos0 + t;
    double a = __dmul_rn(__dmul_rn((double)at, (double)freq_scale), freq);
    double s, co;
    sincos(a, &s, &co);
    float *p = x + (size_t)t * row_stride + (size_t)h * (size_t)head_dim;
    int i0 = neox ? j : 2 * j, i1 = neox ? j + half : 2 * j + 1;
    double x0 = p[i0], x1 = p[i1];
    p[i0] = (float)__dsub_rn(__dmul_rn(x0, co), __dmul_rn(x1, s));
    p[i1] = (float)__dadd_rn(__dmul_rn(x0, s), __dmul_rn(x1, co));
}

/* Shared by the launchers: pos NULL means consecutive positions from pos0. */
static int rope_launch(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads,
                       int head_dim, int n_rot, int pos0, const int32_t *pos, float theta,
                       float freq_scale, const float *freqs, int neox, char *err,
                       size_t errlen)
{
    if (n_rot < 2 || n_rot > head_dim || n_rot % 2)
        return kcu_failf(err, errlen, "kcu_rope: n_rot %d must be even and <= head_dim %d",
                         n_rot, head_dim);
    size_t total = (size_t)n_tok * (size_t)n_heads * (size_t)(n_rot / 2);
    if (total == 0)
        return 0;
    KCU_LAUNCH(kcu_rope_kernel, dim3(kcu_cdiv(total, 256)), dim3(256), 0, c->stream, x, n_tok,
               row_stride, n_heads, head_dim, n_rot, pos0, pos, theta, freq_scale, freqs,
               neox);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_rope");
    return 0;
}

extern "C" int kcu_rope(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads,
                        int head_dim, int n_rot, int pos0, float theta, float freq_scale,
                        char *err, size_t errlen)
{
    return rope_launch(c, x, n_tok, row_stride, n_heads, head_dim, n_rot, pos0, NULL, theta,
                       freq_scale, NULL, 0, err, errlen);
}

extern "C" int kcu_rope_at(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads,
                           int head_dim, int n_rot, const int32_t *pos, float theta,
                           float freq_scale, char *err, size_t errlen)
{
    return rope_launch(c, x, n_tok, row_stride, n_heads, head_dim, n_rot, 0, pos, theta,
                       freq_scale, NULL, 0, err, errlen);
}

extern "C" int kcu_rope_ex(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads,
                           int head_dim, int n_rot, const int32_t *pos, float theta,
                           float freq_scale, const float *freqs, int neox, char *err,
                           size_t errlen)
{
    return rope_launch(c, x, n_tok, row_stride, n_heads, head_dim, n_rot, 0, pos, theta,
                       freq_scale, freqs, neox, err, errlen);
}
