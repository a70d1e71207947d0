/*
 * test_llama2c.c - the llama2.c .bin reader on the real stories260K and
 * stories15M checkpoints, truncated / extended copies in a temp dir, an
 * unshared-classifier file built in memory, and absurd headers.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/model/llama2c.h"

static const char *shared_path(const char *rel, char *buf, size_t cap)
{
    const char *sh = getenv("LKQ_SHARED");
    snprintf(buf, cap, "%s/%s", sh ? sh : "../shared", rel);
    return buf;
}

static uint8_t *read_all(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot read %s", path);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n);
    cr_assert_eq(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

static void write_file(const char *path, const void *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(b, 1, n, f), n);
    fclose(f);
}

static void check_finite(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cr_assert(isfinite(p[i]), "non-finite weight at %zu", i);
}

Test(llama2c, stories260K)
{
    char path[4096], err[256];
    l2c_file *f;
    cr_assert_eq(l2c_open(shared_path("models/stories260K/stories260K.bin", path, sizeof(path)),
                          &f, err, sizeof(err)), 0, "%s", err);
    const l2c_config *c = &f->cfg;
    cr_assert_eq(c->dim, 64);
    cr_assert_eq(c->hidden_dim, 172);
    cr_assert_eq(c->n_layers, 5);
    cr_assert_eq(c->n_heads, 8);
    cr_assert_eq(c->n_kv_heads, 4);
    cr_assert_eq(c->vocab_size, 512);
    cr_assert_eq(c->seq_len, 512);
    cr_assert(c->shared_classifier);
    cr_assert_eq(f->wcls, f->token_embedding);
    cr_assert_eq(f->size, 1056540);
    /* layout: rms_final ends right before the freq_cis arrays or the end */
    size_t end = (size_t)((const char *)(f->rms_final + 64) - (const char *)f->base);
    size_t fc = c->has_freq_cis ? (size_t)512 * 8 * 4 : 0;
    cr_assert_eq(end + fc, f->size);
    check_finite(f->token_embedding, 512 * 64);
    check_finite(f->rms_final, 64);
    check_finite(f->w2, 5 * 64 * 172);
    l2c_close(f);
}

Test(llama2c, stories15M)
{
    char path[4096], err[256];
    l2c_file *f;
    cr_assert_eq(l2c_open(shared_path("models/stories15M/stories15M.bin", path, sizeof(path)),
                          &f, err, sizeof(err)), 0, "%s", err);
    const l2c_config *c = &f->cfg;
    cr_assert_eq(c->dim, 288);
    cr_assert_eq(c->hidden_dim, 768);
    cr_assert_eq(c->n_layers, 6);
    cr_assert_eq(c->n_heads, 6);
    cr_assert_eq(c->n_kv_heads, 6);
    cr_assert_eq(c->vocab_size, 32000);
    cr_assert_eq(c->seq_len, 256);
    cr_assert(c->shared_classifier);
    cr_assert_eq(f->size, 60816028);
    check_finite(f->rms_att, 6 * 288);
    check_finite(f->rms_final, 288);
    l2c_close(f);
}

Test(llama2c, truncated_and_extended_copies_fail)
{
    char path[4096], err[512], dir[] = "/tmp/lkq_l2c_XXXXXX", tmp[4200];
    size_t n;
    uint8_t *b = read_all(shared_path("models/stories260K/stories260K.bin", path, sizeof(path)), &n);
    cr_assert_not_null(mkdtemp(dir));
    snprintf(tmp, sizeof(tmp), "%s/cut.bin", dir);
    size_t cuts[] = {1, 27, 28, 29, 1000, n / 2, n - 4, n - 1, n + 1, n + 4};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        uint8_t *c = calloc(1, cuts[i]);
        memcpy(c, b, cuts[i] < n ? cuts[i] : n);
        write_file(tmp, c, cuts[i]);
        free(c);
        l2c_file *f = NULL;
        cr_assert_eq(l2c_open(tmp, &f, err, sizeof(err)), -1, "size %zu opened", cuts[i]);
        cr_assert_null(f);
        cr_assert(strstr(err, tmp), "%s", err);
        if (cuts[i] >= 28)
            cr_assert(strstr(err, "expected 1040156") && strstr(err, "1056540"), "%s", err);
        else
            cr_assert(strstr(err, "too small"), "%s", err);
        cr_assert(!strchr(err, '\n'));
    }
    /* the exact copy still opens */
    write_file(tmp, b, n);
    l2c_file *f;
    cr_assert_eq(l2c_open(tmp, &f, err, sizeof(err)), 0, "%s", err);
    l2c_close(f);
    unlink(tmp);
    rmdir(dir);
    free(b);
}

/* A tiny checkpoint (dim 8, hidden 16, 2 layers, 2/1 heads, vocab 10,
 * seq 4) with an unshared classifier, with or without freq_cis. */
