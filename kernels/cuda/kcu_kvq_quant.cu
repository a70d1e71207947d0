/*
 * kcu_kvq_quant.cu - block quantization kernels (see kcu_kvq_quant.cuh).
 *
 * Per call, for n target blocks:
 *  1. zero: every target block is cleared (the reference memsets the block,
 *     so padding, unused token slots and outlier slots are zero);
 *  2. minmax (only when no K range is given): per-channel K min/max of each
 *     block's rows;
 *  3. tiles: one thread block per (target, tile of R token rows) computes
 *     the scale/zero snapshots (K per channel from the range, or per
 *     (token, group); V per (token, group) from the values the EMA band
 *     does not flag), the codes (4 bits: byte pairs; other widths OR'ed
 *     into the zeroed bit stream, kvq.h), and the outlier candidates with
 *     their excursion, written in element order (a block-wide prefix sum
 *     per step of 8 elements per thread) into the tile's scratch region;
 *  4. select: one thread block per target keeps the out_cap candidates of
 *     largest excursion (a radix select finds the threshold; candidates
 *     equal to it are kept in index order), writes the outlier lists and
 *     the header (n_tok, n_kout, n_vout, n_clamped).
 * Every rounding step mirrors kvq_ref.c with explicitly rounded f32
 * operations (no contraction), so the blocks are bit-identical.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_kvq_quant.cuh"

#define KQ_THREADS 256
#define KQ_PER_THREAD 8 /* elements per thread per step (4 code bytes) */
#define FP16_MAX_F 65504.0f

/* Per-target scratch layout (offsets in bytes, each 8-aligned). */
struct kq_scratch {
    size_t per_tgt;
    size_t off_mm;     /* float [2][D]: the block's own K min / max */
    size_t off_cidx;   /* uint32 [2][T*D]: candidates' element indices */
    size_t off_cexc;   /* float [2][T*D]: their excursions */
    size_t off_ccnt;   /* int [2][n_tiles]: candidates per tile */
    size_t off_nonfin; /* int: non-finite inputs */
};

struct kq_args {
    kvq_layout L;
    char *qarena;
    size_t q_stride, q_layer;
    int layer;
    const kcu_q_tgt *tgts;
    const float *k, *v;
    size_t stride;
    const float *k_lo, *k_hi, *v_lo, *v_hi;
    char *scr;
    kq_scratch S;
    int R, n_tiles;
};

static size_t kq_align8(size_t x)
{
    return (x + 7) & ~(size_t)7;
}

/* ---- the reference's scalar math ------------------------------------------ */

static __device__ __forceinline__ float kq_minf(float a, float b) { return b < a ? b : a; }
static __device__ __forceinline__ float kq_maxf(float a, float b) { return b > a ? b : a; }

static __device__ __forceinline__ int kq_round_away(float q)
{
    int i = __float2int_rz(q);
    float f = __fsub_rn(q, (float)i);
    return i + (f >= 0.5f) - (f <= -0.5f);
}

static __device__ uint16_t kq_f16_round_up(float s)
{
    if (!(s < FP16_MAX_F))
        return 0x7bff;
    uint16_t h = kcu_f2h(s);
    if (kcu_h2f(h) < s)
        h++;
    return h;
}

/* Stores zero zz at entry i of a zeroed zero array of zb bits per entry
 * (kvq.h: 4-bit entries share bytes, so word-wise atomicOr). */
static __device__ __forceinline__ void kq_put_zero(uint8_t *z, size_t i, int zb, int zz)
{
    if (zb == 8) {
        z[i] = (uint8_t)zz;
        return;
    }
    size_t bit = i * 4;
    atomicOr((unsigned *)z + (bit >> 5), (unsigned)zz << (unsigned)(bit & 31));
}

/* kvq_scale_zero_bits, lv = 2^bits - 1 */
static __device__ void kq_scale_zero(float lo, float hi, int lv, uint16_t *s16, int *z)
{
    float l = isfinite(lo) ? kq_minf(lo, 0.0f) : 0.0f;
    float h = isfinite(hi) ? kq_maxf(hi, 0.0f) : 0.0f;
    float w = kq_maxf(__fsub_rn(h, l), KVQ_EPS);
    uint16_t s = kq_f16_round_up(__fdiv_rn(w, (float)lv));
    float sf = kcu_h2f(s);
    float zf = __fdiv_rn(-l, sf);
    *s16 = s;
    *z = zf >= (float)lv ? lv : kq_round_away(zf);
}

