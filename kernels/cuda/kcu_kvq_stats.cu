/*
 * kcu_kvq_stats.cu - chunk quantiles and the clipped EMA on the GPU (see
 * kcu_kvq_stats.cuh).
 *
 * 1. A tiled transpose turns each tensor's [n][stride] chunk into [D][n]
 *    columns (scratch), so a channel is read contiguously.
 * 2. One block of 128 threads per (channel, tensor) counts the finite
 *    values m, derives the ranks exactly as kvq_ref.c's rank_of (double,
 *    snapping within 1e-6), and finds the four order statistics it needs
 *    (ranks ka, ka+1, kb, kb+1) at once with a 4-pass, 8-bit radix select
 *    over order-preserving keys of the float bits: one 256-bin histogram per
 *    target, each warp resolving one target's bucket per pass. Non-finite
 *    values get the largest key, so ranks below m never reach them. The
 *    column is cached in shared memory when it fits (n <= 4096).
 * 3. Thread 0 interpolates (double, as lerp_d) and applies kvq_ema_update's
 *    per-channel step with explicitly rounded f32 operations.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_kvq_stats.cuh"

#define Q_THREADS 128
#define Q_CACHE 4096

static __device__ __forceinline__ uint32_t f2key(float f)
{
    if (!isfinite(f))
        return 0xffffffffu;
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static __device__ __forceinline__ float key2f(uint32_t k)
{
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

/* kvq_ref.c rank_of: h = q (m - 1), snapped to an integer within 1e-6. */
static __device__ void q_rank_of(double q, int m, int *k, double *frac)
{
    double h = __dmul_rn(q, (double)(m - 1));
    double r = floor(__dadd_rn(h, 0.5));
    if (fabs(__dsub_rn(h, r)) < 1e-6)
        h = r;
    if (h < 0)
        h = 0;
    if (h > m - 1)
        h = m - 1;
    *k = (int)floor(h);
    *frac = __dsub_rn(h, (double)*k);
    if (*k >= m - 1) {
        *k = m - 1;
        *frac = 0;
    }
}

static __device__ float q_lerp(float x0, float x1, double frac)
{
    if (frac == 0)
        return x0;
    return __double2float_rn(
        __dadd_rn((double)x0, __dmul_rn(frac, __dsub_rn((double)x1, (double)x0))));
}

static __device__ __forceinline__ float q_minf(float a, float b) { return b < a ? b : a; }
static __device__ __forceinline__ float q_maxf(float a, float b) { return b > a ? b : a; }

/* kvq_ema_update for channel c (see kernels/kvq.h for the contract). */
static __device__ void q_ema_channel(kcu_ema_dev e, kvq_ema_params p, int c, float ac, float bc,
                                     float weight)
{
    int k = e.n_chunks;
    int warming = k < p.warmup_chunks;
    float step = __fmul_rn(__fsub_rn(1.0f, p.ema_decay), weight);
    float gamma = p.ema_clip;
    int have = isfinite(ac) && isfinite(bc);
    int seen = k > 0 && !isnan(e.lo[c]);
    if (warming) {
        if (!have) {
            if (seen) {
                e.sum_a[c] = __fadd_rn(e.sum_a[c], e.lo[c]);
                e.sum_b[c] = __fadd_rn(e.sum_b[c], e.hi[c]);
            } else {
                e.lo[c] = e.hi[c] = __int_as_float(0x7fc00000);
            }
            return;
        }
        if (!seen) {
            e.sum_a[c] = __fmul_rn(ac, (float)(k + 1));
            e.sum_b[c] = __fmul_rn(bc, (float)(k + 1));
            e.lo[c] = ac;
            e.hi[c] = bc;
            return;
        }
        e.sum_a[c] = __fadd_rn(e.sum_a[c], ac);
        e.sum_b[c] = __fadd_rn(e.sum_b[c], bc);
        e.lo[c] = __fdiv_rn(e.sum_a[c], (float)(k + 1));
        e.hi[c] = __fdiv_rn(e.sum_b[c], (float)(k + 1));
        return;
    }
    if (!have) {
        if (!seen)
            e.lo[c] = e.hi[c] = __int_as_float(0x7fc00000);
        return;
    }
    if (!seen) {
        e.lo[c] = ac;
        e.hi[c] = bc;
        return;
    }
    float lo = e.lo[c], hi = e.hi[c];
    float w = q_maxf(__fsub_rn(hi, lo), KVQ_EPS);
    float band_lo = __fsub_rn(lo, __fmul_rn(gamma, w));
    float band_hi = __fadd_rn(hi, __fmul_rn(gamma, w));
    float ca = q_minf(q_maxf(ac, band_lo), band_hi);
    float cb = q_minf(q_maxf(bc, band_lo), band_hi);
    e.lo[c] = __fadd_rn(lo, __fmul_rn(step, __fsub_rn(ca, lo)));
    e.hi[c] = __fadd_rn(hi, __fmul_rn(step, __fsub_rn(cb, hi)));
}

