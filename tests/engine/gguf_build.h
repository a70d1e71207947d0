/*
 * gguf_build.h - a tiny in-memory GGUF writer for the engine tests (header
 * only, test code). It writes whatever it is told, including deliberately
 * broken fields (raw tensor infos with any n_dims / dims / type / offset,
 * keys with any bytes), so tests can build valid and hostile files alike.
 *
 * Usage: gb g; gb_init(&g); gb_kv_str(&g, "general.architecture", "llama");
 * gb_tensor(&g, "w", 2, (int64_t[]){32, 4}, KT_F32, data); size_t n;
 * uint8_t *file = gb_finish(&g, &n); ... free(file); gb_free(&g);
 * Single-threaded; aborts on out of memory (test code only).
 */
#ifndef LKQ_TEST_GGUF_BUILD_H
#define LKQ_TEST_GGUF_BUILD_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/model/gguf.h"
#include "kernels/ktypes.h"

typedef struct {
    uint8_t *p;
    size_t n, cap;
} gb_buf;

typedef struct {
    gb_buf kv, ti, data;
    uint64_t n_kv, n_t;
    uint32_t version;
    size_t align;
} gb;

static inline void gb_put(gb_buf *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p)
            abort();
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}
static inline void gb_u8(gb_buf *b, uint8_t v) { gb_put(b, &v, 1); }
static inline void gb_u32(gb_buf *b, uint32_t v) { gb_put(b, &v, 4); }
static inline void gb_u64(gb_buf *b, uint64_t v) { gb_put(b, &v, 8); }
static inline void gb_strn(gb_buf *b, const char *s, size_t n) { gb_u64(b, n); gb_put(b, s, n); }
static inline void gb_str(gb_buf *b, const char *s) { gb_strn(b, s, strlen(s)); }

static inline void gb_init(gb *g)
{
    memset(g, 0, sizeof(*g));
    g->version = 3;
    g->align = 32;
}

static inline void gb_free(gb *g)
{
    free(g->kv.p);
    free(g->ti.p);
    free(g->data.p);
    memset(g, 0, sizeof(*g));
}

/* Starts a key/value: key bytes (any), then the value type. */
static inline void gb_key_raw(gb *g, const char *key, size_t keylen, uint32_t vtype)
{
    gb_strn(&g->kv, key, keylen);
    gb_u32(&g->kv, vtype);
    g->n_kv++;
}
static inline void gb_key(gb *g, const char *key, uint32_t vtype) { gb_key_raw(g, key, strlen(key), vtype); }

static inline void gb_kv_u32(gb *g, const char *k, uint32_t v) { gb_key(g, k, GGUF_UINT32); gb_u32(&g->kv, v); }
static inline void gb_kv_i32(gb *g, const char *k, int32_t v) { gb_key(g, k, GGUF_INT32); gb_put(&g->kv, &v, 4); }
static inline void gb_kv_u64(gb *g, const char *k, uint64_t v) { gb_key(g, k, GGUF_UINT64); gb_u64(&g->kv, v); }
static inline void gb_kv_f32(gb *g, const char *k, float v) { gb_key(g, k, GGUF_FLOAT32); gb_put(&g->kv, &v, 4); }
static inline void gb_kv_bool(gb *g, const char *k, int v) { gb_key(g, k, GGUF_BOOL); gb_u8(&g->kv, (uint8_t)v); }
static inline void gb_kv_str(gb *g, const char *k, const char *v) { gb_key(g, k, GGUF_STRING); gb_str(&g->kv, v); }

/* Array header: element type and count; the caller appends the elements. */
static inline void gb_kv_arr(gb *g, const char *k, uint32_t etype, uint64_t n)
{
    gb_key(g, k, GGUF_ARRAY);
    gb_u32(&g->kv, etype);
    gb_u64(&g->kv, n);
}
static inline void gb_kv_arr_str(gb *g, const char *k, const char *const *v, size_t n)
{
    gb_kv_arr(g, k, GGUF_STRING, n);
    for (size_t i = 0; i < n; i++)
        gb_str(&g->kv, v[i]);
}
static inline void gb_kv_arr_f32(gb *g, const char *k, const float *v, size_t n)
{
    gb_kv_arr(g, k, GGUF_FLOAT32, n);
    gb_put(&g->kv, v, 4 * n);
}
static inline void gb_kv_arr_i32(gb *g, const char *k, const int32_t *v, size_t n)
{
    gb_kv_arr(g, k, GGUF_INT32, n);
    gb_put(&g->kv, v, 4 * n);
}

/* A raw tensor info record: any values, no data appended. */
static inline void gb_tensor_info(gb *g, const char *name, uint32_t n_dims, const uint64_t *ne,
                                  uint32_t type, uint64_t offset)
{
    gb_str(&g->ti, name);
    gb_u32(&g->ti, n_dims);
    for (uint32_t i = 0; i < n_dims; i++)
        gb_u64(&g->ti, ne[i]);
    gb_u32(&g->ti, type);
    gb_u64(&g->ti, offset);
    g->n_t++;
}

/* Byte size of a (valid) tensor. */
static inline size_t gb_nbytes(uint32_t n_dims, const int64_t *ne, kt_type type)
{
    int64_t rows = 1;
    for (uint32_t i = 1; i < n_dims; i++)
        rows *= ne[i];
    return kt_row_bytes(type, ne[0]) * (size_t)rows;
}

/* A well-formed tensor: info plus its data (NULL data = zeros), placed at
 * the next aligned offset of the data section. Returns the offset. */
static inline uint64_t gb_tensor(gb *g, const char *name, uint32_t n_dims, const int64_t *ne,
                                 kt_type type, const void *data)
{
    static const uint8_t zeros[64];
    while (g->data.n % g->align)
        gb_u8(&g->data, 0);
    uint64_t off = g->data.n;
    uint64_t une[4];
    for (uint32_t i = 0; i < n_dims; i++)
        une[i] = (uint64_t)ne[i];
    gb_tensor_info(g, name, n_dims, une, type, off);
    size_t nb = gb_nbytes(n_dims, ne, type);
    if (data) {
        gb_put(&g->data, data, nb);
    } else {
        for (size_t i = 0; i < nb; i += sizeof(zeros))
            gb_put(&g->data, zeros, nb - i < sizeof(zeros) ? nb - i : sizeof(zeros));
    }
    return off;
}

/* Returns the whole file (malloc'd, caller frees) and its size; *hdr_end
 * (optional) gets the offset where the data section starts. */
static inline uint8_t *gb_finish2(const gb *g, size_t *size, size_t *hdr_end)
{
    gb_buf out = {0};
    gb_put(&out, "GGUF", 4);
    gb_u32(&out, g->version);
    gb_u64(&out, g->n_t);
    gb_u64(&out, g->n_kv);
    gb_put(&out, g->kv.p, g->kv.n);
    gb_put(&out, g->ti.p, g->ti.n);
    if (g->n_t)
        while (out.n % g->align)
            gb_u8(&out, 0);
    if (hdr_end)
        *hdr_end = out.n;
    gb_put(&out, g->data.p, g->data.n);
    *size = out.n;
    if (!out.p)
        out.p = malloc(1);
    return out.p;
}
static inline uint8_t *gb_finish(const gb *g, size_t *size) { return gb_finish2(g, size, NULL); }

/* Writes buf to a new temporary file; path must hold 64 bytes. */
static inline int gb_write_tmp(const uint8_t *buf, size_t n, char *path)
{
    snprintf(path, 64, "/tmp/lkq_test_XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, buf + off, n - off);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)w;
    }
    close(fd);
    return 0;
}

#endif
