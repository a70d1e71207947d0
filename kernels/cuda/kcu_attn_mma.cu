/*
 * kcu_attn_mma.cu - the tensor-core attention kernel (see kcu_attn.cuh for
 * the contract and kcu_attn.cu for the launcher that plans it).
 *
 * Work: a block has KCU_MMA_WARPS warps; each warp owns 8 query rows of one
 * KV head (a row is a (query token, query head) pair of the head's GQA
 * group) and walks the split's positions chunk by chunk (64 positions) with
 * an online softmax. The block's warps share the item and split, so the
 * outliers of an INT4 block's chunk are staged once per block.
 *
 * Per 16 positions, scores come from mma.sync m16n8k16 (f16 x f16 -> f32)
 * in the transposed form S^T (positions x rows) = K (positions x channels)
 * Q^T, and outputs from O^T (channels x rows) += V^T P^T:
 *  - K from INT4 codes: A holds (code - z) exactly as f16 (the nibble goes
 *    into the mantissa of 1024 + code, then 1024 + z is subtracted); the
 *    per-channel scale is folded into Q (B = f16(q * scale * s_c)). K
 *    outliers add q * (value - dequantized) to the scores afterwards.
 *    Channels are assigned to fragment slots in the order that lets every
 *    thread read whole words of codes; Q uses the same order.
 *  - V from INT4 codes: A = f16(s_t * (code - z_t)) per (position, group of
 *    8 channels); positions are assigned so that each thread reads four
 *    consecutive rows. V outliers add P * (value - dequantized) to a small
 *    f32 correction accumulator that is rescaled with O.
 *  - FP16 pages and the step's own K/V (converted to f16) load directly.
 * The softmax weights P are rounded to f16 for the V product; the running
 * sum l uses them unrounded. Data rows past a segment's end are clamped to
 * its last row (always finite) and masked to P = 0. With a sliding window
 * the walk starts at the item's first query's window and each row's scores
 * before its own window are masked like the causal ones.
 */
#include "kernels/cuda/kcu_attn_impl.cuh"

#define ROWS 8
#define CH KCU_MMA_CH
#define W KCU_MMA_WARPS

/* floats of per-warp shared memory for head_dim hd */
static __host__ __device__ size_t warp_floats(int hd)
{
    return (size_t)ROWS * hd + (size_t)CH * ROWS + (size_t)hd * ROWS + 4 * ROWS;
}

static __device__ __forceinline__ uint2 ld2(const void *p)
{
    return *(const uint2 *)p;
}

/* Loads the n32 32-bit words at p (8-byte aligned, n32 even). */
template <int N32> static __device__ __forceinline__ void ldw(uint32_t *w, const void *p)
{
KCU_UNROLL
    for (int i = 0; i < N32 / 2; i++) {
        uint2 u = ld2((const char *)p + 8 * i);
        w[2 * i] = u.x;
        w[2 * i + 1] = u.y;
    }
}

/* Q4 pair r of a thread's K channel slice: channels 8(r/4) + r%4 and +4
 * (relative to the slice) as f16 (1024 + code) x2. */
static __device__ __forceinline__ uint32_t q4_pair(const uint32_t *w, int r)
{
    return ((w[r >> 2] >> (4 * (r & 3))) & 0x000F000Fu) | 0x64006400u;
}

/* A sub-tile with no visible position: its scores are -inf. */
static __device__ __forceinline__ void fill_empty(float *S, int st, int lane)
{
    for (int e = lane; e < 16 * ROWS; e += 32)
        S[st * 16 * ROWS + e] = -INFINITY;
}

/* The S^T fragment of sub-tile positions [pb, pb+16) into S[pos - t0][row],
 * -inf where the position is outside the valid range [tv0, tv1), after
 * the row's query (causal) or before its sliding window (window > 0), or
 * the row does not exist. */
