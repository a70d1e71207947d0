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

/* Dequantize one row of n elements (n a multiple of kt_block_elems(t)). The
 * float expressions (d * (q - 8), d * q + m without contraction) are the ones
 * the optimized layers reproduce bit for bit. */
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
