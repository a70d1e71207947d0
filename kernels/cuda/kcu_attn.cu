/*
 * kcu_attn.cu - attention launcher (see kcu_attn.cuh), the generic FP32
 * kernel and the split merge.
 *
 * Generic kernel: one block of 128 threads per (item, query, KV head,
 * split); the query heads of the KV head (GQA group) share the block. The
 * visible positions of the split are walked segment by segment in tiles of
 * TP positions: the tile's K and V for this head are expanded to f32 in
 * shared memory (FP16 pages and the step's f32 K/V read as they are, INT4
 * blocks of any code width dequantized as s * (q - z), then the block's outliers written over
 * their elements), the group's scores and an online softmax update the
 * accumulators. Exact where the oracle is exact; sums in f32.
 *
 * Splits: an item with few queries (decode) has its positions [0, pos0 +
 * n_q) (with a sliding window: from its first query's window) cut into ranges (kcu_attn_item_split: planned per item, so that a
 * sequence's result does not depend on the rest of the batch) to fill the
 * GPU; each range writes its partial (m, l, acc) and a merge kernel
 * combines them.
 */
#include "kernels/cuda/kcu_attn_impl.cuh"
#include "kernels/cuda/kcu_elem.cuh"

#define GEN_THREADS 128

static __device__ __forceinline__ float gen_q4(const char *blk, const kvq_layout &L, int v,
                                               int t, int c)
{
    int D = L.kv_dim, ng = D / L.v_group;
    const uint8_t *q = (const uint8_t *)(blk + (v ? L.off_vq : L.off_kq));
    size_t e = (size_t)t * (size_t)D + (size_t)c;
    /* code e of the b-bit stream (kvq.h; the second byte only when the
     * code straddles it) */
    const int b = v ? L.v_bits : L.k_bits;
    size_t bit = e * (size_t)b;
    unsigned sh = (unsigned)(bit & 7), w = q[bit >> 3];
    if (sh + (unsigned)b > 8)
        w |= (unsigned)q[(bit >> 3) + 1] << 8;
    int code = (int)((w >> sh) & ((1u << b) - 1u));
    size_t si = (!v && L.k_mode == KVQ_K_PER_CHANNEL)
                    ? (size_t)c
                    : (size_t)t * (size_t)ng + (size_t)(c / L.v_group);
    const uint16_t *s = (const uint16_t *)(blk + (v ? L.off_vs : L.off_ks));
    const uint8_t *z = (const uint8_t *)(blk + (v ? L.off_vz : L.off_kz));
    return __fmul_rn(kcu_h2f(s[si]), (float)(code - kcu_zero_at(z, si, v ? L.v_zbits : L.k_zbits)));
}

/* dynamic smem: qs[g][hd], Kt[TP][hd], Vt[TP][hd], S[g][TP], acc[g][hd],
 * m[g], l[g], alpha[g] */