/* code_of: clamped code of finite x; *exc = steps beyond the half-step band */
static __device__ __forceinline__ int kq_code(float x, float s, int z, int lv, float *exc)
{
    float q = __fdiv_rn(x, s);
    float qc = q < -512.0f ? -512.0f : (q > 512.0f ? 512.0f : q);
    int r = kq_round_away(qc) + z;
    if (r < 0) {
        *exc = __fsub_rn(__fsub_rn(-(float)z, 0.5f), q);
        return 0;
    }
    if (r > lv) {
        *exc = __fsub_rn(q, __fadd_rn((float)(lv - z), 0.5f));
        return lv;
    }
    *exc = 0.0f;
    return r;
}

/* The V flag band of channel c: [lo - s_c/2, hi + s_c/2] from the EMA range,
 * everything for a channel without a range. */
static __device__ __forceinline__ void kq_band(const float *v_lo, const float *v_hi, int c,
                                               int lv, float *flo, float *fhi)
{
    float lo = v_lo[c], hi = v_hi[c];
    if (isnan(lo) || isnan(hi)) {
        *flo = -INFINITY;
        *fhi = INFINITY;
        return;
    }
    float half = __fdiv_rn(__fmul_rn(0.5f, kq_maxf(__fsub_rn(hi, lo), KVQ_EPS)), (float)lv);
    *flo = __fsub_rn(lo, half);
    *fhi = __fadd_rn(hi, half);
}

static __device__ __forceinline__ char *kq_block(const kq_args &A, int id)
{
    return A.qarena + (size_t)id * A.q_stride + (size_t)A.layer * A.q_layer;
}

static __device__ __forceinline__ char *kq_scr(const kq_args &A, int j)
{
    return A.scr + (size_t)j * A.S.per_tgt;
}

/* ---- 1. zero ----------------------------------------------------------------- */

static __global__ void kcu_kq_zero_kernel(kq_args A)
{
    kcu_q_tgt tg = A.tgts[blockIdx.x];
    uint2 *b = (uint2 *)kq_block(A, tg.id);
    size_t words = A.L.bytes / 8;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < words;
         i += (size_t)gridDim.y * blockDim.x)
        b[i] = make_uint2(0u, 0u);
    if (blockIdx.y == 0 && threadIdx.x == 0)
        *(int *)(kq_scr(A, (int)blockIdx.x) + A.S.off_nonfin) = 0;
}

/* ---- 2. per-block K min/max (no EMA range given) ----------------------------- */

static __global__ void kcu_kq_minmax_kernel(kq_args A)
{
    int j = (int)blockIdx.x;
    int c = (int)(blockIdx.y * blockDim.x + threadIdx.x);
    int D = A.L.kv_dim;
    if (c >= D)
        return;
    kcu_q_tgt tg = A.tgts[j];
    int n = tg.n < 0 ? 0 : (tg.n > A.L.block_tokens ? A.L.block_tokens : tg.n);
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < n; t++) {
        float x = A.k[((size_t)tg.row0 + (size_t)t) * A.stride + (size_t)c];
        if (isfinite(x)) {
            lo = kq_minf(lo, x);
            hi = kq_maxf(hi, x);
        }
    }
    if (lo > hi)
        lo = hi = 0.0f;
    float *mm = (float *)(kq_scr(A, j) + A.S.off_mm);
    mm[c] = lo;
    mm[D + c] = hi;
}

/* ---- 3. tiles ------------------------------------------------------------------ */

/* Scale/zero of every (row, group) of the tile rows [t0, t1): min/max of the
 * finite values the band does not flag (all of them when there is no band
 * or none is left), written to the snapshot (s16, z) and to gs/gz. */
