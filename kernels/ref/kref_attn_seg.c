/*
 * kref_attn_seg.c - reference attention of one query token over a history
 * made of segments (kernels/kvq.h): FP32 and FP16 segments are read as they
 * are, INT4 (KVS_Q4) blocks are first expanded with kvq_dequant_block, then
 * every visible position is attended with an exact softmax (dot products and
 * sums in double). Visible: at or before the query's position and, for a
 * sliding-window layer (window W > 0), within its last W positions. The
 * oracle of kcpu_attn_seg and of any fused kernel.
 * A query that sees no position at all gets zeros (kcpu_attn_seg agrees).
 *
 * Thread-safety: pure; writes only out and scratch.
 */
#include "kernels/ref/kref.h"

#include <math.h>

/* Floats of dequantized K and V kept per KVS_Q4 segment: a whole block
 * (T rows of D), whatever its fill. */
static size_t q4_floats(const kvq_layout *L)
{
    return 2 * (size_t)L->block_tokens * (size_t)L->kv_dim;
}

/* See kref.h: the Q4 expansions, then one score per position. */
size_t kref_attn_seg_scratch_floats(const kvs_seg *segs, int n_segs,
                                    const kvq_layout *L)
{
    size_t n = 0;
    for (int i = 0; i < n_segs; i++) {
        if (segs[i].kind == KVS_Q4)
            n += q4_floats(L) + (size_t)L->block_tokens;
        else
            n += (size_t)(segs[i].n > 0 ? segs[i].n : 0);
    }
    return n + 1;
}

/* Element (p, c) of segment sg's K (or V when v) as float; kq/vq: its
 * expansion when sg is KVS_Q4 (row stride D). */
static float seg_at(const kvs_seg *sg, const float *kq, const float *vq,
                    int D, int v, int p, int c)
{
    switch (sg->kind) {
    case KVS_F32:
        return ((const float *)(v ? sg->v : sg->k))[(size_t)p * sg->stride + (size_t)c];
    case KVS_F16:
        return kt_f16_to_f32(((const uint16_t *)(v ? sg->v : sg->k))[(size_t)p * sg->stride + (size_t)c]);
    default:
        return (v ? vq : kq)[(size_t)p * (size_t)D + (size_t)c];
    }
}

/* The rows [*r0, *r1) of segment sg that a query at q_pos sees: those at
 * positions <= q_pos and, with a window W > 0, > q_pos - W. */
static void seg_visible(const kvs_seg *sg, int q_pos, int window, int *r0, int *r1)
{
    int n = sg->kind == KVS_Q4 ? (int)kvq_chdr(sg->k)->n_tok : sg->n;
    int hi = q_pos - sg->pos0 + 1, lo = window > 0 ? q_pos - window + 1 - sg->pos0 : 0;
    hi = hi < 0 ? 0 : hi < n ? hi : n;
    lo = lo < 0 ? 0 : lo;
    *r0 = lo < hi ? lo : hi;
    *r1 = hi;
}

/* See kref.h. scratch: [Q4 expansions (K then V per Q4 segment)][scores]. */
void kref_attn_seg(float *out, const float *q, int q_pos, int window, const kvs_seg *segs,
                   int n_segs, const kvq_layout *L, int n_head, int n_kv_head,
                   int head_dim, float scale, float *scratch)
{
    int group = n_head / n_kv_head, D = L ? L->kv_dim : 0;
    size_t voff = L ? (size_t)L->block_tokens * (size_t)D : 0; /* V after K */
    /* expand the INT4 blocks once for all heads */
    float *sc = scratch;
    for (int i = 0; i < n_segs; i++)
        if (segs[i].kind == KVS_Q4) {
            kvq_dequant_block(L, segs[i].k, sc, sc + voff, (size_t)D);
            sc += q4_floats(L);
        }
    for (int h = 0; h < n_head; h++) {
        const float *qh = q + (size_t)h * (size_t)head_dim;
        int c0 = (h / group) * head_dim;
        /* scores of every visible position, segment by segment */
        const float *qexp = scratch;
        float *s = sc;
        double mx = -INFINITY;
        for (int i = 0; i < n_segs; i++) {
            const kvs_seg *sg = &segs[i];
            int r0, r1;
            seg_visible(sg, q_pos, window, &r0, &r1);
            for (int p = r0; p < r1; p++) {
                double dot = 0.0;
                for (int d = 0; d < head_dim; d++)
                    dot += (double)qh[d] *
                           (double)seg_at(sg, qexp, qexp + voff, D, 0, p, c0 + d);
                *s = (float)(dot * (double)scale);
                mx = fmax(mx, (double)*s);
                s++;
            }
            if (sg->kind == KVS_Q4)
                qexp += q4_floats(L);
        }
        /* softmax and the weighted sum of V */
        double sum = 0.0, acc[512];
        float *oh = out + (size_t)h * (size_t)head_dim;
        for (int d0 = 0; d0 < head_dim; d0 += 512) {
            int nd = head_dim - d0 < 512 ? head_dim - d0 : 512;
            for (int d = 0; d < nd; d++)
                acc[d] = 0.0;
            qexp = scratch;
            s = sc;
            sum = 0.0;
            for (int i = 0; i < n_segs; i++) {
                const kvs_seg *sg = &segs[i];
                int r0, r1;
                seg_visible(sg, q_pos, window, &r0, &r1);
                for (int p = r0; p < r1; p++, s++) {
                    double w = exp((double)*s - mx);
                    sum += w;
                    for (int d = 0; d < nd; d++)
                        acc[d] += w * (double)seg_at(sg, qexp, qexp + voff, D, 1, p,
                                                     c0 + d0 + d);
                }
                if (sg->kind == KVS_Q4)
                    qexp += q4_floats(L);
            }
            for (int d = 0; d < nd; d++)
                oh[d0 + d] = sum > 0.0 ? (float)(acc[d] / sum) : 0.0f;
        }
    }
}
