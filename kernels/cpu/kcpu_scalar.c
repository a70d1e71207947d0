/*
 * kcpu_scalar.c - portable back end of kcpu (no ISA extensions assumed).
 *
 * Same algorithms as the AVX2 back end (int8 activations for quantized
 * weights, f32 accumulation), written so the compiler can auto-vectorize the
 * inner loops with the baseline ISA. Used on CPUs without AVX2/FMA/F16C and
 * by the tests through kcpu_force_scalar().
 * Threading: pure functions; the caller splits the work.
 */
#include "kernels/cpu/kcpu_impl.h"

#include <math.h>

/* Weight blocks unpacked per pass over a row in mm_quant. */
#define SC_CHUNK_BLOCKS 64
/* Elements converted per pass over a row in mm_float. */
#define SC_CHUNK_ELEMS 1024

static void sc_quantize_x(const float *x, int n_cols, float smul, int8_t *qs,
                          float *d, float *s)
{
    for (int b = 0; b < n_cols / KT_QK; b++) {
        const float *xb = x + b * KT_QK;
        float amax = 0.0f;
        for (int j = 0; j < KT_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float db = amax / 127.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        int sum = 0;
        for (int j = 0; j < KT_QK; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            qs[b * KCPU_XG * KT_QK + j] = (int8_t)q;
            sum += q;
        }
        d[b * KCPU_XG] = db;
        s[b * KCPU_XG] = smul * db * (float)sum;
    }
}

/* Unpacks n blocks of a quantized row into int8 values (Q4: 0..15, Q8:
 * signed), per-block scale dw and the factor mw of the activation block sum
 * s (kcpu_q8x): the min for Q4_1, dw for Q4_0 (s carries the -8), 0 for
 * Q8_0. */
static void sc_unpack(kt_type t, const void *row, int b0, int n, int8_t *wq,
                      float *dw, float *mw)
{
    for (int i = 0; i < n; i++) {
        int8_t *o = wq + i * KT_QK;
        if (t == KT_Q8_0) {
            const kt_block_q8_0 *blk = (const kt_block_q8_0 *)row + b0 + i;
            memcpy(o, blk->qs, KT_QK);
            dw[i] = kt_f16_to_f32(blk->d);
            mw[i] = 0.0f;
            continue;
        }
        const uint8_t *qs;
        if (t == KT_Q4_0) {
            const kt_block_q4_0 *blk = (const kt_block_q4_0 *)row + b0 + i;
            qs = blk->qs;
            dw[i] = kt_f16_to_f32(blk->d);
            mw[i] = dw[i];
        } else {
            const kt_block_q4_1 *blk = (const kt_block_q4_1 *)row + b0 + i;
            qs = blk->qs;
            dw[i] = kt_f16_to_f32(blk->d);
            mw[i] = kt_f16_to_f32(blk->m);
        }
        for (int j = 0; j < KT_QK / 2; j++) {
            o[j] = (int8_t)(qs[j] & 0x0f);
            o[j + KT_QK / 2] = (int8_t)(qs[j] >> 4);
        }
    }
}

static void sc_mm_quant(kt_type t, const void *W, size_t row_bytes,
                        const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1)
{
    int8_t wq[SC_CHUNK_BLOCKS * KT_QK];
    float dw[SC_CHUNK_BLOCKS], mw[SC_CHUNK_BLOCKS];
    int nb = xq->nb;
    for (int r = r0; r < r1; r++) {
        const char *row = (const char *)W + (size_t)r * row_bytes;
        for (int k = 0; k < xq->n_tok; k++)
            y[(size_t)k * (size_t)n_rows + (size_t)r] = 0.0f;
        for (int b0 = 0; b0 < nb; b0 += SC_CHUNK_BLOCKS) {
            int n = nb - b0 < SC_CHUNK_BLOCKS ? nb - b0 : SC_CHUNK_BLOCKS;
            sc_unpack(t, row, b0, n, wq, dw, mw);
            for (int k = 0; k < xq->n_tok; k++) {
                float acc = 0.0f;
                for (int i = 0; i < n; i++) {
                    size_t xi = kcpu_q8x_index(nb, k, b0 + i);
                    const int8_t *xs = xq->qs + xi * KT_QK;
                    int dot = 0;
                    for (int j = 0; j < KT_QK; j++)
                        dot += wq[i * KT_QK + j] * xs[j];
                    acc += dw[i] * xq->d[xi] * (float)dot + mw[i] * xq->s[xi];
                }
                y[(size_t)k * (size_t)n_rows + (size_t)r] += acc;
            }
        }
    }
}

static void sc_convert(kt_type t, const void *row, int j0, int n, float *out)
{
    if (t == KT_F32) {
        memcpy(out, (const float *)row + j0, (size_t)n * sizeof(float));
    } else if (t == KT_F16) {
        for (int j = 0; j < n; j++)
            out[j] = kt_f16_to_f32(((const uint16_t *)row)[j0 + j]);
    } else {
        for (int j = 0; j < n; j++)
            out[j] = kt_bf16_to_f32(((const uint16_t *)row)[j0 + j]);
    }
}

/* Dot product with 8 independent partial sums (vectorizable, and the same
 * association for every call). */
static float sc_dot(const float *a, const float *b, int n)
{
    float s[8] = {0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++)
            s[l] += a[j + l] * b[j + l];
    for (; j < n; j++)
        s[0] += a[j] * b[j];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

static void sc_mm_float(kt_type t, const void *W, size_t row_bytes,
                        const float *x, int n_cols, int n_tok, float *y,
                        int n_rows, int r0, int r1)
{
    float w[SC_CHUNK_ELEMS];
    for (int r = r0; r < r1; r++) {
        const char *row = (const char *)W + (size_t)r * row_bytes;
        for (int k = 0; k < n_tok; k++)
            y[(size_t)k * (size_t)n_rows + (size_t)r] = 0.0f;
        for (int j0 = 0; j0 < n_cols; j0 += SC_CHUNK_ELEMS) {
            int n = n_cols - j0 < SC_CHUNK_ELEMS ? n_cols - j0 : SC_CHUNK_ELEMS;
            sc_convert(t, row, j0, n, w);
            for (int k = 0; k < n_tok; k++)
                y[(size_t)k * (size_t)n_rows + (size_t)r] +=
                    sc_dot(w, x + (size_t)k * (size_t)n_cols + j0, n);
        }
    }
}

static void sc_softmax(float *x, int n)
{
    if (n <= 0)
        return;
    float mx = x[0];
    for (int i = 1; i < n; i++)
        mx = fmaxf(mx, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

/* See kcpu_attn_item. Same tiles and online softmax as the AVX2 version,
 * one query at a time; K/V tiles are converted to f32 once for all queries
 * when they fit the scratch (head_dim <= 512), else read element-wise. */
static void sc_attn_item(const kcpu_attn_item *it, float *tmp)
{
    const int D = it->head_dim, nq = it->nq, KP = kcpu_attn_kp(D);
    const int conv = KP * D <= KCPU_ATTN_TILE;
    float *kt = tmp + KCPU_ATTN_QMAX * KCPU_ATTN_KPMAX, *vt = kt + KCPU_ATTN_TILE;
    float m[KCPU_ATTN_QMAX], l[KCPU_ATTN_QMAX];
    int pend = it->p0;
    for (int i = 0; i < nq; i++) {
        int e = it->n_pos[i] < it->p1 ? it->n_pos[i] : it->p1;
        pend = e > pend ? e : pend;
        m[i] = -INFINITY;
        l[i] = 0.0f;
        for (int d = 0; d < D; d++)
            it->o[i][d] = 0.0f;
    }
    for (int p0 = it->p0; p0 < pend; p0 += KP) {
        int np = pend - p0 < KP ? pend - p0 : KP;
        const uint16_t *kp = it->k + (size_t)p0 * it->kv_stride;
        const uint16_t *vp = it->v + (size_t)p0 * it->kv_stride;
        if (conv)
            for (int r = 0; r < np; r++)
                for (int d = 0; d < D; d++) {
                    kt[r * D + d] = kt_f16_to_f32(kp[(size_t)r * it->kv_stride + (size_t)d]);
                    vt[r * D + d] = kt_f16_to_f32(vp[(size_t)r * it->kv_stride + (size_t)d]);
                }
        for (int i = 0; i < nq; i++) {
            int e = it->n_pos[i] < it->p1 ? it->n_pos[i] : it->p1;
            int nv = (e < p0 + np ? e : p0 + np) - p0;
            if (nv <= 0)
                continue;
            float *s = tmp + i * KCPU_ATTN_KPMAX, mt = -INFINITY;
            for (int r = 0; r < nv; r++) {
                if (conv) {
                    s[r] = sc_dot(it->q[i], kt + r * D, D) * it->scale;
                } else {
                    float dot = 0.0f;
                    for (int d = 0; d < D; d++)
                        dot += it->q[i][d] * kt_f16_to_f32(kp[(size_t)r * it->kv_stride + (size_t)d]);
                    s[r] = dot * it->scale;
                }
                mt = fmaxf(mt, s[r]);
            }
            float mn = fmaxf(m[i], mt), alpha = expf(m[i] - mn), sum = 0.0f;
            for (int r = 0; r < nv; r++) {
                s[r] = expf(s[r] - mn);
                sum += s[r];
            }
            l[i] = l[i] * alpha + sum;
            m[i] = mn;
            float *o = it->o[i];
            for (int d = 0; d < D; d++)
                o[d] *= alpha;
            for (int r = 0; r < nv; r++)
                for (int d = 0; d < D; d++)
                    o[d] += s[r] * (conv ? vt[r * D + d]
                                         : kt_f16_to_f32(vp[(size_t)r * it->kv_stride + (size_t)d]));
        }
    }
    for (int i = 0; i < nq; i++) {
        if (it->ml) {
            it->ml[2 * i] = m[i];
            it->ml[2 * i + 1] = l[i];
        } else {
            float inv = 1.0f / l[i];
            for (int d = 0; d < D; d++)
                it->o[i][d] *= inv;
        }
    }
}

static void sc_rmsnorm(float *out, const float *x, const float *w, int n,
                       float eps)
{
    float ss = sc_dot(x, x, n);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++)
        out[i] = x[i] * inv * w[i];
}

static void sc_swiglu(float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++)
        gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Same float expressions as kref_dequant_row, so results are bit exact. */
static void sc_dequant_row(kt_type t, const void *row, float *out, int64_t n)
{
    switch (t) {
    case KT_F32: case KT_F16: case KT_BF16:
        sc_convert(t, row, 0, (int)n, out);
        return;
    case KT_Q4_0: case KT_Q4_1: case KT_Q8_0:
        break;
    }
    int8_t wq[KT_QK];
    float dw, mw;
    for (int64_t b = 0; b < n / KT_QK; b++) {
        sc_unpack(t, row, (int)b, 1, wq, &dw, &mw);
        float *o = out + b * KT_QK;
        for (int j = 0; j < KT_QK; j++) {
            if (t == KT_Q4_0)
                o[j] = dw * (float)(wq[j] - 8);
            else if (t == KT_Q4_1)
                o[j] = dw * (float)wq[j] + mw;
            else
                o[j] = dw * (float)wq[j];
        }
    }
}

static void sc_f32_to_f16(uint16_t *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = kt_f32_to_f16(src[i]);
}

const kcpu_ops kcpu_scalar_ops = {
    .name = "scalar",
    .quantize_x = sc_quantize_x,
    .mm_quant = sc_mm_quant,
    .mm_float = sc_mm_float,
    .attn_item = sc_attn_item,
    .rmsnorm = sc_rmsnorm,
    .softmax = sc_softmax,
    .swiglu = sc_swiglu,
    .dequant_row = sc_dequant_row,
    .f32_to_f16 = sc_f32_to_f16,
};