static __device__ void kq_group_scales(const kq_args &A, const float *x, size_t row0, int t0,
                                       int t1, int lv, const float *flo_src,
                                       const float *fhi_src, uint16_t *s16, uint8_t *zs,
                                       float *gs, int *gz)
{
    int D = A.L.kv_dim, G = A.L.v_group, ng = D / G;
    int pairs = (t1 - t0) * ng;
    for (int i = (int)threadIdx.x; i < pairs; i += KQ_THREADS) {
        int t = t0 + i / ng, g = i % ng;
        const float *row = x + (row0 + (size_t)t) * A.stride;
        float mn = INFINITY, mx = -INFINITY, amn = INFINITY, amx = -INFINITY;
        for (int c = g * G; c < g * G + G; c++) {
            float v = row[c];
            if (!isfinite(v))
                continue;
            amn = kq_minf(amn, v);
            amx = kq_maxf(amx, v);
            bool unflagged = true;
            if (flo_src) {
                float flo, fhi;
                kq_band(flo_src, fhi_src, c, lv, &flo, &fhi);
                unflagged = v >= flo && v <= fhi;
            }
            if (unflagged) {
                mn = kq_minf(mn, v);
                mx = kq_maxf(mx, v);
            }
        }
        if (mn > mx) {
            mn = amn;
            mx = amx;
        }
        if (mn > mx)
            mn = mx = 0.0f;
        uint16_t s;
        int z;
        kq_scale_zero(mn, mx, lv, &s, &z);
        size_t si = (size_t)t * (size_t)ng + (size_t)g;
        s16[si] = s;
        kq_put_zero(zs, si, lv <= 15 ? 4 : 8, z);
        gs[i] = kcu_h2f(s);
        gz[i] = z;
    }
}

/* Codes and candidates of one tensor over the tile rows [t0, t1). Grid
 * per channel (rs, rz) or per (row, group) (gs, gz). Candidates (when
 * cands) are values beyond the grid's half-step band, and, with a band,
 * outside it. Writes codes, the tile's candidate list and count; returns
 * (in every thread) nothing; adds the non-finite count to *nonfin. */
static __device__ void kq_tensor(const kq_args &A, int tensor, const float *x, size_t row0,
                                 int t0, int t1, int bits, uint8_t *codes, bool per_channel,
                                 const float *rs, const int *rz, const float *gs, const int *gz,
                                 bool cands, const float *flo_src, const float *fhi_src,
                                 uint32_t *cidx, float *cexc, int *ccnt, int *nonfin, int *ws)
{
    int D = A.L.kv_dim, G = A.L.v_group, ng = D / G;
    int E = (t1 - t0) * D;
    int running = 0, bad = 0;
    const int lv = (1 << bits) - 1;
    for (int e0 = 0; e0 < E; e0 += KQ_THREADS * KQ_PER_THREAD) { /* block-uniform */
        int my = e0 + (int)threadIdx.x * KQ_PER_THREAD;
        unsigned flags = 0;
        float excs[KQ_PER_THREAD];
        uint32_t eidx[KQ_PER_THREAD];
        if (my < E) {
            int t = t0 + my / D, c = my % D;
            uint8_t byte = 0;
            for (int q = 0; q < KQ_PER_THREAD && my + q < E; q++) {
                float xv = x[(row0 + (size_t)t) * A.stride + (size_t)c];
                float s;
                int z;
                if (per_channel) {
                    s = rs[c];
                    z = rz[c];
                } else {
                    int gi = (t - t0) * ng + c / G;
                    s = gs[gi];
                    z = gz[gi];
                }
                int code;
                float exc = 0.0f;
                if (!isfinite(xv)) {
                    code = isnan(xv) ? z : (xv > 0 ? lv : 0);
                    bad++;
                } else {
                    code = kq_code(xv, s, z, lv, &exc);
                    if (cands && exc > 0.0f) {
                        bool out = true;
                        if (flo_src) {
                            float flo, fhi;
                            kq_band(flo_src, fhi_src, c, lv, &flo, &fhi);
                            out = xv < flo || xv > fhi;
                        }
                        if (out) {
                            flags |= 1u << q;
                            excs[q] = exc;
                            eidx[q] = (uint32_t)t * (uint32_t)D + (uint32_t)c;
                        }
                    }
                }
                size_t el = (size_t)t * (size_t)D + (size_t)c;
                if (bits != 4) {
                    /* other widths: OR the code into the zeroed stream word
                     * by word (kvq.h: code el at bit el*bits; a code may
                     * share a word with another thread's) */
                    size_t bit = el * (size_t)bits;
                    unsigned *w = (unsigned *)codes + (bit >> 5);
                    unsigned sh = (unsigned)(bit & 31);
                    atomicOr(w, (unsigned)code << sh);
                    if (sh + (unsigned)bits > 32)
                        atomicOr(w + 1, (unsigned)code >> (32 - sh));
                } else if ((el & 1) == 0) {
                    byte = (uint8_t)code;
                } else {
                    byte |= (uint8_t)(code << 4);
                    codes[el >> 1] = byte;
                }
                if (++c == D) {
                    c = 0;
                    t++;
                }
            }
        }
        int tot;
        int pre = kcu_block_exscan(__popc(flags), ws, &tot);
        int o = running + pre;
        for (int q = 0; q < KQ_PER_THREAD; q++)
            if (flags & (1u << q)) {
                cidx[o] = eidx[q];
                cexc[o] = excs[q];
                o++;
            }
        running += tot;
    }
    if (threadIdx.x == 0)
        ccnt[tensor * A.n_tiles + (int)blockIdx.y] = running;
    for (int o = 16; o > 0; o >>= 1)
        bad += __shfl_xor_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31) == 0 && bad)
        atomicAdd(nonfin, bad);
}

