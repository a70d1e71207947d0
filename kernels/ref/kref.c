/*
 * kref.c - plain-C reference kernels (the oracle). See kref.h for contracts.
 *
 * Clarity over speed: every op is written the obvious way, reductions are
 * carried in double so the oracle is more accurate than any optimized layer.
 * Thread-safety: pure functions, no global state.
 */
#include "kernels/ref/kref.h"

#include <math.h>
#include <stdlib.h>

/* Bit 4 of element j (0..31) of a Q5_0 / Q5_1 block: bit j of qh read as a
 * little-endian uint32. */
static int q5_high_bit(const uint8_t qh[4], int j)
{
    return (qh[j / 8] >> (j % 8)) & 1;
}

/* Q4_K / Q5_K super-block: x = (d * sc_j) * q - (dmin * m_j) for sub-block
 * j; qh is NULL for Q4_K (4-bit codes). */
static void dequant_kq(uint16_t d16, uint16_t dmin16, const uint8_t *scales,
                       const uint8_t *qh, const uint8_t *qs, float *o)
{
    float d = kt_f16_to_f32(d16), dmin = kt_f16_to_f32(dmin16);
    for (int j = 0; j < KT_QK_K / 32; j++) {
        uint8_t sc, m;
        kt_kq_scale_min(scales, j, &sc, &m);
        float dj = d * (float)sc, mj = dmin * (float)m;
        for (int l = 0; l < 32; l++) {
            int q = j % 2 ? qs[32 * (j / 2) + l] >> 4 : qs[32 * (j / 2) + l] & 0x0f;
            if (qh)
                q |= ((qh[l] >> j) & 1) << 4;
            o[32 * j + l] = dj * (float)q - mj;
        }
    }
}

/* Q6_K super-block: element e = 128h + 32k + l takes its low nibble from
 * ql[64h + 32(k&1) + l] (high nibble when k >= 2), its top 2 bits from
 * bits 2k..2k+1 of qh[32h + l]; x = (d * scales[e / 16]) * (q - 32). */
static void dequant_q6_k(const kt_block_q6_k *b, float *o)
{
    float d = kt_f16_to_f32(b->d);
    for (int e = 0; e < KT_QK_K; e++) {
        int h = e / 128, k = e % 128 / 32, l = e % 32;
        uint8_t lo = b->ql[64 * h + 32 * (k & 1) + l];
        int q = (k < 2 ? lo & 0x0f : lo >> 4) | ((b->qh[32 * h + l] >> (2 * k)) & 3) << 4;
        o[e] = (d * (float)b->scales[e / 16]) * (float)(q - 32);
    }
}

/* Dequantize one row of n elements (n a multiple of kt_block_elems(t)). The
 * float expressions - d * (q - 8), d * q + m, (d * sc) * q - dmin * m and
 * (d * sc) * (q - 32), each product rounded to f32, no contraction - are the
 * format's definition as GGML and the gguf Python package evaluate it, and
 * the optimized layers reproduce them bit for bit. */