static __device__ __forceinline__ void store_scores(float *S, const float c4[4], int pb, int t0,
                                                    int grp, int tig, int tv0, int tv1, int sp0,
                                                    const int *rq, int window)
{
KCU_UNROLL
    for (int e = 0; e < 4; e++) {
        int pr = pb + grp + (e >= 2 ? 8 : 0), r = 2 * tig + (e & 1);
        bool ok = pr >= tv0 && pr < tv1 && rq[r] >= 0 && sp0 + pr <= rq[r] &&
                  (window <= 0 || sp0 + pr > rq[r] - window);
        S[(pr - t0) * ROWS + r] = ok ? c4[e] : -INFINITY;
    }
}

/* The 4 rows a thread reads for the V fragment of the sub-tile at pb:
 * pb + 4 tig .. pb + 4 tig + 3, clamped to the segment's last row. */
static __device__ __forceinline__ void v_rows(int pp[4], int pb, int tig, int sn)
{
KCU_UNROLL
    for (int k = 0; k < 4; k++) {
        int p = pb + 4 * tig + k;
        pp[k] = p < sn ? p : sn - 1;
    }
}

/* B = P^T for sub-tile st: rows 4 tig .. 4 tig + 3 of the chunk (the V
 * fragment's position order), column (query row) grp, as f16 pairs. */
static __device__ __forceinline__ void p_fragment(const float *S, int st, int tig, int grp,
                                                  uint32_t bp[2])
{
    const float *sp = S + (st * 16 + 4 * tig) * ROWS + grp;
    bp[0] = kcu_pack_h2(sp[0], sp[ROWS]);
    bp[1] = kcu_pack_h2(sp[2 * ROWS], sp[3 * ROWS]);
}