static __global__ void __launch_bounds__(KQ_THREADS) kcu_kq_tile_kernel(kq_args A)
{
    KCU_DYN_SMEM(float, smem);
    __shared__ int ws[33];
    const kvq_layout &L = A.L;
    int j = (int)blockIdx.x, tile = (int)blockIdx.y;
    int D = L.kv_dim, T = L.block_tokens, ng = D / L.v_group;
    kcu_q_tgt tg = A.tgts[j];
    int n = tg.n < 0 ? 0 : (tg.n > T ? T : tg.n);
    int t0 = tile * A.R, t1 = t0 + A.R < n ? t0 + A.R : n;
    if (t1 < t0)
        t1 = t0;
    char *base = kq_block(A, tg.id);
    char *scr = kq_scr(A, j);
    float *rs = smem;                 /* [D] */
    int *rz = (int *)(smem + D);      /* [D] */
    float *gs = smem + 2 * D;         /* [R * ng] */
    int *gz = (int *)(gs + A.R * ng); /* [R * ng] */
    int *nonfin = (int *)(scr + A.S.off_nonfin);
    int *ccnt = (int *)(scr + A.S.off_ccnt);
    size_t TD = (size_t)T * (size_t)D;
    size_t creg = (size_t)tile * (size_t)A.R * (size_t)D;
    uint32_t *cidx = (uint32_t *)(scr + A.S.off_cidx);
    float *cexc = (float *)(scr + A.S.off_cexc);
    uint16_t *ks = (uint16_t *)(base + L.off_ks);
    uint8_t *kz = (uint8_t *)(base + L.off_kz);
    bool per_channel = L.k_mode == KVQ_K_PER_CHANNEL;

    /* K grid */
    if (per_channel) {
        const float *mm = (const float *)(scr + A.S.off_mm);
        for (int c = (int)threadIdx.x; c < D; c += KQ_THREADS) {
            float lo = A.k_lo ? A.k_lo[c] : mm[c];
            float hi = A.k_lo ? A.k_hi[c] : mm[D + c];
            uint16_t s;
            int z;
            kq_scale_zero(lo, hi, (1 << L.k_bits) - 1, &s, &z);
            rs[c] = kcu_h2f(s);
            rz[c] = z;
            if (tile == 0) {
                ks[c] = s;
                kq_put_zero(kz, (size_t)c, L.k_zbits, z);
            }
        }
    } else {
        kq_group_scales(A, A.k, (size_t)tg.row0, t0, t1, (1 << L.k_bits) - 1, NULL, NULL, ks, kz,
                        gs, gz);
    }
    __syncthreads();
    kq_tensor(A, 0, A.k, (size_t)tg.row0, t0, t1, L.k_bits, (uint8_t *)(base + L.off_kq),
              per_channel, rs,
              rz, gs, gz, per_channel && A.k_lo != NULL, NULL, NULL, cidx + creg, cexc + creg,
              ccnt, nonfin, ws);
    __syncthreads();
    /* V grid: per (token, group), the EMA band leaving out what it flags */
    kq_group_scales(A, A.v, (size_t)tg.row0, t0, t1, (1 << L.v_bits) - 1, A.v_lo, A.v_hi,
                    (uint16_t *)(base + L.off_vs), (uint8_t *)(base + L.off_vz), gs, gz);
    __syncthreads();
    kq_tensor(A, 1, A.v, (size_t)tg.row0, t0, t1, L.v_bits, (uint8_t *)(base + L.off_vq), false,
              rs, rz,
              gs, gz, A.v_lo != NULL, A.v_lo, A.v_hi, cidx + TD + creg, cexc + TD + creg, ccnt,
              nonfin, ws);
}

