/*
 * lkq_prompt.c - corpus slicing, request bodies, seeded random numbers (see
 * lkq_prompt.h). Threading: none.
 */
#include "loadtests/lkq_prompt.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LKQ_CORPUS_MAX ((size_t)256 << 20)

/* 1 when s[0..n) is valid UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1;
            min = 0x80;
            c &= 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2;
            min = 0x800;
            c &= 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3;
            min = 0x10000;
            c &= 0x07;
        } else {
            return 0;
        }
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xC0) != 0x80)
                return 0;
            c = (c << 6) | (s[i + j] & 0x3F);
        }
        if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

int lkq_corpus_load(lkq_corpus *c, const char *path, char *err, size_t errlen)
{
    memset(c, 0, sizeof *c);
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open prompt file %s: %s", path, strerror(errno));
        return -1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 65536 + 1 > cap) {
            size_t nc = cap ? cap * 2 : 1 << 20;
            char *nb = realloc(buf, nc);
            if (!nb) {
                snprintf(err, errlen, "out of memory reading %s", path);
                goto fail;
            }
            buf = nb;
            cap = nc;
        }
        size_t r = fread(buf + len, 1, 65536, f);
        len += r;
        if (len > LKQ_CORPUS_MAX) {
            snprintf(err, errlen, "prompt file %s is over 256 MiB", path);
            goto fail;
        }
        if (r < 65536) {
            if (ferror(f)) {
                snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
                goto fail;
            }
            break;
        }
    }
    fclose(f);
    f = NULL;
    if (len == 0) {
        snprintf(err, errlen, "prompt file %s is empty", path);
        goto fail;
    }
    if (!utf8_valid((const unsigned char *)buf, len)) {
        snprintf(err, errlen, "prompt file %s is not valid UTF-8", path);
        goto fail;
    }
    buf[len] = '\0';
    c->text = buf;
    c->len = len;
    return 0;
fail:
    if (f)
        fclose(f);
    free(buf);
    return -1;
}

void lkq_corpus_free(lkq_corpus *c)
{
    if (!c)
        return;
    free(c->text);
    c->text = NULL;
    c->len = 0;
}

const char *lkq_corpus_default_path(char *buf, size_t len)
{
    const char *root = getenv("LKQ_SHARED");
    snprintf(buf, len, "%s/data/moby-dick.txt", root && *root ? root : "../shared");
    return buf;
}

uint64_t lkq_rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double lkq_rng_unit(uint64_t *state)
{
    /* 53 random bits, shifted so 0 is excluded and 1 included */
    return ((double)(lkq_rng_next(state) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

double lkq_rng_exp(uint64_t *state, double rate)
{
    return -log(lkq_rng_unit(state)) / rate;
}

static int is_space(char ch)
{
    return ch == ' ' || ch == '\n' || ch == '\r' || ch == '\t';
}

int lkq_corpus_slice(const lkq_corpus *c, uint64_t seed, uint64_t index, size_t nchars,
                     size_t *off, size_t *len)
{
    if (nchars == 0 || c->len < nchars + 64)
        return -1;
    uint64_t st = seed * 0x2545F4914F6CDD1Dull ^ (index + 1) * 0x9E3779B97F4A7C15ull;
    size_t span = c->len - nchars - 64;
    size_t o = span ? (size_t)(lkq_rng_next(&st) % (span + 1)) : 0;
    /* start at a word: skip to the next whitespace run, then past it (bounded
     * by the 64 spare bytes) */
    size_t lim = o + 48;
    while (o < lim && !is_space(c->text[o]))
        o++;
    while (o < lim && is_space(c->text[o]))
        o++;
    /* never start inside a UTF-8 sequence */
    while (o < c->len && ((unsigned char)c->text[o] & 0xC0) == 0x80)
        o++;
    size_t n = nchars;
    if (o + n > c->len)
        n = c->len - o;
    /* end before a partial UTF-8 sequence: back up to a lead or ASCII byte
     * that starts the next character */
    while (n > 0 && o + n < c->len && ((unsigned char)c->text[o + n] & 0xC0) == 0x80)
        n--;
    if (n == 0)
        return -1;
    *off = o;
    *len = n;
    return 0;
}

char *lkq_request_body(const lkq_args *a, const char *model, const char *prompt, size_t len)
{
    json_t *o = json_object();
    json_t *p = json_stringn(prompt, len);
    if (!o || !p) {
        json_decref(o);
        json_decref(p);
        return NULL;
    }
    if (model && *model)
        json_object_set_new(o, "model", json_string(model));
    if (a->chat) {
        json_t *msgs = json_array(), *m = json_object();
        json_object_set_new(m, "role", json_string("user"));
        json_object_set_new(m, "content", p);
        json_array_append_new(msgs, m);
        json_object_set_new(o, "messages", msgs);
    } else {
        json_object_set_new(o, "prompt", p);
    }
    json_object_set_new(o, "max_tokens", json_integer(a->max_tokens));
    json_object_set_new(o, "temperature", json_real(a->temperature));
    json_object_set_new(o, "stream", json_true());
    if (a->ignore_eos)
        json_object_set_new(o, "ignore_eos", json_true());
    if (a->kv_cache)
        json_object_set_new(o, "kv_cache", json_string(a->kv_cache));
    json_t *so = json_object();
    json_object_set_new(so, "include_usage", json_true());
    json_object_set_new(o, "stream_options", so);
    char *txt = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return txt;
}
