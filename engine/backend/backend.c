/*
 * backend.c - the registry of device backends (see backend.h): which op
 * tables this build has. The one place where the build's configuration
 * decides anything about devices: the CUDA table exists only in builds
 * with nvcc (engine/meson.build defines LKQ_HAVE_CUDA).
 * Threading: read-only tables; any thread.
 */
#include "engine/backend/backend.h"

#include <stdio.h>
#include <string.h>

int bk_parse_device(const char *s, bk_device *out)
{
    if (!s)
        return -1;
    if (!strcmp(s, "cpu")) {
        *out = BK_DEVICE_CPU;
        return 0;
    }
    if (!strcmp(s, "cuda") || !strcmp(s, "gpu")) {
        *out = BK_DEVICE_CUDA;
        return 0;
    }
    return -1;
}

const char *bk_device_str(bk_device d)
{
    return d == BK_DEVICE_CUDA ? "cuda" : "cpu";
}

#ifdef LKQ_HAVE_CUDA
static const bk_ops *const cuda_table = &bk_cuda_ops;
#else
static const bk_ops *const cuda_table = NULL;
#endif

int bk_cuda_built(void)
{
    return cuda_table != NULL;
}

const bk_ops *bk_find(bk_device d, char *err, size_t errlen)
{
    if (d == BK_DEVICE_CPU)
        return &bk_cpu_ops;
    if (d == BK_DEVICE_CUDA && cuda_table)
        return cuda_table;
    if (err && errlen)
        snprintf(err, errlen, "device '%s' is not available: this build has no %s backend "
                 "(nvcc was not found at build time; see docs/gpu.md)", bk_device_str(d),
                 bk_device_str(d));
    return NULL;
}
