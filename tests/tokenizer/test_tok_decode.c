/*
 * test_tok_decode.c - decoding with both tokenizers: decode(encode(x)) == x
 * over the varied test lines, streaming decode (one id at a time, multibyte
 * characters split over byte tokens) equals whole decode, invalid UTF-8
 * input neither crashes nor yields invalid output, empty input, truncated
 * output buffers, 1 MB inputs in bounded time, concurrent encoders.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>

#include "tests/tokenizer/tok_test_util.h"

/* Strict UTF-8 validity (no overlongs, surrogates, > U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned char b = s[i];
        size_t l = b < 0x80 ? 1 : b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3
                                : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
        if (!l || i + l > n)
            return 0;
        for (size_t k = 1; k < l; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        if ((b == 0xE0 && s[i + 1] < 0xA0) || (b == 0xED && s[i + 1] > 0x9F) ||
            (b == 0xF0 && s[i + 1] < 0x90) || (b == 0xF4 && s[i + 1] > 0x8F))
            return 0;
        i += l;
    }
    return 1;
}

typedef struct {
    tok_tokenizer *t;
    const char *name;
    int parse_special;
} tk_case;

/* Tokenizers under test; entries whose files are absent are left out. */
static int load_all(tk_case *c)
{
    int n = 0;
    char err[256];
    tok_tokenizer *t = NULL;
    if (tok_load_spm_model(tt_shared("models/llama2-tokenizer/tokenizer.model"),
                           &t, err, sizeof err) == 0)
        c[n++] = (tk_case){t, "llama2 spm", 0};
    if (tok_load_llama2c(tt_shared("models/stories260K/tok512.bin"), 512, &t,
                         err, sizeof err) == 0)
        c[n++] = (tk_case){t, "tok512 bin", 0};
    if ((t = tt_smollm2()) != NULL)
        c[n++] = (tk_case){t, "smollm2 gpt2", 1};
    return n;
}

static void free_all(tk_case *c, int n)
{
    for (int i = 0; i < n; i++)
        tok_destroy(c[i].t);
}

/* Streams ids through a tok_decoder; returns malloc'd text. */
static char *stream_decode(const tok_tokenizer *t, const int32_t *ids, int n,
                           int render_special, size_t *len)
{
    tok_decoder d;
    tok_decoder_init(&d, t, render_special);
    size_t cap = 64 + (size_t)n * 64, o = 0;
    char *out = malloc(cap);
    for (int i = 0; i < n; i++)
        o += tok_decoder_push(&d, ids[i], out + o, cap - o);
    o += tok_decoder_flush(&d, out + o, cap - o);
    *len = o;
    return out;
}

Test(tok_decode, round_trip_and_streaming)
{
    tk_case c[4];
    int nc = load_all(c);
    if (nc == 0)
        cr_skip_test("no tokenizer files");
    tt_lines l = {0};
    tt_make_lines(&l);
    for (int k = 0; k < nc; k++) {
        int bad = 0;
        for (int i = 0; i < l.n; i++) {
            int n;
            /* a literal U+2581 in the text decodes as a space in SPM: skip */
            int spm_ambiguous = tok_get_kind(c[k].t) == TOK_SPM &&
                                strstr(l.s[i], "\xe2\x96\x81") != NULL;
            /* the SmolLM2 lines may spell control tokens: keep them text */
            int32_t *ids = tt_encode(c[k].t, l.s[i], l.len[i], 1, 0, &n);
            cr_assert_not_null(ids);
            size_t cap = l.len[i] * 3 + 64;
            char *whole = malloc(cap);
            size_t wl = tok_decode(c[k].t, ids, n, 0, whole, cap);
            if (!spm_ambiguous && (wl != l.len[i] || memcmp(whole, l.s[i], wl) != 0))
                if (bad++ < 3)
                    fprintf(stderr, "%s: round trip of \"%s\" gave \"%s\"\n",
                            c[k].name, l.s[i], whole);
            size_t sl;
            char *st = stream_decode(c[k].t, ids, n, 0, &sl);
            cr_assert(sl == wl && memcmp(st, whole, wl) == 0,
                      "%s: streaming differs on line %d", c[k].name, i);
            free(st);
            free(whole);
            free(ids);
        }
        cr_expect_eq(bad, 0, "%s: %d round trips failed", c[k].name, bad);
    }
    tt_lines_free(&l);
    free_all(c, nc);
}