void kref_dequant_row(kt_type t, const void *row, float *out, int64_t n)
{
    switch (t) {
    case KT_F32:
        memcpy(out, row, (size_t)n * sizeof(float));
        break;
    case KT_F16: {
        const uint16_t *h = row;
        for (int64_t i = 0; i < n; i++)
            out[i] = kt_f16_to_f32(h[i]);
        break;
    }
    case KT_BF16: {
        const uint16_t *h = row;
        for (int64_t i = 0; i < n; i++)
            out[i] = kt_bf16_to_f32(h[i]);
        break;
    }
    case KT_Q4_0: {
        const kt_block_q4_0 *b = row;
        for (int64_t i = 0; i < n / KT_QK; i++) {
            float d = kt_f16_to_f32(b[i].d);
            float *o = out + i * KT_QK;
            for (int j = 0; j < KT_QK / 2; j++) {
                o[j] = d * (float)((b[i].qs[j] & 0x0f) - 8);
                o[j + KT_QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
            }
        }
        break;
    }
    case KT_Q4_1: {
        const kt_block_q4_1 *b = row;
        for (int64_t i = 0; i < n / KT_QK; i++) {
            float d = kt_f16_to_f32(b[i].d);
            float m = kt_f16_to_f32(b[i].m);
            float *o = out + i * KT_QK;
            for (int j = 0; j < KT_QK / 2; j++) {
                float lo = d * (float)(b[i].qs[j] & 0x0f);
                float hi = d * (float)(b[i].qs[j] >> 4);
                o[j] = lo + m;
                o[j + KT_QK / 2] = hi + m;
            }
        }
        break;
    }
    case KT_Q8_0: {
        const kt_block_q8_0 *b = row;
        for (int64_t i = 0; i < n / KT_QK; i++) {
            float d = kt_f16_to_f32(b[i].d);
            for (int j = 0; j < KT_QK; j++)
                out[i * KT_QK + j] = d * (float)b[i].qs[j];
        }
        break;
    }
    case KT_Q5_0: {
        const kt_block_q5_0 *b = row;
        for (int64_t i = 0; i < n / KT_QK; i++) {
            float d = kt_f16_to_f32(b[i].d);
            float *o = out + i * KT_QK;
            for (int j = 0; j < KT_QK / 2; j++) {
                int lo = (b[i].qs[j] & 0x0f) | q5_high_bit(b[i].qh, j) << 4;
                int hi = (b[i].qs[j] >> 4) | q5_high_bit(b[i].qh, j + 16) << 4;
                o[j] = d * (float)(lo - 16);
                o[j + KT_QK / 2] = d * (float)(hi - 16);
            }
        }
        break;
    }
    case KT_Q5_1: {
        const kt_block_q5_1 *b = row;
        for (int64_t i = 0; i < n / KT_QK; i++) {
            float d = kt_f16_to_f32(b[i].d);
            float m = kt_f16_to_f32(b[i].m);
            float *o = out + i * KT_QK;
            for (int j = 0; j < KT_QK / 2; j++) {
                int lo = (b[i].qs[j] & 0x0f) | q5_high_bit(b[i].qh, j) << 4;
                int hi = (b[i].qs[j] >> 4) | q5_high_bit(b[i].qh, j + 16) << 4;
                float flo = d * (float)lo;
                float fhi = d * (float)hi;
                o[j] = flo + m;
                o[j + KT_QK / 2] = fhi + m;
            }
        }
        break;
    }
    case KT_Q4_K: {
        const kt_block_q4_k *b = row;
        for (int64_t i = 0; i < n / KT_QK_K; i++)
            dequant_kq(b[i].d, b[i].dmin, b[i].scales, NULL, b[i].qs, out + i * KT_QK_K);
        break;
    }
    case KT_Q5_K: {
        const kt_block_q5_k *b = row;
        for (int64_t i = 0; i < n / KT_QK_K; i++)
            dequant_kq(b[i].d, b[i].dmin, b[i].scales, b[i].qh, b[i].qs, out + i * KT_QK_K);
        break;
    }
    case KT_Q6_K: {
        const kt_block_q6_k *b = row;
        for (int64_t i = 0; i < n / KT_QK_K; i++)
            dequant_q6_k(&b[i], out + i * KT_QK_K);
        break;
    }
    }
}

/* y [n_tok, n_rows] = x [n_tok, n_cols] @ W^T. Each weight row is
 * dequantized once into a heap row buffer (the one allocation of this file;
 * on allocation failure y is filled with NaN so the caller notices). */
void kref_matmul(kt_type t, const void *W, const float *x, float *y,
                 int n_rows, int n_cols, int n_tok)
{
    float *w = malloc((size_t)n_cols * sizeof(float));
    if (!w) {
        for (size_t i = 0; i < (size_t)n_rows * (size_t)n_tok; i++)
            y[i] = NAN;
        return;
    }
    size_t rb = kt_row_bytes(t, n_cols);
    for (int r = 0; r < n_rows; r++) {
        kref_dequant_row(t, (const char *)W + (size_t)r * rb, w, n_cols);
        for (int k = 0; k < n_tok; k++) {
            const float *xk = x + (size_t)k * (size_t)n_cols;
            double acc = 0.0;
            for (int j = 0; j < n_cols; j++)
                acc += (double)w[j] * (double)xk[j];
            y[(size_t)k * (size_t)n_rows + (size_t)r] = (float)acc;
        }
    }
    free(w);
}

void kref_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    double ss = 0.0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * (double)x[i];
    double inv = 1.0 / sqrt(ss / n + (double)eps);
    for (int i = 0; i < n; i++)
        out[i] = (float)((double)x[i] * inv * (double)w[i]);
}

/* Rotation angles are computed in double (pos can reach 10^4-10^5, where a
 * float angle would already be off by ~1e-3 rad). */
