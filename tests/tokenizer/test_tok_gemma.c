/*
 * test_tok_gemma.c - the Gemma-3 tokenizer (SentencePiece BPE from GGUF
 * metadata: 262,144 pieces, no dummy space prefix, byte fallback) against
 * Debian's libsentencepiece.
 *
 * The GGUF carries the vocabulary (pieces, scores, types) but no
 * tokenizer.model, so the test writes one: a SentencePiece ModelProto
 * (protobuf, written here field by field) with the same pieces, scores and
 * types, model_type BPE, byte_fallback, and a normalizer that does what
 * the GGUF says (identity, no dummy prefix, whitespace escaped to U+2581,
 * extra spaces kept). libsentencepiece (through the test-only program
 * spm_ref) then encodes the varied test lines and Moby-Dick paragraphs, and
 * tok_encode must give the same ids. The model file is
 * $LKQ_GEMMA, else ~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf (fetched by
 * scripts/setup.sh); the test skips without it.
 * Single-threaded test code.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/tokenizer/tok_test_util.h"

static const char *gemma_path(void)
{
    static char buf[4096];
    const char *e = getenv("LKQ_GEMMA");
    if (e && *e)
        return tt_exists(e) ? e : NULL;
    const char *models = getenv("LKQ_MODELS");
    if (models) {
        snprintf(buf, sizeof buf, "%s/gemma-3-270m-q4_k_m.gguf", models);
        if (tt_exists(buf))
            return buf;
    }
    const char *home = getenv("HOME");
    snprintf(buf, sizeof buf, "%s/.cache/livekvq/gemma-3-270m-q4_k_m.gguf", home ? home : "");
    return tt_exists(buf) ? buf : NULL;
}

/* ---- a minimal protobuf writer -------------------------------------------------- */

typedef struct {
    unsigned char *p;
    size_t n, cap;
} pb_buf;