Test(tok_decode, emoji_split_over_byte_tokens)
{
    tok_tokenizer *t = NULL;
    char err[256];
    if (tok_load_spm_model(tt_shared("models/llama2-tokenizer/tokenizer.model"),
                           &t, err, sizeof err) < 0)
        cr_skip_test("llama2 tokenizer absent");
    const char *emoji = "\xF0\x9F\x98\x80"; /* 😀, not in the vocab */
    int32_t ids[16];
    int n;
    cr_assert_eq(tok_encode(t, emoji, 4, 0, 0, ids, 16, &n), 0);
    cr_assert_eq(n, 5); /* "▁" then four byte tokens */
    cr_assert_eq(ids[1], tok_find(t, "<0xF0>"));
    tok_decoder d;
    tok_decoder_init(&d, t, 0);
    char out[32];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(tok_decoder_push(&d, ids[i], out, sizeof out), 0, "id %d", i);
    cr_assert_eq(tok_decoder_push(&d, ids[4], out, sizeof out), 4);
    cr_assert_str_eq(out, emoji);
    cr_assert_eq(tok_decoder_flush(&d, out, sizeof out), 0);
    /* a sequence broken by a plain byte: U+FFFD, then the byte */
    tok_decoder_init(&d, t, 0);
    d.first = 0;
    cr_assert_eq(tok_decoder_push(&d, tok_find(t, "<0xF0>"), out, sizeof out), 0);
    cr_assert_eq(tok_decoder_push(&d, tok_find(t, "<0x9F>"), out, sizeof out), 0);
    cr_assert_eq(tok_decoder_push(&d, tok_find(t, "<0x41>"), out, sizeof out), 4);
    cr_assert_str_eq(out, "\xEF\xBF\xBD" "A");
    /* a lone lead byte at the end: flushed as U+FFFD */
    cr_assert_eq(tok_decoder_push(&d, tok_find(t, "<0xE2>"), out, sizeof out), 0);
    cr_assert_eq(tok_decoder_flush(&d, out, sizeof out), 3);
    cr_assert_str_eq(out, "\xEF\xBF\xBD");
    /* invalid ids produce nothing */
    cr_assert_eq(tok_decoder_push(&d, -5, out, sizeof out), 0);
    cr_assert_eq(tok_decoder_push(&d, 1 << 30, out, sizeof out), 0);
    /* the first piece's dummy-prefix space is dropped, later ones kept */
    tok_decoder_init(&d, t, 0);
    int32_t w[] = {1, 9038, 2501};
    char acc[64] = "";
    for (int i = 0; i < 3; i++) {
        tok_decoder_push(&d, w[i], out, sizeof out);
        strcat(acc, out);
    }
    cr_assert_str_eq(acc, "Once upon");
    tok_destroy(t);
}

Test(tok_decode, invalid_utf8_input)
{
    tk_case c[4];
    int nc = load_all(c);
    if (nc == 0)
        cr_skip_test("no tokenizer files");
    unsigned char buf[600];
    uint32_t seed = 7;
    for (int k = 0; k < nc; k++) {
        for (int trial = 0; trial < 300; trial++) {
            size_t n = trial == 0 ? 256 : 1 + (size_t)(seed % 500);
            for (size_t i = 0; i < n; i++) {
                seed = seed * 1664525u + 1013904223u;
                buf[i] = trial == 0 ? (unsigned char)i : (unsigned char)(seed >> 24);
                if (trial % 3 == 1 && (seed & 0x300)) /* mostly ASCII */
                    buf[i] &= 0x7F;
            }
            int cnt;
            int32_t *ids = tt_encode(c[k].t, (const char *)buf, n, 1,
                                     c[k].parse_special, &cnt);
            cr_assert_not_null(ids);
            for (int i = 0; i < cnt; i++)
                cr_assert(ids[i] >= 0 && ids[i] < tok_n_vocab(c[k].t));
            char out[4096];
            size_t len = tok_decode(c[k].t, ids, cnt, 0, out, sizeof out);
            cr_assert_lt(len, sizeof out);
            cr_assert(valid_utf8((unsigned char *)out, len), "%s: invalid output",
                      c[k].name);
            free(ids);
            /* GPT-2: the raw pieces give back every input byte that has a
             * token (SmolLM2 lacks 21 of the 256 byte tokens; those bytes
             * are dropped, as HF tokenizers drops them) */
            if (tok_get_kind(c[k].t) == TOK_GPT2) {
                unsigned char want[600];
                size_t nw = 0, o = 0;
                for (size_t i = 0; i < n; i++) {
                    int32_t one[2];
                    int m;
                    tok_encode(c[k].t, (const char *)buf + i, 1, 0, 0, one, 2, &m);
                    if (m > 0)
                        want[nw++] = buf[i];
                }
                ids = tt_encode(c[k].t, (const char *)buf, n, 0, 0, &cnt);
                for (int i = 0; i < cnt; i++)
                    o += (size_t)tok_piece(c[k].t, ids[i], 1, out + o, sizeof out - o);
                cr_assert(o == nw && memcmp(out, want, nw) == 0, "%s: bytes lost",
                          c[k].name);
                free(ids);
            }
        }
    }
    free_all(c, nc);
}