/* xt[t][c][0..n) = x[t][r * stride + c] */
static __global__ void kcu_q_transpose_kernel(const float *x0, const float *x1, int n, int D,
                                              size_t stride, float *xt)
{
    __shared__ float tile[32][33];
    const float *x = blockIdx.z ? x1 : x0;
    if (!x)
        return; /* uniform over the block */
    float *o = xt + (size_t)blockIdx.z * (size_t)D * (size_t)n;
    int c0 = (int)blockIdx.x * 32, r0 = (int)blockIdx.y * 32;
    int tx = (int)threadIdx.x, ty = (int)threadIdx.y; /* 32 x 8 */
    for (int j = ty; j < 32; j += 8) {
        int r = r0 + j, c = c0 + tx;
        if (r < n && c < D)
            tile[j][tx] = x[(size_t)r * stride + (size_t)c];
    }
    __syncthreads();
    for (int j = ty; j < 32; j += 8) {
        int c = c0 + j, r = r0 + tx;
        if (r < n && c < D)
            o[(size_t)c * (size_t)n + (size_t)r] = tile[tx][j];
    }
}

struct q_args {
    const float *xt;
    int has[2];
    int n, D;
    double alpha;
    float *a[2], *b[2];
    kcu_ema_dev e[2];
    int do_ema;
    kvq_ema_params p;
    float weight;
};

static __global__ void __launch_bounds__(Q_THREADS) kcu_q_select_kernel(q_args A)
{
    __shared__ uint32_t cache[Q_CACHE];
    __shared__ int hist[4][256];
    __shared__ uint32_t prefix[4];
    __shared__ int want[4];
    __shared__ int red[Q_THREADS / 32];
    const int c = (int)blockIdx.x, t = (int)blockIdx.y;
    if (!A.has[t])
        return; /* uniform over the block */
    const int n = A.n, tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float *col = A.xt + ((size_t)t * (size_t)A.D + (size_t)c) * (size_t)n;
    const bool cached = n <= Q_CACHE;

    /* keys (cached) and the finite count m */
    int fin = 0;
    for (int i = tid; i < n; i += Q_THREADS) {
        uint32_t k = f2key(col[i]);
        if (cached)
            cache[i] = k;
        fin += k != 0xffffffffu;
    }
    fin = kcu_warp_isum(fin);
    if (lane == 0)
        red[warp] = fin;
    __syncthreads();
    int m = 0;
    for (int w = 0; w < Q_THREADS / 32; w++)
        m += red[w];

    float av, bv;
    if (m == 0) {
        av = bv = __int_as_float(0x7fc00000);
    } else {
        int ka, kb;
        double fa, fb;
        q_rank_of(A.alpha, m, &ka, &fa);
        q_rank_of(__dsub_rn(1.0, A.alpha), m, &kb, &fb);
        if (tid < 4) {
            int r = tid == 0 ? ka : tid == 1 ? ka + 1 : tid == 2 ? kb : kb + 1;
            want[tid] = r < m - 1 ? r : m - 1;
            prefix[tid] = 0;
        }
        uint32_t mask = 0;
        for (int pass = 0; pass < 4; pass++) {
            int shift = 24 - 8 * pass;
            for (int i = tid; i < 4 * 256; i += Q_THREADS)
                (&hist[0][0])[i] = 0;
            __syncthreads();
            uint32_t p0 = prefix[0], p1 = prefix[1], p2 = prefix[2], p3 = prefix[3];
            for (int i = tid; i < n; i += Q_THREADS) {
                uint32_t k = cached ? cache[i] : f2key(col[i]);
                int bin = (int)((k >> shift) & 255u);
                uint32_t km = k & mask;
                if (km == p0) atomicAdd(&hist[0][bin], 1);
                if (km == p1) atomicAdd(&hist[1][bin], 1);
                if (km == p2) atomicAdd(&hist[2][bin], 1);
                if (km == p3) atomicAdd(&hist[3][bin], 1);
            }
            __syncthreads();
            /* warp j resolves target j: lane l owns bins 8l .. 8l+7 */
            if (warp < 4) {
                int s = 0;
                for (int q = 0; q < 8; q++)
                    s += hist[warp][8 * lane + q];
                int inc = s;
                for (int o = 1; o < 32; o <<= 1) {
                    int y = __shfl_up_sync(0xffffffffu, inc, o);
                    if (lane >= o)
                        inc += y;
                }
                int rank = want[warp];
                unsigned hit = __ballot_sync(0xffffffffu, inc > rank);
                int owner = __ffs((int)hit) - 1;
                if (lane == owner) {
                    int before = inc - s;
                    int bin = 8 * lane;
                    for (int q = 0; q < 8; q++) {
                        int h = hist[warp][8 * lane + q];
                        if (before + h > rank) {
                            bin = 8 * lane + q;
                            break;
                        }
                        before += h;
                    }
                    want[warp] = rank - before;
                    prefix[warp] |= (uint32_t)bin << shift;
                }
            }
            mask |= 255u << shift;
            __syncthreads();
        }
        float x_ka = key2f(prefix[0]), x_ka1 = key2f(prefix[1]);
        float x_kb = key2f(prefix[2]), x_kb1 = key2f(prefix[3]);
        av = q_lerp(x_ka, x_ka1, fa);
        bv = q_lerp(x_kb, x_kb1, fb);
    }
    if (tid == 0) {
        if (A.a[t])
            A.a[t][c] = av;
        if (A.b[t])
            A.b[t][c] = bv;
        if (A.do_ema)
            q_ema_channel(A.e[t], A.p, c, av, bv, A.weight);
    }
}

