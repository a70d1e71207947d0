/*
 * test_util.h - helpers shared by the tests: where the models and data are.
 * Tests read ../shared (via $LKQ_SHARED) and never copy it.
 */
#ifndef LKQ_TEST_UTIL_H
#define LKQ_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Path of a file under $LKQ_SHARED (default ../shared) in a static buffer
 * (one of 4 rotating buffers, so a few may be used at once). */
static inline const char *tu_shared(const char *rel)
{
    static char buf[4][1024];
    static int k;
    const char *root = getenv("LKQ_SHARED");
    char *b = buf[k++ & 3];
    snprintf(b, sizeof buf[0], "%s/%s", root ? root : "../shared", rel);
    return b;
}

/* The default model (SmolLM2-135M-Instruct Q4_1) or NULL when absent:
 * $LKQ_MODELS/, then ~/.cache/livekvq/. */
static inline const char *tu_smollm2(void)
{
    static char buf[1024];
    const char *name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    const char *dir = getenv("LKQ_MODELS");
    if (dir) {
        snprintf(buf, sizeof buf, "%s/%s", dir, name);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    const char *home = getenv("HOME");
    if (home) {
        snprintf(buf, sizeof buf, "%s/.cache/livekvq/%s", home, name);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

/* A file in the source tree ($LKQ_SRCDIR). */
static inline const char *tu_src(const char *rel)
{
    static char buf[1024];
    const char *root = getenv("LKQ_SRCDIR");
    snprintf(buf, sizeof buf, "%s/%s", root ? root : ".", rel);
    return buf;
}

/* A reproducible random prompt: BOS (1), then ids in [3, n_vocab). */
static inline void tu_prompt(int32_t *ids, int n, int32_t n_vocab, uint32_t seed)
{
    uint32_t x = seed;
    ids[0] = 1;
    for (int i = 1; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = 3 + (int32_t)((x >> 8) % (uint32_t)(n_vocab - 3));
    }
}

#endif
