/*
 * test_tok_gpt2.c - GPT-2 byte-level BPE against HF `tokenizers` through
 * golden files (scripts/golden/make_gpt2_goldens.py) on SmolLM2's
 * vocabulary: its own "smollm" pre-tokenizer, plus the "gpt2" and
 * "llama-bpe" families on the same vocabulary; special tokens, EOG ids,
 * encode speed. Skips when the SmolLM2 GGUF is absent.
 */
#include <criterion/criterion.h>

#include "tests/tokenizer/tok_test_util.h"

/* Decodes the JSON string literal at *p (UTF-8 output into out); advances
 * *p past it. Returns the byte length, or -1 on malformed input. */
static long json_str(const char **p, char *out)
{
    const char *s = *p;
    long o = 0;
    if (*s++ != '"')
        return -1;
    while (*s && *s != '"') {
        if (*s != '\\') {
            out[o++] = *s++;
            continue;
        }
        s++;
        char c = *s++;
        switch (c) {
        case 'n': out[o++] = '\n'; break;
        case 't': out[o++] = '\t'; break;
        case 'r': out[o++] = '\r'; break;
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'u': {
            unsigned cp = (unsigned)strtoul((char[5]){s[0], s[1], s[2], s[3], 0}, NULL, 16);
            s += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && s[0] == '\\' && s[1] == 'u') {
                unsigned lo = (unsigned)strtoul((char[5]){s[2], s[3], s[4], s[5], 0}, NULL, 16);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                s += 6;
            }
            unsigned char *u = (unsigned char *)out + o;
            if (cp < 0x80) { u[0] = (unsigned char)cp; o += 1; }
            else if (cp < 0x800) { u[0] = (unsigned char)(0xC0 | cp >> 6); u[1] = (unsigned char)(0x80 | (cp & 63)); o += 2; }
            else if (cp < 0x10000) { u[0] = (unsigned char)(0xE0 | cp >> 12); u[1] = (unsigned char)(0x80 | ((cp >> 6) & 63)); u[2] = (unsigned char)(0x80 | (cp & 63)); o += 3; }
            else { u[0] = (unsigned char)(0xF0 | cp >> 18); u[1] = (unsigned char)(0x80 | ((cp >> 12) & 63)); u[2] = (unsigned char)(0x80 | ((cp >> 6) & 63)); u[3] = (unsigned char)(0x80 | (cp & 63)); o += 4; }
            break;
        }
        default: out[o++] = c; break; /* \" \\ \/ */
        }
    }
    if (*s != '"')
        return -1;
    *p = s + 1;
    return o;
}

/* Appended to the vocab for the llama3 and qwen2 goldens, as
 * scripts/golden/make_gpt2_goldens.py does (EXTRA_TOKENS / EXTRA_MERGES):
 * multi-digit tokens (llama3 groups up to 3 digits, qwen2 none) and two
 * words without a merge path (llama3's ignore_merges keeps them whole). */
static const char *const EXTRA_TOKENS[] = {"00", "000", "12", "123", "19", "199", "20", "202",
                                           "\xc4\xa0Queequeg", "\xc4\xa0Starbuck"};
static const char *const EXTRA_MERGES[] = {"0 0", "00 0", "1 2", "12 3",
                                           "1 9", "19 9", "2 0", "20 2"};

static void add_extras(tt_vocab *v)
{
    int nt = (int)(sizeof EXTRA_TOKENS / sizeof *EXTRA_TOKENS);
    int nm = (int)(sizeof EXTRA_MERGES / sizeof *EXTRA_MERGES);
    int n0 = v->d.n_vocab, m0 = v->d.n_merges;
    v->tokens = realloc(v->tokens, sizeof(tok_str) * (size_t)(n0 + nt));
    v->merges = realloc(v->merges, sizeof(tok_str) * (size_t)(m0 + nm));
    v->types = realloc(v->types, sizeof(int32_t) * (size_t)(n0 + nt));
    cr_assert(v->tokens && v->merges && v->types && !v->scores);
    for (int i = 0; i < nt; i++) {
        v->tokens[n0 + i] = (tok_str){strdup(EXTRA_TOKENS[i]), (uint32_t)strlen(EXTRA_TOKENS[i])};
        v->types[n0 + i] = TOK_TYPE_NORMAL;
    }
    for (int i = 0; i < nm; i++)
        v->merges[m0 + i] = (tok_str){strdup(EXTRA_MERGES[i]), (uint32_t)strlen(EXTRA_MERGES[i])};
    v->d.tokens = v->tokens;
    v->d.types = v->types;
    v->d.merges = v->merges;
    v->d.n_vocab = n0 + nt;
    v->d.n_merges = m0 + nm;
}

