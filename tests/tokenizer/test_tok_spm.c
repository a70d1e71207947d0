/*
 * test_tok_spm.c - SentencePiece-style BPE against the reference,
 * Debian's libsentencepiece (through the test-only program spm_ref), on
 * the Llama 2 and stories260K tokenizer.model files over ~2500 varied
 * lines; llama2.c tokenizer.bin files against the .model files; a small
 * hand-made vocabulary for byte fallback / unk / user-defined / unused
 * pieces; malformed files; encode speed.
 */
#include <criterion/criterion.h>
#include <unistd.h>

#include "tests/tokenizer/tok_test_util.h"

static tok_tokenizer *load_model(const char *rel)
{
    const char *p = tt_shared(rel);
    if (!tt_exists(p))
        return NULL;
    tok_tokenizer *t = NULL;
    char err[256] = "";
    int rc = tok_load_spm_model(p, &t, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: %s", p, err);
    return t;
}

static tok_tokenizer *load_bin(const char *rel, int32_t n_vocab)
{
    const char *p = tt_shared(rel);
    if (!tt_exists(p))
        return NULL;
    tok_tokenizer *t = NULL;
    char err[256] = "";
    int rc = tok_load_llama2c(p, n_vocab, &t, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: %s", p, err);
    return t;
}

static void print_ids(const char *what, const int32_t *ids, int n)
{
    fprintf(stderr, "  %s:", what);
    for (int i = 0; i < n && i < 40; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

/* Compares tok_encode (no BOS) with libsentencepiece on every test line. */
static void check_against_ref(const char *model_rel)
{
#ifndef SPM_REF_PATH
    (void)model_rel;
    cr_skip_test("spm_ref (libsentencepiece) not built");
#else
    tok_tokenizer *t = load_model(model_rel);
    if (!t)
        cr_skip_test("%s absent", model_rel);
    tt_lines l = {0};
    tt_make_lines(&l);
    char in[] = "/tmp/tok_spm_in_XXXXXX", outp[] = "/tmp/tok_spm_out_XXXXXX";
    int fi = mkstemp(in), fo = mkstemp(outp);
    cr_assert(fi >= 0 && fo >= 0);
    close(fo);
    FILE *f = fdopen(fi, "w");
    for (int i = 0; i < l.n; i++) {
        for (size_t j = 0; j < l.len[i]; j++) {
            char c = l.s[i][j];
            if (c == '\\' || c == '\n' || c == '\t' || c == '\r')
                fputc('\\', f);
            fputc(c == '\n' ? 'n' : c == '\t' ? 't' : c == '\r' ? 'r' : c, f);
        }
        fputc('\n', f);
    }
    fclose(f);
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' '%s'", SPM_REF_PATH,
             tt_shared(model_rel), in, outp);
    cr_assert_eq(system(cmd), 0, "spm_ref failed: %s", cmd);
    size_t n;
    char *ref = tt_read(outp, &n);
    cr_assert_not_null(ref);
    char *p = ref;
    int bad = 0, total_ids = 0;
    for (int i = 0; i < l.n; i++) {
        int32_t want[8192];
        int nw = 0;
        while (*p && *p != '\n') {
            want[nw++] = (int32_t)strtol(p, &p, 10);
            while (*p == ' ')
                p++;
        }
        cr_assert_eq(*p, '\n', "reference output ends early at line %d", i);
        p++;
        int ng;
        int32_t *got = tt_encode(t, l.s[i], l.len[i], 0, 0, &ng);
        cr_assert_not_null(got);
        total_ids += ng;
        if (ng != nw || memcmp(got, want, sizeof(int32_t) * (size_t)nw) != 0) {
            if (bad++ < 5) {
                fprintf(stderr, "%s: mismatch on line %d: \"%s\"\n", model_rel, i,
                        l.s[i]);
                print_ids("want", want, nw);
                print_ids("got ", got, ng);
            }
        }
        free(got);
    }
    fprintf(stderr, "%s: %d lines, %d ids, %d mismatches\n", model_rel, l.n,
            total_ids, bad);
    cr_expect_eq(bad, 0, "%d of %d lines differ from libsentencepiece", bad, l.n);
    free(ref);
    unlink(in);
    unlink(outp);
    tt_lines_free(&l);
    tok_destroy(t);
#endif
}

Test(tok_spm, llama2_model_matches_sentencepiece)
{
    check_against_ref("models/llama2-tokenizer/tokenizer.model");
}

Test(tok_spm, tok512_model_matches_sentencepiece)
{
    check_against_ref("models/stories260K/tok512.model");
}

/* Lines whose encoding does not depend on remove_extra_whitespaces. */
static int plain_spaces(const char *s, size_t n)
{
    if (n && (s[0] == ' ' || s[n - 1] == ' '))
        return 0;
    return !strstr(s, "  ") && !strstr(s, "\xe2\x96\x81");
}

static void check_bin_vs_model(const char *bin_rel, int32_t n_vocab,
                               const char *model_rel, int only_plain)
{
    tok_tokenizer *a = load_bin(bin_rel, n_vocab), *b = load_model(model_rel);
    if (!a || !b) {
        tok_destroy(a);
        tok_destroy(b);
        cr_skip_test("%s or %s absent", bin_rel, model_rel);
    }
    cr_assert_eq(tok_n_vocab(a), tok_n_vocab(b));
    tt_lines l = {0};
    tt_make_lines(&l);
    int bad = 0, used = 0;
    for (int i = 0; i < l.n; i++) {
        if (only_plain && !plain_spaces(l.s[i], l.len[i]))
            continue;
        used++;
        int na, nb;
        int32_t *x = tt_encode(a, l.s[i], l.len[i], 1, 0, &na);
        int32_t *y = tt_encode(b, l.s[i], l.len[i], 1, 0, &nb);
        if (na != nb || memcmp(x, y, sizeof(int32_t) * (size_t)na) != 0)
            if (bad++ < 3)
                fprintf(stderr, "%s vs %s differ on \"%s\"\n", bin_rel, model_rel,
                        l.s[i]);
        free(x);
        free(y);
    }
    cr_expect_eq(bad, 0, "%s: %d of %d lines differ from %s", bin_rel, bad,
                 used, model_rel);
    for (int32_t id = 0; id < tok_n_vocab(a); id++) {
        char pa[64], pb[64];
        int la = tok_piece(a, id, 0, pa, sizeof pa);
        int lb = tok_piece(b, id, 0, pb, sizeof pb);
        cr_assert(la == lb && la <= 64 && memcmp(pa, pb, (size_t)la) == 0,
                  "%s: piece %d differs", bin_rel, id);
    }
    tt_lines_free(&l);
    tok_destroy(a);
    tok_destroy(b);
}

Test(tok_spm, llama2c_bin_early_format_matches_model)
{
    check_bin_vs_model("models/stories15M/tokenizer.bin", 32000,
                       "models/llama2-tokenizer/tokenizer.model", 0);
}

Test(tok_spm, llama2c_bin_hex_format_matches_model)
{
    check_bin_vs_model("models/llama2-tokenizer/tokenizer.bin", 32000,
                       "models/llama2-tokenizer/tokenizer.model", 0);
}

/* tok512.model removes extra spaces (normalizer flag) while a llama2.c
 * tokenizer.bin carries no normalizer: compare where that cannot matter. */
Test(tok_spm, llama2c_bin_tok512_matches_model)
{
    check_bin_vs_model("models/stories260K/tok512.bin", 512,
                       "models/stories260K/tok512.model", 1);
}

Test(tok_spm, once_upon_a_time)
{
    const char *files[] = {"models/stories15M/tokenizer.bin",
                           "models/llama2-tokenizer/tokenizer.bin",
                           "models/llama2-tokenizer/tokenizer.model"};
    for (int k = 0; k < 3; k++) {
        tok_tokenizer *t = k < 2 ? load_bin(files[k], 0) : load_model(files[k]);
        if (!t)
            cr_skip_test("%s absent", files[k]);
        cr_assert_eq(tok_n_vocab(t), 32000);
        int32_t ids[16];
        int n;
        cr_assert_eq(tok_encode(t, "Once upon a time", 16, 1, 0, ids, 16, &n), 0);
        int32_t want[] = {1, 9038, 2501, 263, 931};
        cr_assert_eq(n, 5, "%s: %d ids", files[k], n);
        cr_assert_arr_eq(ids, want, sizeof want, "%s", files[k]);
        cr_assert_eq(tok_bos(t), 1);
        cr_assert_eq(tok_eos(t), 2);
        cr_assert(tok_is_eog(t, 2) && !tok_is_eog(t, 1));
        cr_assert_eq(tok_find(t, "<s>"), 1);
        cr_assert_eq(tok_find(t, "\xe2\x96\x81time"), 931);
        cr_assert_eq(tok_find(t, "<0x0A>"), 13);
        /* cap too small: negative, full count reported */
        cr_assert_lt(tok_encode(t, "Once upon a time", 16, 1, 0, ids, 2, &n), 0);
        cr_assert_eq(n, 5);
        /* parse_special: "<s>" in text is BOS only when asked */
        cr_assert_eq(tok_encode(t, "<s>hi", 5, 0, 1, ids, 16, &n), 0);
        cr_assert(n >= 2 && ids[0] == 1);
        cr_assert_eq(tok_encode(t, "<s>hi", 5, 0, 0, ids, 16, &n), 0);
        cr_assert_neq(ids[0], 1);
        char out[64];
        int32_t dec[] = {1, 9038, 2501, 263, 931, 2};
        cr_assert_eq(tok_decode(t, dec, 6, 0, out, sizeof out), 16);
        cr_assert_str_eq(out, "Once upon a time");
        tok_destroy(t);
    }
}

/* A hand-made vocabulary exercising merge order, byte fallback, unk,
 * user-defined (frozen) and unused (split back) pieces. */
Test(tok_spm, handmade_vocab)
{
    static const char *txt[] = {
        "<unk>", "<s>", "</s>", "<0x41>", "<0xC3>", "<0xA9>", "<0x0A>",
        "\xe2\x96\x81", "a", "b", "c", "ab", "bc", "abc", "\xe2\x96\x81" "abc",
        "<tag>", "cc", "ccc"};
    enum { N = sizeof(txt) / sizeof(txt[0]) };
    tok_str toks[N];
    float sc[N];
    int32_t ty[N];
    for (int i = 0; i < N; i++) {
        toks[i].s = txt[i];
        toks[i].len = (uint32_t)strlen(txt[i]);
        sc[i] = -(float)i;
        ty[i] = TOK_TYPE_NORMAL;
    }
    ty[0] = TOK_TYPE_UNKNOWN;
    ty[1] = ty[2] = TOK_TYPE_CONTROL;
    for (int i = 3; i <= 6; i++)
        ty[i] = TOK_TYPE_BYTE;
    sc[12] = 10;                  /* "bc" beats "ab" */
    ty[15] = TOK_TYPE_USER_DEFINED;
    ty[17] = TOK_TYPE_UNUSED;     /* "ccc" is merged then split back */
    sc[17] = 20;
    tok_desc d = {.kind = TOK_SPM, .n_vocab = N, .tokens = toks, .scores = sc,
                  .types = ty, .bos_id = 1, .eos_id = 2, .unk_id = 0,
                  .pad_id = -1, .add_bos = 1, .add_space_prefix = 1};
    tok_tokenizer *t;
    char err[128];
    cr_assert_eq(tok_create(&d, &t, err, sizeof err), 0, "%s", err);
    int32_t ids[32];
    int n;
    /* "▁abc" whole? no: "bc" (score 10) merges first, then "a"+"bc" = "abc",
     * then "▁"+"abc" = "▁abc" */
    cr_assert_eq(tok_encode(t, "abc", 3, 1, 0, ids, 32, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 14);
    /* é -> byte fallback <0xC3><0xA9>; 'A' -> <0x41>; 'z' has no byte piece -> unk */
    cr_assert_eq(tok_encode(t, "\xc3\xa9" "Az", 4, 0, 0, ids, 32, &n), 0);
    int32_t w1[] = {7, 4, 5, 3, 0};
    cr_assert_eq(n, 5);
    cr_assert_arr_eq(ids, w1, sizeof w1);
    /* user-defined "<tag>" is frozen, never merged with neighbours */
    cr_assert_eq(tok_encode(t, "a<tag>b", 7, 0, 0, ids, 32, &n), 0);
    int32_t w2[] = {7, 8, 15, 9};
    cr_assert_eq(n, 4);
    cr_assert_arr_eq(ids, w2, sizeof w2);
    /* unused "ccc" split back along its merge ("cc" + "c") */
    cr_assert_eq(tok_encode(t, "ccc", 3, 0, 0, ids, 32, &n), 0);
    int32_t w3[] = {7, 16, 10};
    cr_assert_eq(n, 3);
    cr_assert_arr_eq(ids, w3, sizeof w3);
    /* invalid UTF-8 goes through byte fallback (here: unk), no crash */
    cr_assert_eq(tok_encode(t, "\xff\xc3", 2, 0, 0, ids, 32, &n), 0);
    int32_t w4[] = {7, 0, 4};
    cr_assert_eq(n, 3);
    cr_assert_arr_eq(ids, w4, sizeof w4);
    tok_destroy(t);
}

/* Truncated or corrupted files fail with a message, never crash. */
Test(tok_spm, malformed_files)
{
    const char *srcs[] = {"models/stories260K/tok512.model",
                          "models/stories260K/tok512.bin"};
    char err[256];
    tok_tokenizer *t = (tok_tokenizer *)1;
    cr_assert_lt(tok_load_spm_model("/nonexistent/x.model", &t, err, sizeof err), 0);
    cr_assert_null(t);
    cr_assert_lt(tok_load_llama2c("/nonexistent/x.bin", 512, &t, err, sizeof err), 0);
    for (int k = 0; k < 2; k++) {
        size_t n;
        char *data = tt_read(tt_shared(srcs[k]), &n);
        if (!data)
            cr_skip_test("%s absent", srcs[k]);
        char path[] = "/tmp/tok_bad_XXXXXX";
        int fd = mkstemp(path);
        cr_assert(fd >= 0);
        close(fd);
        uint32_t seed = 12345;
        for (int trial = 0; trial < 300; trial++) {
            size_t cut = trial < 150 ? (n * (size_t)trial) / 150 : n;
            char *m = malloc(n + 1);
            memcpy(m, data, n);
            if (trial >= 150) /* flip a few bytes */
                for (int j = 0; j < 4; j++) {
                    seed = seed * 1664525u + 1013904223u;
                    m[(seed >> 8) % n] ^= (char)(1 + (seed & 0x7F));
                }
            FILE *f = fopen(path, "wb");
            fwrite(m, 1, cut, f);
            fclose(f);
            free(m);
            t = NULL;
            int rc = k == 0 ? tok_load_spm_model(path, &t, err, sizeof err)
                            : tok_load_llama2c(path, 512, &t, err, sizeof err);
            if (rc == 0) { /* a corrupted but parseable file must still work */
                int32_t ids[256];
                int cnt;
                tok_encode(t, "Once upon a time", 16, 1, 1, ids, 256, &cnt);
                char out[512];
                tok_decode(t, ids, cnt < 256 ? cnt : 256, 1, out, sizeof out);
                tok_destroy(t);
            } else {
                cr_assert_null(t);
                cr_assert_gt(strlen(err), 0);
            }
        }
        unlink(path);
        free(data);
    }
}

Test(tok_spm, encode_speed)
{
    tok_tokenizer *t = load_model("models/llama2-tokenizer/tokenizer.model");
    size_t n;
    char *text = tt_read(tt_shared("data/moby-dick.txt"), &n);
    if (!t || !text) {
        free(text);
        tok_destroy(t);
        cr_skip_test("model or moby-dick.txt absent");
    }
    int cnt;
    double t0 = tt_now();
    int32_t *ids = tt_encode(t, text, n, 1, 0, &cnt);
    double dt = tt_now() - t0;
    cr_assert_not_null(ids);
    fprintf(stderr, "SPM (llama2) encode: %.2f MB in %.3f s = %.2f MB/s, %d tokens\n",
            (double)n / 1e6, dt, (double)n / 1e6 / dt, cnt);
    char *back = malloc(n + 16);
    size_t m = tok_decode(t, ids, cnt, 0, back, n + 16);
    cr_assert_eq(m, n);
    cr_assert(memcmp(back, text, n) == 0, "Moby-Dick round trip");
    free(back);
    free(ids);
    free(text);
    tok_destroy(t);
}