template <int HD>
static __global__ void __launch_bounds__(W * 32) kcu_attn_mma_kernel(kcu_attn_args P)
{
    constexpr int KS = HD / 16;  /* k-steps over the channels (= m-tiles of O) */
    constexpr int NP = HD / 8;   /* channel pairs per thread slice */
    constexpr int SL = HD / 4;   /* channels per thread slice (K) */
    constexpr int NU = HD / 64;  /* 64-channel groups (V) */
    KCU_DYN_SMEM(float, sm);
    const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int grp = lane >> 2, tig = lane & 3;
    const int item_i = (int)blockIdx.z, split = (int)blockIdx.y;
    const kcu_attn_item item = P.items[item_i];
    const int n_kv = P.n_kv, g = P.n_head / n_kv, D = P.A.kv_dim;
    const int rows_total = item.n_q * g;
    const int n_rt = (rows_total + ROWS - 1) / ROWS;
    const int task = (int)blockIdx.x * W + warp;
    const bool active = task < n_kv * n_rt;
    const int h = task % n_kv, rt = task / n_kv;
    const int ctx = item.pos0 + item.n_q;
    const kcu_attn_split sp = kcu_attn_item_split(P, item);
    if (split >= sp.n)
        return; /* uniform over the block: the item has fewer splits */
    const int lo_pos = sp.base + split * sp.span; /* from the first query's window */
    const int hi_pos = lo_pos + sp.span < ctx ? lo_pos + sp.span : ctx;
    const int out_cap = P.has_L ? P.L.out_cap : 0;

    /* shared memory: block staging, then one region per warp */
    uint32_t *kst = (uint32_t *)sm;
    float *ksd = (float *)(kst + out_cap);
    uint32_t *vst = (uint32_t *)(ksd + out_cap);
    float *vsd = (float *)(vst + out_cap);
    int *cnt = (int *)(vsd + out_cap); /* nk, nv, klo, vlo */
    float *wb = (float *)(cnt + 4) + (size_t)warp * warp_floats(HD);
    float *qf = wb;                   /* [ROWS][HD] q * scale */
    float *S = qf + ROWS * HD;        /* [CH][ROWS] scores, then P */
    float *corr = S + CH * ROWS;      /* [HD][ROWS] V outlier corrections */
    float *rm = corr + HD * ROWS;     /* [ROWS] running max */
    float *rl = rm + ROWS;            /* [ROWS] running sum */
    float *ra = rl + ROWS;            /* [ROWS] rescale factor of the chunk */
    int *rq = (int *)(ra + ROWS);     /* [ROWS] query position, -1: no row */

    float o[KS][4];
    uint32_t bq[KS][2], zp[NP]; /* Q as B fragments (per segment kind), K zero pairs */
KCU_UNROLL
    for (int i = 0; i < KS; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    const int sl = tig * SL; /* this thread's K channel slice, head-relative */

    if (active) {
        for (int e = lane; e < ROWS * HD; e += 32) {
            int r = e / HD, d = e % HD, grow = rt * ROWS + r;
            float v = 0.0f;
            if (grow < rows_total) {
                int j = grow / g, head = h * g + grow % g;
                v = P.q[((size_t)item.q_row0 + (size_t)j) * (size_t)P.n_head * HD +
                        (size_t)head * HD + (size_t)d] * P.scale;
            }
            qf[e] = v;
        }
        for (int e = lane; e < HD * ROWS; e += 32)
            corr[e] = 0.0f;
        if (lane < ROWS) {
            int grow = rt * ROWS + lane;
            rq[lane] = grow < rows_total ? item.pos0 + grow / g : -1;
            rm[lane] = -INFINITY;
            rl[lane] = 0.0f;
        }
        __syncwarp();
    }

    const size_t head_c = (size_t)h * HD; /* first channel of the head */
    for (int si = 0; si <= item.n_segs; si++) { /* block-uniform */
        kcu_attn_seg_view sv = kcu_attn_segment(P, item, si, P.k_step16, P.v_step16);
        const int kind = sv.kind, sp0 = sv.pos0, sn = sv.n;
        int a = sp0 > lo_pos ? sp0 : lo_pos;
        int b = sp0 + sn < hi_pos ? sp0 + sn : hi_pos;
        if (a >= b)
            continue;
        const char *blk = sv.blk;
        const uint16_t *pk = sv.pk, *pv = sv.pv; /* the step: its f16 copy */
        const int tv0 = a - sp0, tv1 = b - sp0; /* valid segment-relative range */
        const int ng = P.has_L ? D / P.L.v_group : 1;

        if (kind != KVS_Q4 && active) {
            /* B for FP16 K: pair r = slice channels 2r, 2r+1 */
KCU_UNROLL
            for (int js = 0; js < KS; js++)
KCU_UNROLL
                for (int e = 0; e < 2; e++) {
                    const float *qr = qf + grp * HD + sl + 2 * (2 * js + e);
                    bq[js][e] = kcu_pack_h2(qr[0], qr[1]);
                }
        }
        if (kind == KVS_Q4 && active) {
            /* this block's K scales fold into Q; its zeros into the pairs */
            const uint16_t *ks = (const uint16_t *)(blk + P.L.off_ks) + head_c + sl;
            /* 4-bit codes only here, so 4-bit zeros (kvq.h) */
            const uint8_t *kz = (const uint8_t *)(blk + P.L.off_kz);
            const size_t kz0 = (size_t)head_c + (size_t)sl;
KCU_UNROLL
            for (int r = 0; r < NP; r++) {
                int c0 = 8 * (r >> 2) + (r & 3), c1 = c0 + 4;
                zp[r] = 0x64006400u | (uint32_t)kcu_zero_at(kz, kz0 + (size_t)c0, 4) |
                        ((uint32_t)kcu_zero_at(kz, kz0 + (size_t)c1, 4) << 16);
            }
KCU_UNROLL
            for (int js = 0; js < KS; js++)
KCU_UNROLL
                for (int e = 0; e < 2; e++) {
                    int r = 2 * js + e;
                    int c0 = 8 * (r >> 2) + (r & 3), c1 = c0 + 4;
                    const float *qr = qf + grp * HD + sl;
                    bq[js][e] = kcu_pack_h2(qr[c0] * kcu_h2f(ks[c0]), qr[c1] * kcu_h2f(ks[c1]));
                }
        }

        for (int t0 = tv0 / CH * CH; t0 < tv1; t0 += CH) { /* block-uniform */
            if (kind == KVS_Q4) {
                /* stage this chunk's outliers (all heads) with their
                 * corrections value - dequantized */
                __syncthreads();
                const kvq_block_hdr *hdr = (const kvq_block_hdr *)blk;
                if (tid == 0) {
                    for (int tensor = 0; tensor < 2; tensor++) {
                        uint32_t no = tensor ? hdr->n_vout : hdr->n_kout;
                        if (no > (uint32_t)out_cap)
                            no = (uint32_t)out_cap;
                        uint32_t key0 = (uint32_t)t0 * (uint32_t)D;
                        uint32_t key1 = (uint32_t)(t0 + CH) * (uint32_t)D;
                        uint32_t lo = 0, hi = no;
                        while (lo < hi) {
                            uint32_t mid = (lo + hi) / 2;
                            if (kcu_oidx(blk, P.L, tensor, mid) < key0)
                                lo = mid + 1;
                            else
                                hi = mid;
                        }
                        uint32_t first = lo;
                        hi = no;
                        while (lo < hi) {
                            uint32_t mid = (lo + hi) / 2;
                            if (kcu_oidx(blk, P.L, tensor, mid) < key1)
                                lo = mid + 1;
                            else
                                hi = mid;
                        }
                        cnt[tensor] = (int)(lo - first);
                        cnt[2 + tensor] = (int)first;
                    }
                }
                __syncthreads();
                for (int tensor = 0; tensor < 2; tensor++) {
                    int n_st = cnt[tensor], first = cnt[2 + tensor];
                    const uint16_t *ov = (const uint16_t *)(blk + (tensor ? P.L.off_vout_val
                                                                          : P.L.off_kout_val));
                    const uint8_t *cq = (const uint8_t *)(blk + (tensor ? P.L.off_vq : P.L.off_kq));
                    const uint16_t *cs = (const uint16_t *)(blk + (tensor ? P.L.off_vs : P.L.off_ks));
                    const uint8_t *cz = (const uint8_t *)(blk + (tensor ? P.L.off_vz : P.L.off_kz));
                    uint32_t *dst = tensor ? vst : kst;
                    float *dd = tensor ? vsd : ksd;
                    for (int i = tid; i < n_st; i += W * 32) {
                        uint32_t el = kcu_oidx(blk, P.L, tensor, (uint32_t)(first + i));
                        int t = (int)(el / (uint32_t)D), c = (int)(el % (uint32_t)D);
                        int code = (cq[el >> 1] >> ((el & 1) * 4)) & 0xf;
                        size_t si2 = tensor ? (size_t)t * (size_t)ng + (size_t)(c / P.L.v_group)
                                            : (size_t)c;
                        float deq = __fmul_rn(kcu_h2f(cs[si2]),
                                              (float)(code - kcu_zero_at(cz, si2, 4)));
                        dst[i] = ((uint32_t)(t - t0) << 16) | (uint32_t)c;
                        dd[i] = kcu_h2f(ov[first + i]) - deq;
                    }
                }
                __syncthreads();
            }
            if (!active)
                continue;

            /* ---- scores S[pos][row] for the chunk's 4 sub-tiles ---- */
            if (kind == KVS_Q4) {
                /* all of the chunk's code words first (bytes in flight),
                 * then the MMAs */
                const uint8_t *kq = (const uint8_t *)(blk + P.L.off_kq);
                uint32_t kw[CH / 16][2][HD / 32];
KCU_UNROLL
                for (int st = 0; st < CH / 16; st++) {
                    int pb = t0 + st * 16;
                    if (!(pb < tv1 && pb + 16 > tv0))
                        continue;
                    int pa = pb + grp < sn ? pb + grp : sn - 1;
                    int pc = pb + grp + 8 < sn ? pb + grp + 8 : sn - 1;
                    ldw<HD / 32>(kw[st][0], kq + (((size_t)pa * D + head_c + sl) >> 1));
                    ldw<HD / 32>(kw[st][1], kq + (((size_t)pc * D + head_c + sl) >> 1));
                }
KCU_UNROLL
                for (int st = 0; st < CH / 16; st++) {
                    int pb = t0 + st * 16;
                    if (!(pb < tv1 && pb + 16 > tv0)) {
                        fill_empty(S, st, lane);
                        continue;
                    }
                    float c4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
KCU_UNROLL
                    for (int js = 0; js < KS; js++) {
                        uint32_t af[4];
                        af[0] = kcu_hsub2(q4_pair(kw[st][0], 2 * js), zp[2 * js]);
                        af[1] = kcu_hsub2(q4_pair(kw[st][1], 2 * js), zp[2 * js]);
                        af[2] = kcu_hsub2(q4_pair(kw[st][0], 2 * js + 1), zp[2 * js + 1]);
                        af[3] = kcu_hsub2(q4_pair(kw[st][1], 2 * js + 1), zp[2 * js + 1]);
                        kcu_mma16816(c4, af, bq[js]);
                    }
                    store_scores(S, c4, pb, t0, grp, tig, tv0, tv1, sp0, rq, P.window);
                }
            } else {
KCU_NOUNROLL
                for (int st = 0; st < CH / 16; st++) {
                    int pb = t0 + st * 16;
                    if (!(pb < tv1 && pb + 16 > tv0)) {
                        fill_empty(S, st, lane);
                        continue;
                    }
                    int pa = pb + grp < sn ? pb + grp : sn - 1;
                    int pc = pb + grp + 8 < sn ? pb + grp + 8 : sn - 1;
                    float c4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    uint32_t wa[NP], wc[NP];
                    ldw<NP>(wa, pk + (size_t)pa * D + head_c + sl);
                    ldw<NP>(wc, pk + (size_t)pc * D + head_c + sl);
KCU_UNROLL
                    for (int js = 0; js < KS; js++) {
                        uint32_t af[4] = {wa[2 * js], wc[2 * js], wa[2 * js + 1], wc[2 * js + 1]};
                        kcu_mma16816(c4, af, bq[js]);
                    }
                    store_scores(S, c4, pb, t0, grp, tig, tv0, tv1, sp0, rq, P.window);
                }
            }
            __syncwarp();
            if (kind == KVS_Q4) {
                int nk = cnt[0];
                for (int i = lane; i < nk; i += 32) {
                    uint32_t u = kst[i];
                    int c = (int)(u & 0xffffu) - (int)head_c;
                    if (c < 0 || c >= HD)
                        continue;
                    int tr = (int)(u >> 16);
                    float dl = ksd[i];
KCU_UNROLL
                    for (int r = 0; r < ROWS; r++)
                        atomicAdd(&S[tr * ROWS + r], qf[r * HD + c] * dl);
                }
                __syncwarp();
            }

            /* ---- online softmax: 4 lanes per row, 16 positions each ---- */
            {
                int r = lane >> 2, qq = lane & 3;
                float *sr = S + qq * 16 * ROWS + r;
                float mx = -INFINITY;
                for (int p = 0; p < 16; p++)
                    mx = fmaxf(mx, sr[p * ROWS]);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float m_old = rm[r];
                float m_new = fmaxf(m_old, mx);
                float alpha = 1.0f, sum = 0.0f;
                if (m_new != -INFINITY) {
                    alpha = expf(m_old - m_new);
                    for (int p = 0; p < 16; p++) {
                        float w = expf(sr[p * ROWS] - m_new);
                        sr[p * ROWS] = w;
                        sum += w;
                    }
                } else {
                    for (int p = 0; p < 16; p++)
                        sr[p * ROWS] = 0.0f;
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                __syncwarp(); /* every lane has read rm[r] */
                if (qq == 0) {
                    rm[r] = m_new;
                    rl[r] = rl[r] * alpha + sum;
                    ra[r] = alpha;
                }
            }
            __syncwarp();
            {
                float a0 = ra[2 * tig], a1 = ra[2 * tig + 1];
                if (!__all_sync(0xffffffffu, a0 == 1.0f && a1 == 1.0f)) {
KCU_UNROLL
                    for (int i = 0; i < KS; i++) {
                        o[i][0] *= a0;
                        o[i][1] *= a1;
                        o[i][2] *= a0;
                        o[i][3] *= a1;
                    }
                    for (int e = lane; e < HD * ROWS; e += 32)
                        corr[e] *= ra[e % ROWS];
                }
            }
            __syncwarp();

            /* ---- O^T += V^T P^T ---- */
            if (kind == KVS_Q4) {
                const uint8_t *vq = (const uint8_t *)(blk + P.L.off_vq);
                const uint16_t *vs = (const uint16_t *)(blk + P.L.off_vs);
                const uint8_t *vz = (const uint8_t *)(blk + P.L.off_vz);
                /* two sub-tiles at a time: their loads (code words and the
                 * (zero, scale) pairs of each position pair) first, then
                 * the MMAs */
KCU_UNROLL
                for (int s2 = 0; s2 < CH / 16; s2 += 2) {
                    uint32_t vw[2][NU][4], zpp[2][NU][2], spp[2][NU][2];
KCU_UNROLL
                    for (int h2 = 0; h2 < 2; h2++) {
                        int pb = t0 + (s2 + h2) * 16;
                        if (!(pb < tv1 && pb + 16 > tv0))
                            continue;
                        int pp[4];
                        v_rows(pp, pb, tig, sn);
KCU_UNROLL
                        for (int u = 0; u < NU; u++) {
                            size_t c8 = head_c + 64 * u + 8 * grp; /* this thread's 8 channels */
                            size_t gi = c8 / (size_t)P.L.v_group;
KCU_UNROLL
                            for (int k = 0; k < 4; k++)
                                vw[h2][u][k] =
                                    *(const uint32_t *)(vq + (((size_t)pp[k] * D + c8) >> 1));
KCU_UNROLL
                            for (int k2 = 0; k2 < 2; k2++) {
                                size_t s0 = (size_t)pp[2 * k2] * (size_t)ng + gi;
                                size_t s1 = (size_t)pp[2 * k2 + 1] * (size_t)ng + gi;
                                zpp[h2][u][k2] = 0x64006400u |
                                                 (uint32_t)kcu_zero_at(vz, s0, 4) |
                                                 ((uint32_t)kcu_zero_at(vz, s1, 4) << 16);
                                spp[h2][u][k2] = (uint32_t)vs[s0] | ((uint32_t)vs[s1] << 16);
                            }
                        }
                    }
KCU_UNROLL
                    for (int h2 = 0; h2 < 2; h2++) {
                        int st = s2 + h2, pb = t0 + st * 16;
                        if (!(pb < tv1 && pb + 16 > tv0))
                            continue;
                        uint32_t bp[2];
                        p_fragment(S, st, tig, grp, bp);
KCU_UNROLL
                        for (int u = 0; u < NU; u++)
KCU_UNROLL
                            for (int ii = 0; ii < 4; ii++) {
                                unsigned sel = (unsigned)ii | ((unsigned)(4 + ii) << 8);
                                uint32_t t01 = __byte_perm(vw[h2][u][0], vw[h2][u][1], sel);
                                uint32_t t23 = __byte_perm(vw[h2][u][2], vw[h2][u][3], sel);
                                uint32_t z01 = zpp[h2][u][0], s01 = spp[h2][u][0];
                                uint32_t z23 = zpp[h2][u][1], s23 = spp[h2][u][1];
                                uint32_t af[4];
                                af[0] = kcu_hmul2(kcu_hsub2((t01 & 0x000F000Fu) | 0x64006400u, z01), s01);
                                af[1] = kcu_hmul2(kcu_hsub2(((t01 >> 4) & 0x000F000Fu) | 0x64006400u, z01), s01);
                                af[2] = kcu_hmul2(kcu_hsub2((t23 & 0x000F000Fu) | 0x64006400u, z23), s23);
                                af[3] = kcu_hmul2(kcu_hsub2(((t23 >> 4) & 0x000F000Fu) | 0x64006400u, z23), s23);
                                kcu_mma16816(o[4 * u + ii], af, bp);
                            }
                    }
                }
            } else {
KCU_NOUNROLL
                for (int st = 0; st < CH / 16; st++) {
                    int pb = t0 + st * 16;
                    if (!(pb < tv1 && pb + 16 > tv0))
                        continue;
                    uint32_t bp[2];
                    p_fragment(S, st, tig, grp, bp);
                    int pp[4];
                    v_rows(pp, pb, tig, sn);
KCU_UNROLL
                    for (int u = 0; u < NU; u++) {
                        size_t c8 = head_c + 64 * u + 8 * grp;
                        uint32_t w8[4][4];
KCU_UNROLL
                        for (int k = 0; k < 4; k++)
                            ldw<4>(w8[k], pv + (size_t)pp[k] * D + c8);
KCU_UNROLL
                        for (int ii = 0; ii < 4; ii++) {
                            uint32_t af[4];
                            af[0] = __byte_perm(w8[0][ii], w8[1][ii], 0x5410);
                            af[1] = __byte_perm(w8[0][ii], w8[1][ii], 0x7632);
                            af[2] = __byte_perm(w8[2][ii], w8[3][ii], 0x5410);
                            af[3] = __byte_perm(w8[2][ii], w8[3][ii], 0x7632);
                            kcu_mma16816(o[4 * u + ii], af, bp);
                        }
                    }
                }
            }
            if (kind == KVS_Q4) {
                __syncwarp();
                int nv = cnt[1];
                for (int i = lane; i < nv; i += 32) {
                    uint32_t u = vst[i];
                    int c = (int)(u & 0xffffu) - (int)head_c;
                    if (c < 0 || c >= HD)
                        continue;
                    int tr = (int)(u >> 16);
                    float dl = vsd[i];
KCU_UNROLL
                    for (int r = 0; r < ROWS; r++) {
                        float pw = S[tr * ROWS + r];
                        if (pw != 0.0f)
                            atomicAdd(&corr[c * ROWS + r], pw * dl);
                    }
                }
            }
            __syncwarp();
        }
    }

    if (!active)
        return;
    /* ---- results: O^T fragment (channel, row) plus the corrections ---- */
KCU_UNROLL
    for (int i = 0; i < KS; i++) {
        int u = i / 4, ii = i % 4;
KCU_UNROLL
        for (int e = 0; e < 4; e++) {
            int ch = 64 * u + 8 * grp + 2 * ii + (e >= 2 ? 1 : 0);
            int r = 2 * tig + (e & 1);
            int grow = rt * ROWS + r;
            if (grow >= rows_total)
                continue;
            int j = grow / g, head = h * g + grow % g;
            float v = o[i][e] + corr[ch * ROWS + r];
            if (sp.n == 1) {
                float l = rl[r];
                P.out[((size_t)item.q_row0 + (size_t)j) * (size_t)P.n_head * HD +
                      (size_t)head * HD + (size_t)ch] = l > 0.0f ? v / l : 0.0f;
            } else {
                float *rec = kcu_attn_part(P, item_i, j, head, split);
                rec[2 + ch] = v;
                if (ch == 0) {
                    rec[0] = rm[r];
                    rec[1] = rl[r];
                }
            }
        }
    }
}

size_t kcu_attn_mma_smem(const kcu_attn_args &P)
{
    int out_cap = P.has_L ? P.L.out_cap : 0;
    return (size_t)4 * out_cap * 4 + 16 + (size_t)W * warp_floats(P.hd) * 4;
}

int kcu_attn_mma_launch(kcu_ctx *c, const kcu_attn_args &P, int n_items, int tasks_max,
                        char *err, size_t errlen)
{
    size_t smem = kcu_attn_mma_smem(P);
    if (smem > c->smem_optin)
        return kcu_failf(err, errlen, "kcu_attn: the tensor-core kernel needs %zu bytes of "
                         "shared memory (outlier budget too large for the device)", smem);
    dim3 grid((unsigned)((tasks_max + W - 1) / W), (unsigned)P.n_splits, (unsigned)n_items);
    /* opting in to more than 48 KiB of shared memory is done once per size
     * increase (engine thread only) */
    static size_t optin[2];
    int which = P.hd == 64 ? 0 : 1;
    void (*kern)(kcu_attn_args) = which ? kcu_attn_mma_kernel<128> : kcu_attn_mma_kernel<64>;
    if (smem > 48 * 1024 && smem > optin[which]) {
        KCU_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)smem),
                err, errlen);
        optin[which] = smem;
    }
    KCU_LAUNCH(kern, grid, dim3(W * 32), smem, c->stream, P);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_attn (tensor cores)");
    return 0;
}
