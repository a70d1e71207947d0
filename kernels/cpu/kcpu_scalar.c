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

#include <assert.h>
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

/* Bit i of v in bit 0 of byte i of the result (byte i is the i-th in
 * memory on the little-endian hosts this project runs on). */
static inline uint64_t sc_spread_bits(uint8_t v)
{
    uint64_t r = v;
    r = (r | r << 28) & 0x0000000f0000000fULL;
    r = (r | r << 14) & 0x0003000300030003ULL;
    r = (r | r << 7) & 0x0101010101010101ULL;
    return r;
}

/* Unpacks n 32-element blocks (K-quants: 32-element sub-blocks) of a
 * quantized row, starting at block b0, into int8 codes wq, per-block scales
 * dw, dw2 and the factor mw of the activation block sum s (kcpu_q8x), so
 * that element j of block i is dw[i] * wq[j] + mw[i] with s providing the
 * offset (j < 16 uses dw, j >= 16 dw2; the two differ only for Q6_K):
 *   Q8_0  codes signed, mw 0;        Q4_0 / Q5_0  codes 0..15 / 0..31,
 *   mw = d (s carries -8 / -16);      Q4_1 / Q5_1  mw = m;
 *   Q4_K / Q5_K  dw = d * sc_j, mw = -(dmin * m_j) (s carries no offset);
 *   Q6_K  codes q - 32 (signed), dw / dw2 = d * scale of each 16-half, mw 0.
 * The scales are the very f32 products kref_dequant_row forms. */
void kcpu_unpack_blocks(kt_type t, const void *row, int b0, int n, int8_t *wq, float *dw,
                        float *dw2, float *mw)
{
    for (int i = 0; i < n; i++) {
        int8_t *o = wq + i * KT_QK;
        int b = b0 + i;
        const uint8_t *qs = NULL, *qh = NULL; /* 4-bit codes, Q5 high bits */
        mw[i] = 0.0f;
        switch (t) {
        case KT_Q8_0: {
            const kt_block_q8_0 *blk = (const kt_block_q8_0 *)row + b;
            memcpy(o, blk->qs, KT_QK);
            dw[i] = kt_f16_to_f32(blk->d);
            break;
        }
        case KT_Q4_0: {
            const kt_block_q4_0 *blk = (const kt_block_q4_0 *)row + b;
            qs = blk->qs;
            dw[i] = mw[i] = kt_f16_to_f32(blk->d);
            break;
        }
        case KT_Q5_0: {
            const kt_block_q5_0 *blk = (const kt_block_q5_0 *)row + b;
            qs = blk->qs;
            qh = blk->qh;
            dw[i] = mw[i] = kt_f16_to_f32(blk->d);
            break;
        }
        case KT_Q4_1: {
            const kt_block_q4_1 *blk = (const kt_block_q4_1 *)row + b;
            qs = blk->qs;
            dw[i] = kt_f16_to_f32(blk->d);
            mw[i] = kt_f16_to_f32(blk->m);
            break;
        }
        case KT_Q5_1: {
            const kt_block_q5_1 *blk = (const kt_block_q5_1 *)row + b;
            qs = blk->qs;
            qh = blk->qh;
            dw[i] = kt_f16_to_f32(blk->d);
            mw[i] = kt_f16_to_f32(blk->m);
            break;
        }
        case KT_Q4_K: case KT_Q5_K: {
            int j = b % 8;
            const uint8_t *scales, *q, *h5 = NULL;
            uint16_t d16, dmin16;
            if (t == KT_Q4_K) {
                const kt_block_q4_k *blk = (const kt_block_q4_k *)row + b / 8;
                scales = blk->scales, q = blk->qs, d16 = blk->d, dmin16 = blk->dmin;
            } else {
                const kt_block_q5_k *blk = (const kt_block_q5_k *)row + b / 8;
                scales = blk->scales, q = blk->qs, d16 = blk->d, dmin16 = blk->dmin;
                h5 = blk->qh;
            }
            uint8_t sc, m;
            kt_kq_scale_min(scales, j, &sc, &m);
            dw[i] = kt_f16_to_f32(d16) * (float)sc;
            mw[i] = -(kt_f16_to_f32(dmin16) * (float)m);
            q += 32 * (j / 2);
            const int sh = 4 * (j % 2);
            for (int l = 0; l < 32; l++)
                o[l] = (int8_t)((q[l] >> sh) & 0x0f);
            if (h5)
                for (int l = 0; l < 32; l++)
                    o[l] = (int8_t)(o[l] | ((h5[l] >> j) & 1) << 4);
            break;
        }
        case KT_Q6_K: {
            const kt_block_q6_k *blk = (const kt_block_q6_k *)row + b / 8;
            int j = b % 8, h = j / 4, k = j % 4;
            float d = kt_f16_to_f32(blk->d);
            dw[i] = d * (float)blk->scales[2 * j];
            dw2[i] = d * (float)blk->scales[2 * j + 1];
            const uint8_t *ql = blk->ql + 64 * h + 32 * (k & 1), *qh6 = blk->qh + 32 * h;
            const int sl = 4 * (k >> 1), sh = 2 * k;
            for (int l = 0; l < 32; l++)
                o[l] = (int8_t)((((ql[l] >> sl) & 0x0f) | ((qh6[l] >> sh) & 3) << 4) - 32);
            continue;
        }
        case KT_F32: case KT_F16: case KT_BF16:
            assert(0 && "not a quantized type");
            return;
        }
        dw2[i] = dw[i];
        if (!qs)
            continue;
        /* separate simple loops: the compiler vectorizes them */
        for (int j = 0; j < KT_QK / 2; j++) {
            o[j] = (int8_t)(qs[j] & 0x0f);
            o[j + KT_QK / 2] = (int8_t)(qs[j] >> 4);
        }
        if (qh) /* bit j of qh -> 0x10 in byte j, 8 bytes at a time */
            for (int k = 0; k < 4; k++) {
                uint64_t w;
                memcpy(&w, o + 8 * k, 8);
                w |= sc_spread_bits(qh[k]) << 4;
                memcpy(o + 8 * k, &w, 8);
            }
    }
}