static __global__ void __launch_bounds__(GEN_THREADS)
    kcu_attn_generic_kernel(kcu_attn_args P, int TP)
{
    KCU_DYN_SMEM(float, sm);
    const kcu_attn_item item = P.items[blockIdx.z];
    const int n_kv = P.n_kv, hd = P.hd, g = P.n_head / n_kv, D = P.A.kv_dim;
    const int j = (int)blockIdx.x / n_kv, h = (int)blockIdx.x % n_kv, split = (int)blockIdx.y;
    const kcu_attn_split sp = kcu_attn_item_split(P, item);
    if (j >= item.n_q || split >= sp.n)
        return; /* uniform over the block */
    const int tid = (int)threadIdx.x;
    const int qpos = item.pos0 + j;
    const int r_lo = sp.base + split * sp.span, w_lo = kcu_attn_win_lo(P, qpos);
    const int lo_pos = r_lo > w_lo ? r_lo : w_lo; /* the split's range within the window */
    const int hi_pos = r_lo + sp.span < qpos + 1 ? r_lo + sp.span : qpos + 1;
    float *qs = sm, *Kt = qs + g * hd, *Vt = Kt + TP * hd, *S = Vt + TP * hd;
    float *acc = S + g * TP, *sm_m = acc + g * hd, *sm_l = sm_m + g, *sm_a = sm_l + g;
    const size_t qrow = ((size_t)item.q_row0 + (size_t)j) * (size_t)P.n_head * (size_t)hd;

    for (int e = tid; e < g * hd; e += GEN_THREADS) {
        qs[e] = P.q[qrow + (size_t)h * (size_t)g * (size_t)hd + (size_t)e] * P.scale;
        acc[e] = 0.0f;
    }
    if (tid < g) {
        sm_m[tid] = -INFINITY;
        sm_l[tid] = 0.0f;
    }
    __syncthreads();

    for (int si = 0; si <= item.n_segs && lo_pos < hi_pos; si++) {
        kcu_attn_seg_view sv = kcu_attn_segment(P, item, si, NULL, NULL);
        const int kind = sv.kind, sp0 = sv.pos0, sn = sv.n;
        int a = sp0 > lo_pos ? sp0 : lo_pos;
        int b = sp0 + sn < hi_pos ? sp0 + sn : hi_pos;
        const char *blk = sv.blk;
        const uint16_t *pk = sv.pk, *pv = sv.pv;
        for (int p0 = a; p0 < b; p0 += TP) {
            int np = b - p0 < TP ? b - p0 : TP;
            int tb = p0 - sp0; /* segment-relative first position of the tile */
            for (int e = tid; e < np * hd; e += GEN_THREADS) {
                int pp = e / hd, d = e % hd, t = tb + pp, c = h * hd + d;
                float kv, vv;
                if (kind == KVS_F16) {
                    kv = kcu_h2f(pk[(size_t)t * D + c]);
                    vv = kcu_h2f(pv[(size_t)t * D + c]);
                } else if (kind == KVS_F32) {
                    size_t r = ((size_t)item.step_row0 + (size_t)t) * (size_t)D + (size_t)c;
                    kv = P.k_step[r];
                    vv = P.v_step[r];
                } else {
                    kv = gen_q4(blk, P.L, 0, t, c);
                    vv = gen_q4(blk, P.L, 1, t, c);
                }
                Kt[e] = kv;
                Vt[e] = vv;
            }
            __syncthreads();
            if (kind == KVS_Q4) {
                /* the exact outliers of this tile and head, over the dense values */
                const kvq_block_hdr *hdr = (const kvq_block_hdr *)blk;
                for (int tensor = 0; tensor < 2; tensor++) {
                    uint32_t no = tensor ? hdr->n_vout : hdr->n_kout;
                    if (no > (uint32_t)P.L.out_cap)
                        no = (uint32_t)P.L.out_cap;
                    const uint16_t *ov = (const uint16_t *)(blk + (tensor ? P.L.off_vout_val
                                                                          : P.L.off_kout_val));
                    float *dst = tensor ? Vt : Kt;
                    for (uint32_t i = (uint32_t)tid; i < no; i += GEN_THREADS) {
                        uint32_t el = kcu_oidx(blk, P.L, tensor, i);
                        int t = (int)(el / (uint32_t)D), c = (int)(el % (uint32_t)D);
                        if (t >= tb && t < tb + np && c >= h * hd && c < h * hd + hd)
                            dst[(t - tb) * hd + (c - h * hd)] = kcu_h2f(ov[i]);
                    }
                }
                __syncthreads();
            }
            for (int e = tid; e < g * np; e += GEN_THREADS) {
                int hh = e / np, pp = e % np;
                const float *qv = qs + hh * hd, *kr = Kt + pp * hd;
                float s = 0.0f;
                for (int d = 0; d < hd; d++)
                    s += qv[d] * kr[d];
                S[hh * TP + pp] = s;
            }
            __syncthreads();
            if (tid < g) {
                float *sr = S + tid * TP;
                float mx = sm_m[tid];
                for (int pp = 0; pp < np; pp++)
                    mx = fmaxf(mx, sr[pp]);
                float alpha = expf(sm_m[tid] - mx), sum = 0.0f;
                for (int pp = 0; pp < np; pp++) {
                    float w = expf(sr[pp] - mx);
                    sr[pp] = w;
                    sum += w;
                }
                sm_l[tid] = sm_l[tid] * alpha + sum;
                sm_m[tid] = mx;
                sm_a[tid] = alpha;
            }
            __syncthreads();
            for (int e = tid; e < g * hd; e += GEN_THREADS) {
                int hh = e / hd, d = e % hd;
                const float *sr = S + hh * TP;
                float v = acc[e] * sm_a[hh];
                for (int pp = 0; pp < np; pp++)
                    v += sr[pp] * Vt[pp * hd + d];
                acc[e] = v;
            }
            __syncthreads();
        }
    }

    for (int e = tid; e < g * hd; e += GEN_THREADS) {
        int hh = e / hd, d = e % hd, head = h * g + hh;
        if (sp.n == 1) {
            float l = sm_l[hh];
            P.out[qrow + (size_t)head * (size_t)hd + (size_t)d] = l > 0.0f ? acc[e] / l : 0.0f;
        } else {
            float *rec = kcu_attn_part(P, (int)blockIdx.z, j, head, split);
            rec[2 + d] = acc[e];
            if (d == 0) {
                rec[0] = sm_m[hh];
                rec[1] = sm_l[hh];
            }
        }
    }
}

/* out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the item's
 * splits (items that were not split wrote their output directly). */