/* SmolLM2's vocabulary with the pre-tokenizer family replaced by pre (and
 * the extra tokens above for llama3 / qwen2). */
static tok_tokenizer *smollm2_with_pre(const char *pre)
{
    const char *p = tt_smollm2_path();
    tt_vocab v;
    if (!p)
        return NULL;
    cr_assert_eq(tt_load_gguf_vocab(p, &v), 0, "cannot read %s", p);
    if (pre)
        v.d.pre = pre;
    if (pre && (!strcmp(pre, "llama-bpe") || !strcmp(pre, "qwen2")))
        add_extras(&v);
    tok_tokenizer *t = NULL;
    char err[256] = "";
    cr_assert_eq(tok_create(&v.d, &t, err, sizeof err), 0, "%s", err);
    tt_vocab_free(&v);
    return t;
}

static void check_golden(const char *file, const char *pre)
{
    tok_tokenizer *t = smollm2_with_pre(pre);
    if (!t)
        cr_skip_test("SmolLM2 GGUF absent");
    char path[4096];
    const char *src = getenv("LKQ_SRCDIR");
    snprintf(path, sizeof path, "%s/tests/golden/%s", src ? src : ".", file);
    size_t n;
    char *g = tt_read(path, &n);
    cr_assert_not_null(g, "cannot read %s", path);
    char *text = malloc(n + 1);
    int lines = 0, bad = 0, total = 0;
    const char *p = g;
    while (*p) {
        if (*p == '#') {
            p = strchr(p, '\n') + 1;
            continue;
        }
        long len = json_str(&p, text);
        cr_assert(len >= 0 && *p == '\n', "%s: bad JSON at input %d", file, lines);
        p++;
        int32_t want[16384];
        int nw = 0;
        while (*p && *p != '\n') {
            char *e;
            want[nw++] = (int32_t)strtol(p, &e, 10);
            p = e;
            while (*p == ' ')
                p++;
        }
        if (*p == '\n')
            p++;
        int ng;
        int32_t *got = tt_encode(t, text, (size_t)len, 0, 1, &ng);
        cr_assert_not_null(got);
        total += ng;
        if (ng != nw || memcmp(got, want, sizeof(int32_t) * (size_t)nw) != 0) {
            if (bad++ < 5) {
                fprintf(stderr, "%s: input %d differs: \"%.*s\"\n  want:", file,
                        lines, (int)len, text);
                for (int i = 0; i < nw && i < 40; i++)
                    fprintf(stderr, " %d", want[i]);
                fprintf(stderr, "\n  got :");
                for (int i = 0; i < ng && i < 40; i++)
                    fprintf(stderr, " %d", got[i]);
                fprintf(stderr, "\n");
            }
        }
        /* byte-level BPE loses nothing: decoding gives the text back */
        char *back = malloc((size_t)len * 3 + 64);
        size_t bl = tok_decode(t, got, ng, 1, back, (size_t)len * 3 + 64);
        cr_expect(bl == (size_t)len && memcmp(back, text, bl) == 0,
                  "%s: round trip of input %d", file, lines);
        free(back);
        free(got);
        lines++;
    }
    fprintf(stderr, "%s: %d inputs, %d ids, %d mismatches\n", file, lines, total, bad);
    cr_assert_gt(lines, 100);
    cr_expect_eq(bad, 0, "%s: %d of %d inputs differ from HF tokenizers", file,
                 bad, lines);
    free(text);
    free(g);
    tok_destroy(t);
}

Test(tok_gpt2, smollm2_matches_hf_tokenizers)
{
    check_golden("gpt2_smollm2.txt", NULL);
}