static void pb_put(pb_buf *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        cr_assert_not_null(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void pb_varint(pb_buf *b, uint64_t v)
{
    unsigned char c[10];
    int k = 0;
    do {
        c[k] = (unsigned char)(v & 0x7f);
        v >>= 7;
        if (v)
            c[k] |= 0x80;
        k++;
    } while (v);
    pb_put(b, c, (size_t)k);
}

static void pb_key(pb_buf *b, int field, int wire)
{
    pb_varint(b, (uint64_t)field << 3 | (uint64_t)wire);
}

static void pb_int(pb_buf *b, int field, int64_t v) /* int32 fields: negative as 10 bytes */
{
    pb_key(b, field, 0);
    pb_varint(b, (uint64_t)v);
}

static void pb_bytes(pb_buf *b, int field, const void *s, size_t n)
{
    pb_key(b, field, 2);
    pb_varint(b, n);
    pb_put(b, s, n);
}

static void pb_float(pb_buf *b, int field, float f)
{
    pb_key(b, field, 5);
    pb_put(b, &f, 4); /* little-endian host */
}

/* The ModelProto of the GGUF vocabulary (see the file comment). */
static void write_model(const tt_vocab *v, const char *path)
{
    pb_buf m = {0}, piece = {0}, sub = {0};
    for (int32_t i = 0; i < v->d.n_vocab; i++) {
        piece.n = 0;
        pb_bytes(&piece, 1, v->tokens[i].s, v->tokens[i].len);
        pb_float(&piece, 2, v->scores ? v->scores[i] : 0.0f);
        /* the GGUF marks <unk> CONTROL; SentencePiece wants it UNKNOWN */
        pb_int(&piece, 3, i == v->d.unk_id ? 2 : v->types ? v->types[i] : 1);
        pb_bytes(&m, 1, piece.p, piece.n);
    }
    /* trainer_spec: BPE, byte fallback, the special ids */
    sub.n = 0;
    pb_int(&sub, 3, 2);
    pb_int(&sub, 35, 1);
    pb_int(&sub, 40, v->d.unk_id);
    pb_int(&sub, 41, v->d.bos_id);
    pb_int(&sub, 42, v->d.eos_id);
    pb_int(&sub, 43, v->d.pad_id);
    pb_bytes(&m, 2, sub.p, sub.n);
    /* normalizer_spec: identity, no dummy prefix, keep extra spaces, escape */
    sub.n = 0;
    pb_bytes(&sub, 1, "identity", 8);
    pb_int(&sub, 3, v->d.add_space_prefix);
    pb_int(&sub, 4, 0);
    pb_int(&sub, 5, 1);
    pb_bytes(&m, 3, sub.p, sub.n);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(m.p, 1, m.n, f), m.n);
    cr_assert_eq(fclose(f), 0);
    free(m.p);
    free(piece.p);
    free(sub.p);
}

static void print_ids(const char *what, const int32_t *ids, int n)
{
    fprintf(stderr, "  %s:", what);
    for (int i = 0; i < n && i < 40; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

/* Appends Moby-Dick's first paragraphs (real prose, long lines). */
static void add_moby(tt_lines *l, int max_lines)
{
    size_t n;
    char *txt = tt_read(tt_shared("data/moby-dick.txt"), &n);
    if (!txt)
        return;
    char *p = txt, *end = txt + n;
    for (int k = 0; k < max_lines && p < end; k++) {
        char *q = p;
        while (q < end && *q != '\n')
            q++;
        if (q > p)
            tt_add(l, p, (size_t)(q - p));
        p = q + 1;
    }
    free(txt);
}

Test(tok_gemma, matches_sentencepiece, .timeout = 300)
{
#ifndef SPM_REF_PATH
    cr_skip_test("spm_ref (libsentencepiece) not built");
#else
    const char *path = gemma_path();
    if (!path)
        cr_skip_test("Gemma-3 GGUF absent (scripts/setup.sh fetches it)");
    tt_vocab v;
    cr_assert_eq(tt_load_gguf_vocab(path, &v), 0, "cannot read %s", path);
    cr_assert_eq(v.d.n_vocab, 262144);
    cr_assert_eq(v.d.kind, TOK_SPM);
    cr_assert_eq(v.d.add_space_prefix, 0, "Gemma's GGUF says add_space_prefix false");
    tok_tokenizer *t = NULL;
    char err[256];
    cr_assert_eq(tok_create(&v.d, &t, err, sizeof err), 0, "%s", err);

    char model[] = "/tmp/tok_gemma_model_XXXXXX", in[] = "/tmp/tok_gemma_in_XXXXXX",
         outp[] = "/tmp/tok_gemma_out_XXXXXX";
    int fm = mkstemp(model), fi = mkstemp(in), fo = mkstemp(outp);
    cr_assert(fm >= 0 && fi >= 0 && fo >= 0);
    close(fm);
    close(fo);
    write_model(&v, model);

    tt_lines l = {0};
    tt_make_lines(&l);
    add_moby(&l, 400);
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
    snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' '%s'", SPM_REF_PATH, model, in, outp);
    cr_assert_eq(system(cmd), 0, "spm_ref failed: %s", cmd);
    size_t n;
    char *ref = tt_read(outp, &n);
    cr_assert_not_null(ref);
    char *p = ref;
    int bad = 0, total = 0;
    int32_t *want = malloc(sizeof(int32_t) * 65536);
    for (int i = 0; i < l.n; i++) {
        int nw = 0;
        while (*p && *p != '\n') {
            cr_assert_lt(nw, 65536);
            want[nw++] = (int32_t)strtol(p, &p, 10);
            while (*p == ' ')
                p++;
        }
        cr_assert_eq(*p, '\n', "reference output ends early at line %d", i);
        p++;
        int ng;
        int32_t *got = tt_encode(t, l.s[i], l.len[i], 0, 0, &ng);
        cr_assert_not_null(got);
        total += ng;
        if (ng != nw || memcmp(got, want, sizeof(int32_t) * (size_t)nw) != 0) {
            if (bad++ < 5) {
                fprintf(stderr, "gemma3: mismatch on line %d: \"%.*s\"\n", i,
                        (int)(l.len[i] < 200 ? l.len[i] : 200), l.s[i]);
                print_ids("want", want, nw);
                print_ids("got ", got, ng);
            }
        }
        free(got);
    }
    fprintf(stderr, "gemma3: %d lines, %d ids, %d mismatches\n", l.n, total, bad);
    cr_expect_eq(bad, 0, "%d of %d lines differ from libsentencepiece", bad, l.n);
    free(want);
    free(ref);
    unlink(model);
    unlink(in);
    unlink(outp);
    tt_lines_free(&l);
    tok_destroy(t);
    tt_vocab_free(&v);
#endif
}

/* The chat markup pieces are single control tokens when special tokens
 * are parsed, and plain text (several pieces) when they are not. */
Test(tok_gemma, turn_markers)
{
    const char *path = gemma_path();
    if (!path)
        cr_skip_test("Gemma-3 GGUF absent (scripts/setup.sh fetches it)");
    tt_vocab v;
    cr_assert_eq(tt_load_gguf_vocab(path, &v), 0);
    tok_tokenizer *t = NULL;
    char err[256];
    cr_assert_eq(tok_create(&v.d, &t, err, sizeof err), 0, "%s", err);
    const char *s = "<start_of_turn>user\nHi<end_of_turn>\n";
    int n1, n2;
    int32_t *a = tt_encode(t, s, strlen(s), 1, 1, &n1);
    int32_t *b = tt_encode(t, s, strlen(s), 1, 0, &n2);
    cr_assert_not_null(a);
    cr_assert_not_null(b);
    cr_assert_eq(a[0], 2, "BOS is id 2");
    int32_t sot = -1, eot = -1;
    for (int32_t i = 0; i < v.d.n_vocab; i++) {
        if (v.tokens[i].len == 15 && !memcmp(v.tokens[i].s, "<start_of_turn>", 15))
            sot = i;
        if (v.tokens[i].len == 13 && !memcmp(v.tokens[i].s, "<end_of_turn>", 13))
            eot = i;
    }
    cr_assert(sot >= 0 && eot >= 0);
    cr_assert_eq(a[1], sot, "parsed: <start_of_turn> is one token");
    int seen_eot = 0;
    for (int i = 0; i < n1; i++)
        seen_eot |= a[i] == eot;
    cr_assert(seen_eot);
    for (int i = 0; i < n2; i++)
        cr_assert(b[i] != sot && b[i] != eot, "unparsed markup must stay text");
    cr_assert_gt(n2, n1);
    free(a);
    free(b);
    tok_destroy(t);
    tt_vocab_free(&v);
}