/* ---- 4. budget selection --------------------------------------------------------- */

static __device__ int kq_block_isum(int v, int *ws)
{
    int tot;
    (void)kcu_block_exscan(v, ws, &tot);
    return tot;
}

static __global__ void __launch_bounds__(KQ_THREADS) kcu_kq_select_kernel(kq_args A)
{
    __shared__ int ws[33];
    __shared__ int hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int s_want;
    const kvq_layout &L = A.L;
    int j = (int)blockIdx.x, tid = (int)threadIdx.x;
    int D = L.kv_dim, T = L.block_tokens;
    kcu_q_tgt tg = A.tgts[j];
    int n = tg.n < 0 ? 0 : (tg.n > T ? T : tg.n);
    char *base = kq_block(A, tg.id);
    char *scr = kq_scr(A, j);
    const int *ccnt = (const int *)(scr + A.S.off_ccnt);
    size_t TD = (size_t)T * (size_t)D, RD = (size_t)A.R * (size_t)D;
    int cap = L.out_cap;
    uint32_t clamped = (uint32_t)*(const int *)(scr + A.S.off_nonfin);
    uint32_t kept_t[2];
    for (int tensor = 0; tensor < 2; tensor++) {
        const uint32_t *cidx = (const uint32_t *)(scr + A.S.off_cidx) + tensor * TD;
        const float *cexc = (const float *)(scr + A.S.off_cexc) + tensor * TD;
        const int *cnt = ccnt + tensor * A.n_tiles;
        const float *src = tensor ? A.v : A.k;
        char *oidx = base + (tensor ? L.off_vout_idx : L.off_kout_idx);
        uint16_t *oval = (uint16_t *)(base + (tensor ? L.off_vout_val : L.off_kout_val));
        int part = 0;
        for (int t = tid; t < A.n_tiles; t += KQ_THREADS)
            part += cnt[t];
        int m = kq_block_isum(part, ws);
        int kept = 0;
        float thr = INFINITY;
        int n_eq_keep = 0;
        bool select = m > cap && cap > 0;
        if (select) {
            /* the (m - cap)-th smallest excursion (0-based), i.e. the
             * cap-th largest: positive floats order like their bits */
            if (tid == 0) {
                s_prefix = 0;
                s_want = m - cap;
            }
            uint32_t mask = 0;
            for (int pass = 0; pass < 4; pass++) {
                int shift = 24 - 8 * pass;
                hist[tid] = 0; /* KQ_THREADS == 256 */
                __syncthreads();
                uint32_t pf = s_prefix;
                for (int t = 0; t < A.n_tiles; t++) {
                    int ct = cnt[t];
                    for (int i = tid; i < ct; i += KQ_THREADS) {
                        uint32_t key = __float_as_uint(cexc[(size_t)t * RD + (size_t)i]);
                        if ((key & mask) == pf)
                            atomicAdd(&hist[(key >> shift) & 255u], 1);
                    }
                }
                __syncthreads();
                if (tid < 32) {
                    int lane = tid, s = 0;
                    for (int q = 0; q < 8; q++)
                        s += hist[8 * lane + q];
                    int inc = s;
                    for (int o = 1; o < 32; o <<= 1) {
                        int y = __shfl_up_sync(0xffffffffu, inc, o);
                        if (lane >= o)
                            inc += y;
                    }
                    int rank = s_want;
                    unsigned hit = __ballot_sync(0xffffffffu, inc > rank);
                    int owner = __ffs((int)hit) - 1;
                    if (lane == owner) {
                        int before = inc - s, bin = 8 * lane;
                        for (int q = 0; q < 8; q++) {
                            int h = hist[8 * lane + q];
                            if (before + h > rank) {
                                bin = 8 * lane + q;
                                break;
                            }
                            before += h;
                        }
                        s_want = rank - before;
                        s_prefix = pf | ((uint32_t)bin << shift);
                    }
                }
                mask |= 255u << shift;
                __syncthreads();
            }
            thr = __uint_as_float(s_prefix);
            int gt = 0;
            for (int t = 0; t < A.n_tiles; t++) {
                int ct = cnt[t];
                for (int i = tid; i < ct; i += KQ_THREADS)
                    gt += cexc[(size_t)t * RD + (size_t)i] > thr;
            }
            n_eq_keep = cap - kq_block_isum(gt, ws);
        }
        if (m <= cap || select) {
            /* in index order: everything, or those above the threshold and
             * the first n_eq_keep equal to it */
            int out = 0, eq_seen = 0;
            for (int t = 0; t < A.n_tiles; t++) {
                int ct = cnt[t];
                for (int i0 = 0; i0 < ct; i0 += KQ_THREADS) { /* block-uniform */
                    int i = i0 + tid;
                    bool have = i < ct;
                    float e = have ? cexc[(size_t)t * RD + (size_t)i] : 0.0f;
                    int is_eq = select && have && e == thr;
                    int tot_eq;
                    int eq_rank = eq_seen + kcu_block_exscan(is_eq, ws, &tot_eq);
                    int keep = have && (!select || e > thr || (is_eq && eq_rank < n_eq_keep));
                    int tot_keep;
                    int pos = out + kcu_block_exscan(keep, ws, &tot_keep);
                    if (keep) {
                        uint32_t el = cidx[(size_t)t * RD + (size_t)i];
                        float xv = src[((size_t)tg.row0 + el / (uint32_t)D) * A.stride +
                                       el % (uint32_t)D];
                        xv = kq_minf(kq_maxf(xv, -FP16_MAX_F), FP16_MAX_F);
                        if (L.idx_bytes == 2) /* kvq.h: 16-bit when T*D <= 65536 */
                            ((uint16_t *)oidx)[pos] = (uint16_t)el;
                        else
                            ((uint32_t *)oidx)[pos] = el;
                        oval[pos] = kcu_f2h(xv);
                    }
                    out += tot_keep;
                    eq_seen += tot_eq;
                }
            }
            kept = out;
        }
        kept_t[tensor] = (uint32_t)kept;
        clamped += (uint32_t)(m - kept);
        __syncthreads();
    }
    if (tid == 0) {
        kvq_block_hdr *h = (kvq_block_hdr *)base;
        h->n_tok = (uint32_t)n;
        h->n_kout = kept_t[0];
        h->n_vout = kept_t[1];
        h->n_clamped = clamped;
    }
}