Test(tok_gpt2, pre_gpt2_matches_hf_tokenizers)
{
    check_golden("gpt2_pre_gpt2.txt", "gpt2");
}

Test(tok_gpt2, pre_llama3_matches_hf_tokenizers)
{
    check_golden("gpt2_pre_llama3.txt", "llama-bpe");
}

Test(tok_gpt2, pre_qwen2_matches_hf_tokenizers)
{
    check_golden("gpt2_pre_qwen2.txt", "qwen2");
}

Test(tok_gpt2, specials_and_eog)
{
    tok_tokenizer *t = smollm2_with_pre(NULL);
    if (!t)
        cr_skip_test("SmolLM2 GGUF absent");
    cr_assert_eq(tok_get_kind(t), TOK_GPT2);
    cr_assert_eq(tok_n_vocab(t), 49152);
    cr_assert_eq(tok_find(t, "<|im_start|>"), 1);
    cr_assert_eq(tok_find(t, "<|im_end|>"), 2);
    cr_assert(tok_is_eog(t, 2) && tok_is_eog(t, 0) && !tok_is_eog(t, 1));
    cr_assert(!tok_is_eog(t, 100));
    cr_assert_eq(tok_default_add_bos(t), 0);
    const char *s = "<|im_start|>user\nhi<|im_end|>";
    int32_t ids[64];
    int n;
    cr_assert_eq(tok_encode(t, s, strlen(s), 0, 1, ids, 64, &n), 0);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[n - 1], 2);
    /* without parse_special the control tokens are plain text */
    cr_assert_eq(tok_encode(t, s, strlen(s), 0, 0, ids, 64, &n), 0);
    for (int i = 0; i < n; i++)
        cr_assert(ids[i] != 1 && ids[i] != 2);
    char out[128];
    tok_decode(t, ids, n, 0, out, sizeof out);
    cr_assert_str_eq(out, s);
    /* control tokens render only when asked */
    int32_t x[] = {1, 4093, 2};
    char p1[64], p2[64];
    tok_decode(t, x, 3, 0, p1, sizeof p1);
    tok_decode(t, x, 3, 1, p2, sizeof p2);
    char piece[32];
    int pl = tok_piece(t, 4093, 0, piece, sizeof piece);
    cr_assert(pl > 0);
    cr_assert_eq(strlen(p1), (size_t)pl);
    cr_assert_eq(strlen(p2), (size_t)pl + strlen("<|im_start|><|im_end|>"));
    cr_assert_eq(tok_piece(t, 1, 0, piece, sizeof piece), 0);
    cr_assert_eq(tok_piece(t, 1, 1, piece, sizeof piece), 12);
    cr_assert_lt(tok_piece(t, 49152, 0, piece, sizeof piece), 0);
    cr_assert_lt(tok_piece(t, -1, 0, piece, sizeof piece), 0);
    /* unknown pre-tokenizer families are refused, not guessed */
    tt_vocab v;
    cr_assert_eq(tt_load_gguf_vocab(tt_smollm2_path(), &v), 0);
    v.d.pre = "no-such-family";
    tok_tokenizer *bad = NULL;
    char err[128] = "";
    cr_assert_lt(tok_create(&v.d, &bad, err, sizeof err), 0);
    cr_assert_null(bad);
    cr_assert(strstr(err, "no-such-family") != NULL);
    tt_vocab_free(&v);
    tok_destroy(t);
}

Test(tok_gpt2, encode_speed)
{
    tok_tokenizer *t = smollm2_with_pre(NULL);
    size_t n;
    char *text = tt_read(tt_shared("data/moby-dick.txt"), &n);
    if (!t || !text) {
        free(text);
        tok_destroy(t);
        cr_skip_test("SmolLM2 GGUF or moby-dick.txt absent");
    }
    int cnt;
    double t0 = tt_now();
    int32_t *ids = tt_encode(t, text, n, 0, 1, &cnt);
    double dt = tt_now() - t0;
    cr_assert_not_null(ids);
    fprintf(stderr, "GPT-2 (SmolLM2) encode: %.2f MB in %.3f s = %.2f MB/s, %d tokens\n",
            (double)n / 1e6, dt, (double)n / 1e6 / dt, cnt);
    free(ids);
    free(text);
    tok_destroy(t);
}