static __global__ void kcu_attn_merge_kernel(kcu_attn_args P)
{
    int rec = (int)blockIdx.x;
    int head = rec % P.n_head, j = (rec / P.n_head) % P.q_part;
    int item_i = rec / (P.n_head * P.q_part);
    const kcu_attn_item item = P.items[item_i];
    const int ns = kcu_attn_item_split(P, item).n;
    if (j >= item.n_q || ns == 1)
        return;
    float M = -INFINITY;
    for (int s = 0; s < ns; s++)
        M = fmaxf(M, kcu_attn_part(P, item_i, j, head, s)[0]);
    float wsum = 0.0f;
    for (int s = 0; s < ns; s++) {
        const float *r = kcu_attn_part(P, item_i, j, head, s);
        if (r[1] > 0.0f)
            wsum += expf(r[0] - M) * r[1];
    }
    float *o = P.out + ((size_t)item.q_row0 + (size_t)j) * (size_t)P.n_head * (size_t)P.hd +
               (size_t)head * (size_t)P.hd;
    for (int d = (int)threadIdx.x; d < P.hd; d += (int)blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < ns; s++) {
            const float *r = kcu_attn_part(P, item_i, j, head, s);
            if (r[1] > 0.0f)
                v += expf(r[0] - M) * r[2 + d];
        }
        o[d] = wsum > 0.0f ? v / wsum : 0.0f;
    }
}

/* ---- planning -------------------------------------------------------------------- */


extern "C" int kcu_attn_mma_supported(const kcu_attn_shape *sh)
{
    int hd = sh->head_dim, D = sh->n_kv_head * hd;
    if (hd != 64 && hd != 128)
        return 0;
    if (D >= 65536 || sh->n_head % sh->n_kv_head)
        return 0;
    if (sh->L) {
        const kvq_layout *L = sh->L;
        if (L->k_mode != KVQ_K_PER_CHANNEL || L->v_group % 8 || L->kv_dim != D ||
            L->k_bits != 4 || L->v_bits != 4 || /* it unpacks nibbles */
            L->block_tokens > 65535 || L->off_kq % 8 || L->off_vq % 8)
            return 0;
    }
    return 1;
}

static int gen_tile(const kcu_attn_shape *sh, size_t limit, size_t *smem)
{
    int g = sh->n_head / sh->n_kv_head, hd = sh->head_dim;
    for (int TP = 64; TP >= 8; TP /= 2) {
        size_t f = (size_t)2 * g * hd + (size_t)2 * TP * hd + (size_t)g * TP + (size_t)3 * g;
        if (f * 4 <= limit) {
            *smem = f * 4;
            return TP;
        }
    }
    return 0;
}

extern "C" size_t kcu_attn_scratch_bytes(const kcu_attn_shape *sh, int n_items, int total_q,
                                         int max_q)
{
    size_t D = (size_t)sh->n_kv_head * (size_t)sh->head_dim;
    size_t step16 = (size_t)total_q * D * 2 * sizeof(uint16_t);
    /* batches with up to max_q queries per item include decode batches
     * (at most DECODE_MAX_Q queries), which keep split partials */
    int qd = max_q < KCU_ATTN_DECODE_MAX_Q ? max_q : KCU_ATTN_DECODE_MAX_Q;
    size_t part = (size_t)n_items * (size_t)qd * (size_t)sh->n_head * KCU_ATTN_MAX_SPLITS *
                  ((size_t)sh->head_dim + 2) * sizeof(float);
    return ((step16 + 255) & ~(size_t)255) + part + 256;
}