extern "C" size_t kcu_kvq_fold_scratch_bytes(int n, int D)
{
    return 2 * (size_t)(n > 0 ? n : 1) * (size_t)(D > 0 ? D : 1) * sizeof(float);
}

extern "C" int kcu_kvq_fold(kcu_ctx *c, const float *const x[2], int n, int D, size_t stride,
                            float alpha, float *const a_out[2], float *const b_out[2],
                            const kcu_ema_dev *e, const kvq_ema_params *p, float weight,
                            void *scratch, size_t scratch_bytes, char *err, size_t errlen)
{
    if (n < 1 || D < 1 || stride < (size_t)D)
        return kcu_failf(err, errlen, "kcu_kvq_fold: bad shape n %d D %d stride %zu", n, D,
                         stride);
    if (scratch_bytes < kcu_kvq_fold_scratch_bytes(n, D))
        return kcu_failf(err, errlen, "kcu_kvq_fold: scratch too small");
    if (e && !p)
        return kcu_failf(err, errlen, "kcu_kvq_fold: EMA update without parameters");
    float *xt = (float *)scratch;
    KCU_LAUNCH(kcu_q_transpose_kernel, dim3(kcu_cdiv((size_t)D, 32), kcu_cdiv((size_t)n, 32), 2),
               dim3(32, 8), 0, c->stream, x[0], x[1], n, D, stride, xt);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_fold (transpose)");
    /* kvq_chunk_quantiles clamps alpha to [0, 0.5] (NaN -> 0) in double */
    double al = alpha;
    if (!(al >= 0))
        al = 0;
    if (al > 0.5)
        al = 0.5;
    q_args A;
    memset(&A, 0, sizeof A);
    A.xt = xt;
    A.n = n;
    A.D = D;
    A.alpha = al;
    for (int t = 0; t < 2; t++) {
        A.has[t] = x[t] != NULL;
        A.a[t] = a_out ? a_out[t] : NULL;
        A.b[t] = b_out ? b_out[t] : NULL;
        if (e)
            A.e[t] = e[t];
    }
    if (e) {
        A.do_ema = 1;
        A.p = *p;
    }
    A.weight = weight;
    KCU_LAUNCH(kcu_q_select_kernel, dim3((unsigned)D, 2, 1), dim3(Q_THREADS), 0, c->stream, A);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_kvq_fold (select)");
    return 0;
}