/* ---- launcher ---------------------------------------------------------------------- */

/* Rows per tile: 4 when the shared memory allows (fewer for very wide
 * caches), at most T. */
static int kq_rows(const kvq_layout *L, size_t *smem)
{
    int D = L->kv_dim, ng = D / L->v_group;
    for (int R = 4; R >= 1; R /= 2) {
        size_t s = (size_t)2 * (size_t)D * 4 + (size_t)2 * (size_t)R * (size_t)ng * 4;
        if (s <= 48 * 1024 && R <= L->block_tokens) {
            *smem = s;
            return R;
        }
    }
    *smem = 0;
    return 0;
}

static kq_scratch kq_layout_scratch(const kvq_layout *L, int n_tiles)
{
    kq_scratch S;
    size_t TD = (size_t)L->block_tokens * (size_t)L->kv_dim;
    size_t off = 0;
    S.off_mm = off;
    off += kq_align8(2 * (size_t)L->kv_dim * 4);
    S.off_cidx = off;
    off += kq_align8(2 * TD * 4);
    S.off_cexc = off;
    off += kq_align8(2 * TD * 4);
    S.off_ccnt = off;
    off += kq_align8(2 * (size_t)n_tiles * 4);
    S.off_nonfin = off;
    off += 8;
    S.per_tgt = kq_align8(off);
    return S;
}

extern "C" size_t kcu_kvq_quant_scratch_bytes(const kvq_layout *L, int max_tgts)
{
    size_t smem;
    int R = kq_rows(L, &smem);
    if (R == 0)
        return 0;
    kq_scratch S = kq_layout_scratch(L, (L->block_tokens + R - 1) / R);
    return S.per_tgt * (size_t)(max_tgts > 0 ? max_tgts : 1);
}