extern "C" int kcu_attn(kcu_ctx *c, const kcu_attn_shape *sh, const kcu_kv_arena *A, int layer,
                        const kcu_attn_item *items_host, const kcu_attn_item *items_dev,
                        int n_items, const kcu_seg *segs, const float *q, float *out,
                        const float *k_step, const float *v_step, int path, void *scratch,
                        size_t scratch_bytes, char *err, size_t errlen)
{
    if (n_items <= 0)
        return 0;
    if (sh->n_kv_head <= 0 || sh->n_head % sh->n_kv_head || sh->head_dim <= 0 ||
        A->kv_dim != sh->n_kv_head * sh->head_dim)
        return kcu_failf(err, errlen, "kcu_attn: bad head layout (%d heads, %d KV heads, "
                         "head_dim %d, kv_dim %d)", sh->n_head, sh->n_kv_head, sh->head_dim,
                         A->kv_dim);
    int use_mma = path == KCU_ATTN_MMA || (path == KCU_ATTN_AUTO && kcu_attn_mma_supported(sh));
    if (path == KCU_ATTN_MMA && !kcu_attn_mma_supported(sh))
        return kcu_failf(err, errlen, "kcu_attn: the tensor-core kernel does not support "
                         "head_dim %d with this cache layout", sh->head_dim);
    int max_q = 0, total_q = 0, rows_max = 0, step_end = 0;
    for (int i = 0; i < n_items; i++) {
        const kcu_attn_item *it = &items_host[i];
        if (it->n_q <= 0 || it->pos0 < 0 || it->step_row0 < 0)
            return kcu_failf(err, errlen, "kcu_attn: item %d has %d queries at %d", i, it->n_q,
                             it->pos0);
        max_q = it->n_q > max_q ? it->n_q : max_q;
        total_q += it->n_q;
        int rows = it->n_q * (sh->n_head / sh->n_kv_head);
        rows_max = rows > rows_max ? rows : rows_max;
        int end = it->step_row0 + it->n_q;
        step_end = end > step_end ? end : step_end;
    }
    if (step_end > total_q) /* the FP16 copy of the step rows holds total_q rows */
        return kcu_failf(err, errlen, "kcu_attn: step rows up to %d, but only %d queries",
                         step_end, total_q);
    if (scratch_bytes < kcu_attn_scratch_bytes(sh, n_items, total_q, max_q))
        return kcu_failf(err, errlen, "kcu_attn: scratch too small for %d items, %d queries",
                         n_items, total_q);
    kcu_attn_args P;
    memset(&P, 0, sizeof P);
    P.A = *A;
    P.layer = layer;
    P.items = items_dev;
    P.segs = segs;
    P.q = q;
    P.out = out;
    P.k_step = k_step;
    P.v_step = v_step;
    P.n_head = sh->n_head;
    P.n_kv = sh->n_kv_head;
    P.hd = sh->head_dim;
    P.scale = sh->scale;
    P.window = sh->window > 0 ? sh->window : 0;
    if (sh->L) {
        P.L = *sh->L;
        P.has_L = 1;
    }
    P.n_q_max = max_q;
    P.q_part = max_q < KCU_ATTN_DECODE_MAX_Q ? max_q : KCU_ATTN_DECODE_MAX_Q;
    P.mma = use_mma;
    /* the tensor-core kernel keeps few warps per block and is memory bound
     * in decode: aim at ~8 blocks per SM for enough loads in flight */
    P.split_target = (use_mma ? 8 : 2) * c->n_sm;
    P.n_splits = 1;
    for (int i = 0; i < n_items; i++) {
        int ns = kcu_attn_item_split(P, items_host[i]).n;
        P.n_splits = ns > P.n_splits ? ns : P.n_splits;
    }
    size_t D = (size_t)A->kv_dim;
    size_t step16 = (size_t)total_q * D * 2 * sizeof(uint16_t);
    P.part = (float *)((char *)scratch + ((step16 + 255) & ~(size_t)255));

    int tasks_max = 0;
    if (use_mma) {
        /* the step's own K/V as FP16 for the tensor cores: every item's rows
         * lie in [0, total_q), converted in one pass each */
        uint16_t *k16 = (uint16_t *)scratch, *v16 = k16 + (size_t)total_q * D;
        if (kcu_convert(c, KT_F16, k16, k_step, (size_t)total_q * D, err, errlen) < 0 ||
            kcu_convert(c, KT_F16, v16, v_step, (size_t)total_q * D, err, errlen) < 0)
            return -1;
        P.k_step16 = k16;
        P.v_step16 = v16;
        tasks_max = P.n_kv * ((rows_max + 7) / 8);
    }

    if (use_mma) {
        if (kcu_attn_mma_launch(c, P, n_items, tasks_max, err, errlen) < 0)
            return -1;
    } else {
        if (step16 > 0 && ((uintptr_t)scratch & 3))
            return kcu_failf(err, errlen, "kcu_attn: misaligned scratch");
        size_t smem;
        int TP = gen_tile(sh, 48 * 1024, &smem);
        if (TP == 0) {
            TP = gen_tile(sh, c->smem_optin, &smem);
            if (TP == 0)
                return kcu_failf(err, errlen, "kcu_attn: %d query heads per KV head of "
                                 "head_dim %d need more shared memory than the device has",
                                 sh->n_head / sh->n_kv_head, sh->head_dim);
            KCU_TRY(cudaFuncSetAttribute(kcu_attn_generic_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                    err, errlen);
        }
        KCU_LAUNCH(kcu_attn_generic_kernel,
                   dim3((unsigned)(max_q * P.n_kv), (unsigned)P.n_splits, (unsigned)n_items),
                   dim3(GEN_THREADS), smem, c->stream, P, TP);
        KCU_CHECK_LAUNCH(err, errlen, "kcu_attn (generic)");
    }
    if (P.n_splits > 1) {
        KCU_LAUNCH(kcu_attn_merge_kernel,
                   dim3((unsigned)(n_items * P.q_part * P.n_head)), dim3(128), 0, c->stream, P);
        KCU_CHECK_LAUNCH(err, errlen, "kcu_attn (merge)");
    }
    return 0;
}
