/*
 * kcu_kvstore.cu - FP16 page store / gather kernels and launchers (see
 * kcu_kvstore.cuh): one thread per element; grid.x is the target (store)
 * or the row (gather).
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_kvstore.cuh"

static __device__ __forceinline__ uint16_t *page_k(const kcu_kv_arena &A, int id, int layer)
{
    return (uint16_t *)(A.farena + (size_t)id * A.f_stride + (size_t)layer * A.f_layer);
}

static __global__ void kcu_store_pages_kernel(kcu_kv_arena A, int layer,
                                              const kcu_page_tgt *tgts, const float *k,
                                              const float *v)
{
    kcu_page_tgt t = tgts[blockIdx.x];
    size_t D = (size_t)A.kv_dim;
    uint16_t *pk = page_k(A, t.id, layer) + (size_t)t.slot0 * D;
    uint16_t *pv = page_k(A, t.id, layer) + ((size_t)A.page_tokens + (size_t)t.slot0) * D;
    const float *sk = k + (size_t)t.row0 * D, *sv = v + (size_t)t.row0 * D;
    size_t n = (size_t)t.n * D;
    for (size_t i = (size_t)blockIdx.y * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.y * blockDim.x) {
        pk[i] = kcu_f2h(sk[i]);
        pv[i] = kcu_f2h(sv[i]);
    }
}

static __global__ void kcu_gather_pages_kernel(kcu_kv_arena A, int layer,
                                               const kcu_page_row *rows, float *k, float *v)
{
    kcu_page_row r = rows[blockIdx.x];
    size_t D = (size_t)A.kv_dim;
    const uint16_t *pk = page_k(A, r.id, layer) + (size_t)r.slot * D;
    const uint16_t *pv = page_k(A, r.id, layer) + ((size_t)A.page_tokens + (size_t)r.slot) * D;
    float *ok = k + (size_t)blockIdx.x * D, *ov = v + (size_t)blockIdx.x * D;
    for (size_t i = threadIdx.x; i < D; i += blockDim.x) {
        ok[i] = kcu_h2f(pk[i]);
        ov[i] = kcu_h2f(pv[i]);
    }
}

extern "C" int kcu_kv_store_pages(kcu_ctx *c, const kcu_kv_arena *A, int layer,
                                  const kcu_page_tgt *tgts, int n_tgts, int max_n,
                                  const float *k, const float *v, char *err, size_t errlen)
{
    if (n_tgts <= 0 || max_n <= 0)
        return 0;
    unsigned gy = kcu_cdiv((size_t)max_n * (size_t)A->kv_dim, 256);
    if (gy > 64)
        gy = 64;
    KCU_LAUNCH(kcu_store_pages_kernel, dim3((unsigned)n_tgts, gy), dim3(256), 0, c->stream, *A,
               layer, tgts, k, v);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_kv_store_pages");
    return 0;
}

extern "C" int kcu_kv_gather_pages(kcu_ctx *c, const kcu_kv_arena *A, int layer,
                                   const kcu_page_row *rows, int n_rows, float *k_out,
                                   float *v_out, char *err, size_t errlen)
{
    if (n_rows <= 0)
        return 0;
    KCU_LAUNCH(kcu_gather_pages_kernel, dim3((unsigned)n_rows), dim3(256), 0, c->stream, *A,
               layer, rows, k_out, v_out);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_kv_gather_pages");
    return 0;
}
