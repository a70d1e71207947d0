/*
 * gpu_models.h - the real checkpoints for the end-to-end GPU tests
 * (test_gpu_forward, test_gpu_batch, test_gpu_sched): files under the
 * shared directory ($LKQ_SHARED, else $LKQ_SHARED_DEFAULT set by meson, else
 * ../shared), loaded with mdl_load; an absent file is reported and the case
 * skipped, a file that fails to load is a failure.
 * Threading: single-threaded (static buffers).
 */
#ifndef LKQ_GPU_MODELS_H
#define LKQ_GPU_MODELS_H

#include <unistd.h>

#include "engine/model/model.h"
#include "tests/gpu/gpu_test.h"

#define GT_260K "models/stories260K/stories260K.bin"
#define GT_15M "models/stories15M/stories15M.bin"

/* A file under the shared directory (one of two static buffers). */
static inline const char *gt_shared(const char *rel)
{
    static char buf[2][1024];
    static int k;
    const char *root = getenv("LKQ_SHARED");
    if (!root || !*root)
        root = getenv("LKQ_SHARED_DEFAULT");
    char *b = buf[k++ & 1];
    snprintf(b, sizeof buf[0], "%s/%s", root && *root ? root : "../shared", rel);
    return b;
}

/* The model at rel, or NULL when the file is absent (said on stdout) or
 * does not load (a failed check). Caller frees with mdl_free. */
static inline mdl_model *gt_load_model(const char *rel)
{
    const char *path = gt_shared(rel);
    if (access(path, R_OK) != 0) {
        printf("     (%s absent: skipped)\n", rel);
        return NULL;
    }
    char err[512];
    mdl_model *m = NULL;
    if (mdl_load(path, NULL, &m, err, sizeof err) < 0) {
        GT_CHECK(0, "%s: %s", rel, err);
        return NULL;
    }
    return m;
}

#endif