void kref_rope(float *x, int n_heads, int head_dim, int n_rot, int pos,
               float theta, float freq_scale)
{
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + (size_t)h * (size_t)head_dim;
        for (int i = 0; i < n_rot / 2; i++) {
            double freq = pow((double)theta, -2.0 * i / n_rot);
            double a = (double)pos * (double)freq_scale * freq;
            double c = cos(a), s = sin(a);
            double x0 = xh[2 * i], x1 = xh[2 * i + 1];
            xh[2 * i] = (float)(x0 * c - x1 * s);
            xh[2 * i + 1] = (float)(x0 * s + x1 * c);
        }
    }
}

void kref_rope_ex(float *x, int n_heads, int head_dim, int n_rot, int pos, float theta,
                  float freq_scale, const float *freqs, int neox)
{
    const int half = n_rot / 2;
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + (size_t)h * (size_t)head_dim;
        for (int i = 0; i < half; i++) {
            double freq = pow((double)theta, -2.0 * i / n_rot);
            if (freqs)
                freq /= (double)freqs[i];
            double a = (double)pos * (double)freq_scale * freq;
            double c = cos(a), s = sin(a);
            int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            double x0 = xh[i0], x1 = xh[i1];
            xh[i0] = (float)(x0 * c - x1 * s);
            xh[i1] = (float)(x0 * s + x1 * c);
        }
    }
}

void kref_geglu(float *gate, const float *up, int n)
{
    const double k = 0.7978845608028654; /* sqrt(2/pi) */
    for (int i = 0; i < n; i++) {
        double g = gate[i];
        double gl = 0.5 * g * (1.0 + tanh(k * (g + 0.044715 * g * g * g)));
        gate[i] = (float)(gl * (double)up[i]);
    }
}

void kref_softcap(float *x, int n, float cap)
{
    for (int i = 0; i < n; i++)
        x[i] = (float)((double)cap * tanh((double)x[i] / (double)cap));
}

void kref_hadamard(float *x, int rows, int dim)
{
    double *y = malloc((size_t)dim * sizeof(double));
    if (!y) {
        for (size_t i = 0; i < (size_t)rows * (size_t)dim; i++)
            x[i] = NAN;
        return;
    }
    const double norm = 1.0 / sqrt((double)dim);
    for (int r = 0; r < rows; r++) {
        float *xr = x + (size_t)r * (size_t)dim;
        for (int i = 0; i < dim; i++) {
            double acc = 0.0;
            for (int j = 0; j < dim; j++)
                acc += (__builtin_popcount((unsigned)(i & j)) & 1) ? -(double)xr[j]
                                                                   : (double)xr[j];
            y[i] = acc * norm;
        }
        for (int i = 0; i < dim; i++)
            xr[i] = (float)y[i];
    }
    free(y);
}

void kref_softmax(float *x, int n)
{
    if (n <= 0)
        return;
    float mx = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > mx)
            mx = x[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        double e = exp((double)x[i] - (double)mx);
        x[i] = (float)e;
        sum += e;
    }
    for (int i = 0; i < n; i++)
        x[i] = (float)((double)x[i] / sum);
}

void kref_swiglu(float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++) {
        double g = gate[i];
        gate[i] = (float)(g / (1.0 + exp(-g)) * (double)up[i]);
    }
}

/* One query token: for each head, scores over positions 0..n_pos-1, softmax,
 * weighted sum of V. Dots and sums in double; scratch holds n_pos scores. */
void kref_attn_f16(float *out, const float *q, const uint16_t *k,
                   const uint16_t *v, size_t kv_stride, int n_pos, int n_head,
                   int n_kv_head, int head_dim, float scale, float *scratch)
{
    int group = n_head / n_kv_head;
    for (int h = 0; h < n_head; h++) {
        const float *qh = q + (size_t)h * (size_t)head_dim;
        size_t koff = (size_t)(h / group) * (size_t)head_dim;
        for (int p = 0; p < n_pos; p++) {
            const uint16_t *kp = k + (size_t)p * kv_stride + koff;
            double dot = 0.0;
            for (int d = 0; d < head_dim; d++)
                dot += (double)qh[d] * (double)kt_f16_to_f32(kp[d]);
            scratch[p] = (float)(dot * (double)scale);
        }
        kref_softmax(scratch, n_pos);
        float *oh = out + (size_t)h * (size_t)head_dim;
        for (int d = 0; d < head_dim; d++) {
            double acc = 0.0;
            for (int p = 0; p < n_pos; p++)
                acc += (double)scratch[p] *
                       (double)kt_f16_to_f32(v[(size_t)p * kv_stride + koff + d]);
            oh[d] = (float)acc;
        }
    }
}
