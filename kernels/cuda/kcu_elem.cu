/*
 * kcu_elem.cu - element-wise kernels and launchers (see kcu_elem.cuh): one
 * thread per element, grid-stride loops.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_elem.cuh"

static __global__ void kcu_add_kernel(float *y, const float *x, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

static __global__ void kcu_to_f16_kernel(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = kcu_f2h(src[i]);
}

static __global__ void kcu_to_bf16_kernel(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
}

static __global__ void kcu_embed_kernel(int t, const void *table, const int32_t *tokens,
                                        int dim, float *out)
{
    size_t row = (size_t)tokens[blockIdx.x];
    float *o = out + (size_t)blockIdx.x * (size_t)dim;
    for (int i = (int)threadIdx.x; i < dim; i += (int)blockDim.x) {
        size_t k = row * (size_t)dim + (size_t)i;
        float v;
        if (t == KT_F32)
            v = ((const float *)table)[k];
        else if (t == KT_F16)
            v = kcu_h2f(((const uint16_t *)table)[k]);
        else
            v = kcu_bf2f(((const uint16_t *)table)[k]);
        o[i] = v;
    }
}

/* splitmix64 of (seed + i): a counter-based generator */
static __device__ __forceinline__ uint64_t fill_hash(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static __global__ void kcu_fill_kernel(int t, void *dst, size_t n, uint64_t seed, float lo,
                                       float hi)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t r = fill_hash(seed * 0x100000001b3ull + i);
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);
        float v = lo + (hi - lo) * u;
        if (t == KT_F32)
            ((float *)dst)[i] = v;
        else if (t == KT_F16)
            ((uint16_t *)dst)[i] = kcu_f2h(v);
        else
            ((uint16_t *)dst)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
}

static unsigned grid_for(size_t n)
{
    size_t g = (n + 255) / 256;
    return (unsigned)(g > 65536 ? 65536 : g);
}

extern "C" int kcu_add(kcu_ctx *c, float *y, const float *x, size_t n, char *err, size_t errlen)
{
    if (n == 0)
        return 0;
    KCU_LAUNCH(kcu_add_kernel, dim3(grid_for(n)), dim3(256), 0, c->stream, y, x, n);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_add");
    return 0;
}

extern "C" int kcu_convert(kcu_ctx *c, kt_type t, void *dst, const float *src, size_t n,
                           char *err, size_t errlen)
{
    if (n == 0)
        return 0;
    switch (t) {
    case KT_F32:
        KCU_TRY(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice,
                                c->stream),
                err, errlen);
        return 0;
    case KT_F16:
        KCU_LAUNCH(kcu_to_f16_kernel, dim3(grid_for(n)), dim3(256), 0, c->stream,
                   (uint16_t *)dst, src, n);
        break;
    case KT_BF16:
        KCU_LAUNCH(kcu_to_bf16_kernel, dim3(grid_for(n)), dim3(256), 0, c->stream,
                   (uint16_t *)dst, src, n);
        break;
    default:
        return kcu_failf(err, errlen, "kcu_convert: unsupported type %s", kt_name(t));
    }
    KCU_CHECK_LAUNCH(err, errlen, "kcu_convert");
    return 0;
}

extern "C" int kcu_embed(kcu_ctx *c, kt_type t, const void *table, const int32_t *tokens,
                         int n_tok, int dim, float *out, char *err, size_t errlen)
{
    if (t != KT_F32 && t != KT_F16 && t != KT_BF16)
        return kcu_failf(err, errlen, "kcu_embed: unsupported table type %s", kt_name(t));
    if (n_tok <= 0)
        return 0;
    KCU_LAUNCH(kcu_embed_kernel, dim3((unsigned)n_tok), dim3(256), 0, c->stream, (int)t,
               table, tokens, dim, out);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_embed");
    return 0;
}

extern "C" int kcu_fill_uniform(kcu_ctx *c, kt_type t, void *dst, size_t n, uint64_t seed,
                                float lo, float hi, char *err, size_t errlen)
{
    if (t != KT_F32 && t != KT_F16 && t != KT_BF16)
        return kcu_failf(err, errlen, "kcu_fill_uniform: unsupported type %s", kt_name(t));
    if (n == 0)
        return 0;
    KCU_LAUNCH(kcu_fill_kernel, dim3(grid_for(n)), dim3(256), 0, c->stream, (int)t, dst, n,
               seed, lo, hi);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_fill_uniform");
    return 0;
}