static float *tiny(int freq_cis, size_t *bytes, size_t *wcls_off)
{
    int32_t hdr[7] = {8, 16, 2, 2, 1, -10, 4};
    size_t dim = 8, hid = 16, L = 2, kv = 4, V = 10;
    size_t floats = V * dim + L * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hid * dim) + dim;
    size_t fc = freq_cis ? 4 * 4 : 0;
    *wcls_off = 7 + floats + fc;
    size_t total = *wcls_off + V * dim;
    float *p = calloc(total, sizeof(float));
    memcpy(p, hdr, sizeof(hdr));
    for (size_t i = 0; i < V * dim; i++)
        p[*wcls_off + i] = 42.0f;
    *bytes = total * sizeof(float);
    return p;
}

Test(llama2c, unshared_classifier)
{
    for (int fc = 0; fc < 2; fc++) {
        size_t n, off;
        float *p = tiny(fc, &n, &off);
        l2c_file *f;
        char err[256];
        cr_assert_eq(l2c_open_mem(p, n, &f, err, sizeof(err)), 0, "%s", err);
        cr_assert_eq(f->cfg.vocab_size, 10);
        cr_assert(!f->cfg.shared_classifier);
        cr_assert_eq(f->cfg.has_freq_cis, fc);
        cr_assert_eq(f->wcls, p + off);
        cr_assert_eq(f->wcls[79], 42.0f);
        l2c_close(f);
        cr_assert_eq(l2c_open_mem(p, n - 4, &f, err, sizeof(err)), -1);
        cr_assert(strstr(err, "unshared classifier"), "%s", err);
        free(p);
    }
}

Test(llama2c, absurd_headers)
{
    static const struct { int32_t h[7]; const char *want; } cases[] = {
        {{0, 172, 5, 8, 4, 512, 512}, "dim = 0"},
        {{-64, 172, 5, 8, 4, 512, 512}, "dim = -64"},
        {{1 << 30, 172, 5, 8, 4, 512, 512}, "dim = 1073741824 is out of range"},
        {{64, 0x7fffffff, 5, 8, 4, 512, 512}, "hidden_dim"},
        {{64, 172, 100000, 8, 4, 512, 512}, "n_layers"},
        {{64, 172, 5, 0, 4, 512, 512}, "n_heads = 0"},
        {{64, 172, 5, 8, -4, 512, 512}, "n_kv_heads"},
        {{64, 172, 5, 8, 4, INT32_MIN, 512}, "|vocab_size|"},
        {{64, 172, 5, 8, 4, 0, 512}, "|vocab_size|"},
        {{64, 172, 5, 8, 4, 512, 0}, "seq_len"},
        {{64, 172, 5, 7, 7, 512, 512}, "not a multiple of n_heads"},
        {{64, 172, 5, 8, 3, 512, 512}, "not a multiple of n_kv_heads"},
        {{64, 172, 5, 64, 64, 512, 512}, "head_dim 1 is odd"},
        {{64, 172, 5, 8, 4, 512, 512}, "expected"}, /* sane but wrong size */
    };
    char dir[] = "/tmp/lkq_l2c_XXXXXX", tmp[64], err[512];
    cr_assert_not_null(mkdtemp(dir));
    snprintf(tmp, sizeof(tmp), "%s/h.bin", dir);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        l2c_config cfg;
        cr_assert_eq(l2c_check(cases[i].h, 4096, &cfg, err, sizeof(err)), -1);
        cr_assert(strstr(err, cases[i].want), "case %zu: '%s' lacks '%s'", i, err, cases[i].want);
        uint8_t buf[4096] = {0};
        memcpy(buf, cases[i].h, 28);
        write_file(tmp, buf, sizeof(buf));
        l2c_file *f = NULL;
        cr_assert_eq(l2c_open(tmp, &f, err, sizeof(err)), -1);
        cr_assert(strstr(err, cases[i].want), "case %zu: '%s'", i, err);
    }
    /* the biggest allowed dims do not overflow the size arithmetic */
    int32_t big[7] = {L2C_MAX_DIM, L2C_MAX_HIDDEN, L2C_MAX_LAYERS, 1024, 1024, -L2C_MAX_VOCAB, L2C_MAX_SEQ};
    l2c_config cfg;
    cr_assert_eq(l2c_check(big, 1000, &cfg, err, sizeof(err)), -1);
    cr_assert(strstr(err, "expected"), "%s", err);
    /* open errors */
    l2c_file *f;
    cr_assert_eq(l2c_open("/nonexistent.bin", &f, err, sizeof(err)), -1);
    cr_assert(strstr(err, "cannot open '/nonexistent.bin': No such file or directory"), "%s", err);
    cr_assert_eq(l2c_open(dir, &f, err, sizeof(err)), -1);
    cr_assert(strstr(err, "is a directory"), "%s", err);
    write_file(tmp, "", 0);
    cr_assert_eq(l2c_open(tmp, &f, err, sizeof(err)), -1);
    cr_assert(strstr(err, "is empty"), "%s", err);
    unlink(tmp);
    rmdir(dir);
    l2c_close(NULL);
}