Test(tok_decode, empty_and_small_buffers)
{
    tk_case c[4];
    int nc = load_all(c);
    if (nc == 0)
        cr_skip_test("no tokenizer files");
    for (int k = 0; k < nc; k++) {
        tok_tokenizer *t = c[k].t;
        int32_t ids[8];
        int n = -1;
        cr_assert_eq(tok_encode(t, NULL, 0, 0, 0, ids, 8, &n), 0);
        cr_assert_eq(n, 0);
        cr_assert_eq(tok_encode(t, "", 0, 1, 0, ids, 8, &n), 0);
        cr_assert_eq(n, tok_bos(t) >= 0 ? 1 : 0);
        cr_assert_eq(tok_encode(t, "", 0, 1, 0, NULL, 0, &n), n ? -ENOSPC : 0);
        char out[8] = "xxxxxxx";
        cr_assert_eq(tok_decode(t, ids, 0, 0, out, sizeof out), 0);
        cr_assert_str_eq(out, "");
        cr_assert_eq(tok_decode(t, NULL, 0, 0, NULL, 0), 0);
        /* truncated output: full length returned, NUL-terminated prefix */
        const char *s = "Hello world, hello whale";
        int32_t big[64];
        cr_assert_eq(tok_encode(t, s, strlen(s), 0, 0, big, 64, &n), 0);
        cr_assert_eq(tok_decode(t, big, n, 0, out, sizeof out), strlen(s));
        cr_assert_eq(strlen(out), sizeof out - 1);
        cr_assert(memcmp(out, s, sizeof out - 1) == 0);
        cr_assert_eq(tok_decode(t, big, n, 0, NULL, 0), strlen(s));
    }
    cr_assert_lt(tok_encode(c[0].t, "x", 1, 0, 0, NULL, -1, &(int){0}), 0);
    free_all(c, nc);
}

Test(tok_decode, one_megabyte_in_bounded_time)
{
    tk_case c[4];
    int nc = load_all(c);
    size_t n;
    char *text = tt_read(tt_shared("data/moby-dick.txt"), &n);
    if (nc == 0 || !text) {
        free(text);
        free_all(c, nc);
        cr_skip_test("tokenizer files or moby-dick.txt absent");
    }
    if (n > (1u << 20))
        n = 1u << 20;
    while ((text[n] & 0xC0) == 0x80) /* cut on a character boundary */
        n--;
    for (int k = 0; k < nc; k++) {
        int cnt;
        double t0 = tt_now();
        int32_t *ids = tt_encode(c[k].t, text, n, 0, 0, &cnt);
        double dt = tt_now() - t0;
        cr_assert_not_null(ids);
        fprintf(stderr, "%s: 1 MiB -> %d tokens in %.3f s (%.2f MB/s)\n",
                c[k].name, cnt, dt, (double)n / 1e6 / dt);
        cr_expect_lt(dt, 5.0, "%s: 1 MiB took %.2f s", c[k].name, dt);
        char *back = malloc(n + 64);
        cr_assert_eq(tok_decode(c[k].t, ids, cnt, 0, back, n + 64), n);
        cr_assert(memcmp(back, text, n) == 0);
        free(back);
        free(ids);
    }
    free(text);
    free_all(c, nc);
}

typedef struct {
    const tok_tokenizer *t;
    const tt_lines *l;
    int ok;
} th_arg;

static void *encode_all(void *p)
{
    th_arg *a = p;
    a->ok = 1;
    for (int i = 0; i < a->l->n; i++) {
        int n1, n2;
        int32_t *x = tt_encode(a->t, a->l->s[i], a->l->len[i], 1, 1, &n1);
        int32_t *y = tt_encode(a->t, a->l->s[i], a->l->len[i], 1, 1, &n2);
        if (!x || !y || n1 != n2 || memcmp(x, y, sizeof(int32_t) * (size_t)n1))
            a->ok = 0;
        free(x);
        free(y);
    }
    return NULL;
}

/* The tokenizer is read-only after creation: concurrent encoders agree. */
Test(tok_decode, concurrent_encoders)
{
    tk_case c[4];
    int nc = load_all(c);
    if (nc == 0)
        cr_skip_test("no tokenizer files");
    tt_lines l = {0};
    tt_make_lines(&l);
    for (int k = 0; k < nc; k++) {
        pthread_t th[3];
        th_arg a[3];
        for (int i = 0; i < 3; i++) {
            a[i] = (th_arg){c[k].t, &l, 0};
            pthread_create(&th[i], NULL, encode_all, &a[i]);
        }
        for (int i = 0; i < 3; i++) {
            pthread_join(th[i], NULL);
            cr_assert(a[i].ok, "%s: thread %d", c[k].name, i);
        }
    }
    tt_lines_free(&l);
    free_all(c, nc);
}