static void sc_mm_quant(kt_type t, const void *W, size_t row_bytes,
                        const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1)
{
    int8_t wq[SC_CHUNK_BLOCKS * KT_QK];
    float dw[SC_CHUNK_BLOCKS], dw2[SC_CHUNK_BLOCKS], mw[SC_CHUNK_BLOCKS];
    int nb = xq->nb;
    for (int r = r0; r < r1; r++) {
        const char *row = (const char *)W + (size_t)r * row_bytes;
        for (int k = 0; k < xq->n_tok; k++)
            y[(size_t)k * (size_t)n_rows + (size_t)r] = 0.0f;
        for (int b0 = 0; b0 < nb; b0 += SC_CHUNK_BLOCKS) {
            int n = nb - b0 < SC_CHUNK_BLOCKS ? nb - b0 : SC_CHUNK_BLOCKS;
            kcpu_unpack_blocks(t, row, b0, n, wq, dw, dw2, mw);
            for (int k = 0; k < xq->n_tok; k++) {
                float acc = 0.0f;
                for (int i = 0; i < n; i++) {
                    size_t xi = kcpu_q8x_index(nb, k, b0 + i);
                    const int8_t *xs = xq->qs + xi * KT_QK;
                    if (t == KT_Q6_K) { /* a scale per 16-half */
                        int dot0 = 0, dot1 = 0;
                        for (int j = 0; j < KT_QK / 2; j++) {
                            dot0 += wq[i * KT_QK + j] * xs[j];
                            dot1 += wq[i * KT_QK + KT_QK / 2 + j] * xs[KT_QK / 2 + j];
                        }
                        acc += (dw[i] * (float)dot0 + dw2[i] * (float)dot1) * xq->d[xi];
                        continue;
                    }
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

/* Online-softmax step for one query and one tile of nv scores s (tile
 * maximum mt): s becomes exp(s - new max), the running max *m and sum *l
 * are updated and the partial output o [D] is rescaled; the caller then
 * adds the tile's weighted V rows. */
static void softmax_tile(float *s, int nv, float mt, float *m, float *l, float *o, int D)
{
    float mn = fmaxf(*m, mt), alpha = expf(*m - mn), sum = 0.0f;
    for (int r = 0; r < nv; r++) {
        s[r] = expf(s[r] - mn);
        sum += s[r];
    }
    *l = *l * alpha + sum;
    *m = mn;
    for (int d = 0; d < D; d++)
        o[d] *= alpha;
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
            float *o = it->o[i];
            softmax_tile(s, nv, mt, &m[i], &l[i], o, D);
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

/* ---- attention over a segmented history ---- */

/* Nibble i of a packed 4-bit array (low nibble = even index). */
/* Loads positions [p0, p0 + np) of segment sg, channels [c0, c0 + D), into
 * kt, vt [np][D] as f32. A KVS_Q4 block (any code width) is dequantized tile by tile
 * (s * (code - z) with its snapshots), its outliers patched in exactly. */
static void sc_seg_tile(const kvs_seg *sg, const kvq_layout *L, int c0, int D,
                        int p0, int np, float *kt, float *vt)
{
    if (sg->kind == KVS_F32 || sg->kind == KVS_F16) {
        kt_type t = sg->kind == KVS_F32 ? KT_F32 : KT_F16;
        size_t el = sg->kind == KVS_F32 ? sizeof(float) : sizeof(uint16_t);
        for (int r = 0; r < np; r++) {
            size_t off = ((size_t)(p0 + r) * sg->stride) * el;
            sc_convert(t, (const char *)sg->k + off, c0, D, kt + (size_t)r * (size_t)D);
            sc_convert(t, (const char *)sg->v + off, c0, D, vt + (size_t)r * (size_t)D);
        }
        return;
    }
    const void *b = sg->k;
    const int Dk = L->kv_dim, ng = Dk / L->v_group;
    const uint8_t *kq = KVQ_CAT(b, L->off_kq, uint8_t *), *vq = KVQ_CAT(b, L->off_vq, uint8_t *);
    const uint16_t *ks = KVQ_CAT(b, L->off_ks, uint16_t *), *vs = KVQ_CAT(b, L->off_vs, uint16_t *);
    const uint8_t *kz = KVQ_CAT(b, L->off_kz, uint8_t *), *vz = KVQ_CAT(b, L->off_vz, uint8_t *);
    for (int r = 0; r < np; r++) {
        int t = p0 + r;
        for (int d = 0; d < D; d++) {
            int c = c0 + d;
            size_t e = (size_t)t * (size_t)Dk + (size_t)c;
            size_t kg = L->k_mode == KVQ_K_PER_TOKEN ? (size_t)t * (size_t)ng + (size_t)(c / L->v_group)
                                                     : (size_t)c;
            size_t vg = (size_t)t * (size_t)ng + (size_t)(c / L->v_group);
            kt[(size_t)r * (size_t)D + (size_t)d] =
                kt_f16_to_f32(ks[kg]) *
                (float)(kvq_get_code(kq, e, L->k_bits) - kvq_zero_at(kz, kg, L->k_zbits));
            vt[(size_t)r * (size_t)D + (size_t)d] =
                kt_f16_to_f32(vs[vg]) *
                (float)(kvq_get_code(vq, e, L->v_bits) - kvq_zero_at(vz, vg, L->v_zbits));
        }
    }
    const kvq_block_hdr *h = kvq_chdr(b);
    for (int x = 0; x < 2; x++) {
        const uint16_t *val = KVQ_CAT(b, x ? L->off_vout_val : L->off_kout_val, uint16_t *);
        float *dst = x ? vt : kt;
        uint32_t n = x ? h->n_vout : h->n_kout;
        n = n < (uint32_t)L->out_cap ? n : (uint32_t)L->out_cap;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t e = kvq_out_idx(L, b, x, i);
            int t = (int)(e / (uint32_t)Dk) - p0, d = (int)(e % (uint32_t)Dk) - c0;
            if (t >= 0 && t < np && d >= 0 && d < D)
                dst[(size_t)t * (size_t)D + (size_t)d] = kt_f16_to_f32(val[i]);
        }
    }
}

/* See kcpu_attn_seg_item. For each KV head of the item, tiles of the
 * history are converted to f32 once for all of the head's queries
 * (sc_seg_tile), then each query runs the same online softmax as
 * sc_attn_item. */
static void sc_attn_seg_item(const kcpu_attn_seg_item *it, float *tmp)
{
    const int D = it->head_dim, nq = it->nq;
    const int tile = D > KCPU_ATTN_TILE ? D : KCPU_ATTN_TILE;
    const int KP = tile / D < KCPU_ATTN_KPMAX ? tile / D : KCPU_ATTN_KPMAX;
    float *kt = tmp + KCPU_ATTN_QMAX * KCPU_ATTN_KPMAX, *vt = kt + tile;
    float m[KCPU_ATTN_QMAX], l[KCPU_ATTN_QMAX];
    for (int i = 0; i < nq; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        for (int d = 0; d < D; d++)
            it->o[i][d] = 0.0f;
    }
    for (int i0 = 0, i1; i0 < nq; i0 = i1) {
        for (i1 = i0 + 1; i1 < nq && it->kvh[i1] == it->kvh[i0]; i1++)
            ;
        int cum = 0, c0 = it->kvh[i0] * D;
        for (int si = 0; si < it->n_segs; si++) {
            const kvs_seg *sg = &it->segs[si];
            int n = kcpu_seg_span(sg, it->L, it->lo), a = it->v0 - cum, b = it->v1 - cum;
            int vmax = 0, vmin = n;
            cum += n;
            a = a > 0 ? a : 0;
            b = b < n ? b : n;
            for (int i = i0; i < i1; i++) {
                int vis = it->qpos[i] - sg->pos0 + 1;
                int low = kcpu_win_lo(it->qpos[i], it->window) - sg->pos0;
                vmax = vis > vmax ? vis : vmax;
                vmin = low < vmin ? low : vmin;
            }
            b = b < vmax ? b : vmax;
            a = a > vmin ? a : vmin; /* rows before every query's window */
            for (int p0 = a; p0 < b; p0 += KP) {
                int np = b - p0 < KP ? b - p0 : KP;
                sc_seg_tile(sg, it->L, c0, D, p0, np, kt, vt);
                for (int i = i0; i < i1; i++) {
                    int nv = it->qpos[i] - (sg->pos0 + p0) + 1;
                    int r0 = kcpu_win_lo(it->qpos[i], it->window) - (sg->pos0 + p0);
                    nv = nv < np ? nv : np;
                    r0 = r0 > 0 ? r0 : 0;
                    if (nv <= r0)
                        continue;
                    float *s = tmp + i * KCPU_ATTN_KPMAX, mt = -INFINITY;
                    for (int r = r0; r < nv; r++) {
                        s[r] = sc_dot(it->q[i], kt + (size_t)r * (size_t)D, D) * it->scale;
                        mt = fmaxf(mt, s[r]);
                    }
                    float *o = it->o[i];
                    softmax_tile(s + r0, nv - r0, mt, &m[i], &l[i], o, D);
                    for (int r = r0; r < nv; r++)
                        for (int d = 0; d < D; d++)
                            o[d] += s[r] * vt[(size_t)r * (size_t)D + (size_t)d];
                }
            }
        }
    }
    for (int i = 0; i < nq; i++) {
        if (it->ml) {
            it->ml[2 * i] = m[i];
            it->ml[2 * i + 1] = l[i];
        } else {
            float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
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

/* gelu_tanh(g) * up in float (tanhf); kref_geglu is the same in double */
static void sc_geglu(float *gate, const float *up, int n)
{
    const float k = 0.7978845608f; /* sqrt(2/pi) */
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * up[i];
    }
}

/* Same float expressions as kref_dequant_row, so results are bit exact. */
static void sc_dequant_row(kt_type t, const void *row, float *out, int64_t n)
{
    switch (t) {
    case KT_F32: case KT_F16: case KT_BF16:
        sc_convert(t, row, 0, (int)n, out);
        return;
    case KT_Q4_0: case KT_Q4_1: case KT_Q5_0: case KT_Q5_1: case KT_Q8_0:
    case KT_Q4_K: case KT_Q5_K: case KT_Q6_K:
        break;
    }
    int8_t wq[KT_QK];
    float dw = 0.0f, dw2 = 0.0f, mw = 0.0f;
    for (int64_t b = 0; b < n / KT_QK; b++) {
        kcpu_unpack_blocks(t, row, (int)b, 1, wq, &dw, &dw2, &mw);
        float *o = out + b * KT_QK;
        for (int j = 0; j < KT_QK; j++) {
            if (t == KT_Q4_0 || t == KT_Q5_0)
                o[j] = dw * (float)(wq[j] - (t == KT_Q4_0 ? 8 : 16));
            else if (t == KT_Q4_1 || t == KT_Q5_1 || t == KT_Q4_K || t == KT_Q5_K)
                o[j] = dw * (float)wq[j] + mw; /* K: + -(dmin*m) == - dmin*m */
            else /* Q8_0, Q6_K */
                o[j] = (j < KT_QK / 2 ? dw : dw2) * (float)wq[j];
        }
    }
}

static void sc_f32_to_f16(uint16_t *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = kt_f32_to_f16(src[i]);
}

/* The repacked matmul (kcpu_impl.h, struct kcpu_rp) in portable C: the
 * layout's arithmetic written out (the fallback when AVX-512 VNNI is not
 * the path in use). */
void kcpu_scalar_mm_rp(const struct kcpu_rp *rp, const kcpu_q8x *xq, const float *xs, float *y,
                       int g0, int g1)
{
    const int nb = xq->nb, sub = rp->sub;
    for (int g = g0; g < g1; g++)
        for (int r = 0; r < KCPU_RP_RG && g * KCPU_RP_RG + r < rp->rows; r++)
            for (int t = 0; t < xq->n_tok; t++) {
                float acc = 0.0f;
                for (int j = 0; j < rp->n_sb; j++) {
                    const uint8_t *rec = rp->data + (size_t)g * rp->rg_bytes +
                                         (size_t)j * rp->sb_bytes;
                    const float *sc = (const float *)(rec + (size_t)sub * KCPU_RP_RG);
                    const int e0 = j * sub, b = e0 / KT_QK;
                    const size_t xi = kcpu_q8x_index(nb, t, b);
                    const int8_t *xb = xq->qs + xi * KT_QK + (e0 % KT_QK);
                    int32_t dot = 0;
                    for (int e = 0; e < sub; e++)
                        dot += (int32_t)rec[(e / 4) * 4 * KCPU_RP_RG + 4 * r + e % 4] *
                               (int32_t)xb[e];
                    acc += sc[r] * ((float)dot * xq->d[xi]) +
                           sc[KCPU_RP_RG + r] * xs[(size_t)t * (size_t)rp->n_sb + (size_t)j];
                }
                y[(size_t)t * (size_t)rp->rows + (size_t)(g * KCPU_RP_RG + r)] = acc;
            }
}

const kcpu_ops kcpu_scalar_ops = {
    .name = "scalar",
    .quantize_x = sc_quantize_x,
    .mm_quant = sc_mm_quant,
    .mm_float = sc_mm_float,
    .attn_item = sc_attn_item,
    .attn_seg_item = sc_attn_seg_item,
    .rmsnorm = sc_rmsnorm,
    .softmax = sc_softmax,
    .swiglu = sc_swiglu,
    .geglu = sc_geglu,
    .dequant_row = sc_dequant_row,
    .f32_to_f16 = sc_f32_to_f16,
};