extern "C" int kcu_kvq_quantize(kcu_ctx *c, const kvq_layout *L, const kcu_kv_arena *Ar,
                                int layer, const kcu_q_tgt *tgts, int n_tgts, int max_tgts,
                                const float *k, const float *v, size_t stride,
                                const float *k_lo, const float *k_hi, const float *v_lo,
                                const float *v_hi, void *scratch, size_t scratch_bytes,
                                char *err, size_t errlen)
{
    if (n_tgts <= 0)
        return 0;
    if ((k_lo == NULL) != (k_hi == NULL) || (v_lo == NULL) != (v_hi == NULL))
        return kcu_failf(err, errlen, "kcu_kvq_quantize: give both ends of a range or neither");
    if (stride < (size_t)L->kv_dim || L->bytes % 8 || Ar->q_layer % 8 || Ar->q_stride % 8)
        return kcu_failf(err, errlen, "kcu_kvq_quantize: bad stride or unaligned blocks");
    size_t smem;
    int R = kq_rows(L, &smem);
    if (R == 0)
        return kcu_failf(err, errlen, "kcu_kvq_quantize: kv_dim %d too wide for one block",
                         L->kv_dim);
    if (max_tgts < 1 || scratch_bytes < kcu_kvq_quant_scratch_bytes(L, max_tgts))
        return kcu_failf(err, errlen, "kcu_kvq_quantize: scratch too small");
    kq_args A;
    memset(&A, 0, sizeof A);
    A.L = *L;
    A.qarena = Ar->qarena;
    A.q_stride = Ar->q_stride;
    A.q_layer = Ar->q_layer;
    A.layer = layer;
    A.k = k;
    A.v = v;
    A.stride = stride;
    A.k_lo = k_lo;
    A.k_hi = k_hi;
    A.v_lo = v_lo;
    A.v_hi = v_hi;
    A.scr = (char *)scratch;
    A.R = R;
    A.n_tiles = (L->block_tokens + R - 1) / R;
    A.S = kq_layout_scratch(L, A.n_tiles);
    for (int j0 = 0; j0 < n_tgts; j0 += max_tgts) {
        int nb = n_tgts - j0 < max_tgts ? n_tgts - j0 : max_tgts;
        A.tgts = tgts + j0;
        KCU_LAUNCH(kcu_kq_zero_kernel, dim3((unsigned)nb, 8), dim3(256), 0, c->stream, A);
        KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_quantize (zero)");
        if (L->k_mode == KVQ_K_PER_CHANNEL && !k_lo) {
            KCU_LAUNCH(kcu_kq_minmax_kernel, dim3((unsigned)nb, kcu_cdiv((size_t)L->kv_dim, 128)),
                       dim3(128), 0, c->stream, A);
            KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_quantize (minmax)");
        }
        KCU_LAUNCH(kcu_kq_tile_kernel, dim3((unsigned)nb, (unsigned)A.n_tiles), dim3(KQ_THREADS),
                   smem, c->stream, A);
        KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_quantize (tiles)");
        KCU_LAUNCH(kcu_kq_select_kernel, dim3((unsigned)nb), dim3(KQ_THREADS), 0, c->stream, A);
        KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_quantize (select)");
    }
    return 0;
}

/* ---- accounting ------------------------------------------------------------------- */

static __global__ void kcu_kq_count_kernel(kcu_kv_arena A, int n_layers, const int32_t *ids,
                                           int n, unsigned long long *out)
{
    int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n * n_layers)
        return;
    int b = i / n_layers, l = i % n_layers;
    const kvq_block_hdr *h =
        (const kvq_block_hdr *)(A.qarena + (size_t)ids[b] * A.q_stride + (size_t)l * A.q_layer);
    atomicAdd(&out[0], (unsigned long long)h->n_tok);
    atomicAdd(&out[1], (unsigned long long)h->n_kout + (unsigned long long)h->n_vout);
    atomicAdd(&out[2], (unsigned long long)h->n_clamped);
}

extern "C" int kcu_kvq_count_blocks(kcu_ctx *c, const kcu_kv_arena *A, int n_layers,
                                    const int32_t *ids, int n_ids, int64_t *out, char *err,
                                    size_t errlen)
{
    if (n_ids <= 0 || n_layers <= 0)
        return 0;
    size_t n = (size_t)n_ids * (size_t)n_layers;
    KCU_LAUNCH(kcu_kq_count_kernel, dim3(kcu_cdiv(n, 256)), dim3(256), 0, c->stream, *A,
               n_layers, ids, n_ids, (unsigned long long *)out);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_count_blocks");
    return 0;
}
