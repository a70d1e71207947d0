/*
 * tok_load.c - SentencePiece vocabularies from files:
 *   tok_load_spm_model: a SentencePiece ModelProto (tokenizer.model), read
 *     with a small bounds-checked protobuf wire-format reader (varints,
 *     fixed32, length-delimited fields; groups are rejected). Read: pieces
 *     (piece, score, type), trainer_spec (model_type, byte_fallback,
 *     treat_whitespace_as_suffix, unk/bos/eos/pad ids), normalizer_spec
 *     (name, precompiled_charsmap, add_dummy_prefix,
 *     remove_extra_whitespaces, escape_whitespaces).
 *   tok_load_llama2c: llama2.c tokenizer.bin (int32 max_token_length, then
 *     per token float32 score, int32 length, bytes), in both byte-piece
 *     conventions (early: ids 3..258 hold the UTF-8 of code point b; later:
 *     "<0xXX>"); its spaces are written as ' ' and BOS/EOS as "\n<s>\n" /
 *     "\n</s>\n", which are turned back into U+2581, "<s>", "</s>".
 * Limitation: a non-empty precompiled_charsmap (e.g. nmt_nfkc rules) is not
 * applied; the text is encoded as if the rule set were "identity".
 *
 * Threading: reentrant.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"
#include "tokenizer/unicode.h"

#define TOK_MAX_FILE (512u << 20)

/* Reads a whole file (at most TOK_MAX_FILE bytes); caller frees *buf. */
static int read_file(const char *path, unsigned char **buf, size_t *n,
                     char *err, size_t errlen)
{
    *buf = NULL;
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (!f) {
        tok_errf(err, errlen, "cannot open '%s': %s", path ? path : "(null)",
                 strerror(errno));
        return -EIO;
    }
    size_t cap = 1 << 16, len = 0;
    unsigned char *b = malloc(cap);
    while (b) {
        if (len == cap) {
            if (cap >= TOK_MAX_FILE) {
                fclose(f);
                free(b);
                tok_errf(err, errlen, "'%s' is too large", path);
                return -EFBIG;
            }
            unsigned char *nb = realloc(b, cap * 2);
            if (!nb) {
                free(b);
                b = NULL;
                break;
            }
            b = nb;
            cap *= 2;
        }
        size_t r = fread(b + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (!b) {
        tok_errf(err, errlen, "out of memory reading '%s'", path);
        return -ENOMEM;
    }
    if (bad) {
        free(b);
        tok_errf(err, errlen, "read error on '%s'", path);
        return -EIO;
    }
    *buf = b;
    *n = len;
    return 0;
}

/* ---- protobuf wire format ---- */

typedef struct {
    const unsigned char *p, *end;
} pb_buf;

static int pb_varint(pb_buf *b, uint64_t *v)
{
    uint64_t r = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (b->p >= b->end)
            return -1;
        unsigned char c = *b->p++;
        r |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) {
            *v = r;
            return 0;
        }
    }
    return -1; /* more than 10 bytes */
}

/* Next field: number, wire type, and for wire type 2 the payload. */
typedef struct {
    uint32_t field;
    int wt;
    uint64_t v;       /* wt 0 and 5 (fixed32 bits) */
    pb_buf sub;       /* wt 2 */
} pb_field;

static int pb_next(pb_buf *b, pb_field *f)
{
    uint64_t key;
    if (pb_varint(b, &key) < 0)
        return -1;
    memset(f, 0, sizeof(*f));
    f->field = (uint32_t)(key >> 3);
    f->wt = (int)(key & 7);
    switch (f->wt) {
    case 0:
        return pb_varint(b, &f->v);
    case 1:
        if (b->end - b->p < 8)
            return -1;
        b->p += 8;
        return 0;
    case 2: {
        uint64_t n;
        if (pb_varint(b, &n) < 0 || n > (uint64_t)(b->end - b->p))
            return -1;
        f->sub.p = b->p;
        f->sub.end = b->p + n;
        b->p += n;
        return 0;
    }
    case 5:
        if (b->end - b->p < 4)
            return -1;
        f->v = (uint64_t)b->p[0] | (uint64_t)b->p[1] << 8 |
               (uint64_t)b->p[2] << 16 | (uint64_t)b->p[3] << 24;
        b->p += 4;
        return 0;
    default:
        return -1; /* groups (3, 4) and reserved types */
    }
}

static float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef struct {
    tok_str *tokens;
    float *scores;
    int32_t *types;
    int32_t n, cap;
} piece_list;

static int pieces_push(piece_list *l, tok_str s, float score, int32_t type)
{
    if (l->n == l->cap) {
        int32_t nc = l->cap ? 2 * l->cap : 1024;
        if (nc > (1 << 24))
            return -1;
        tok_str *t = realloc(l->tokens, sizeof(*t) * (size_t)nc);
        if (t)
            l->tokens = t;
        float *s2 = realloc(l->scores, sizeof(float) * (size_t)nc);
        if (s2)
            l->scores = s2;
        int32_t *y = realloc(l->types, sizeof(int32_t) * (size_t)nc);
        if (y)
            l->types = y;
        if (!t || !s2 || !y)
            return -1;
        l->cap = nc;
    }
    l->tokens[l->n] = s;
    l->scores[l->n] = score;
    l->types[l->n] = type;
    l->n++;
    return 0;
}

static void pieces_free(piece_list *l)
{
    free(l->tokens);
    free(l->scores);
    free(l->types);
}

static int parse_piece(pb_buf b, piece_list *l)
{
    tok_str s = {"", 0};
    float score = 0;
    int32_t type = TOK_TYPE_NORMAL;
    pb_field f;
    while (b.p < b.end) {
        if (pb_next(&b, &f) < 0)
            return -1;
        if (f.field == 1 && f.wt == 2) {
            s.s = (const char *)f.sub.p;
            s.len = (uint32_t)(f.sub.end - f.sub.p);
        } else if (f.field == 2 && f.wt == 5) {
            score = bits_to_float((uint32_t)f.v);
        } else if (f.field == 3 && f.wt == 0) {
            type = f.v >= 1 && f.v <= 6 ? (int32_t)f.v : TOK_TYPE_NORMAL;
        }
    }
    return pieces_push(l, s, score, type);
}

typedef struct {
    int64_t model_type, byte_fallback, ws_suffix, escape_ws;
    int64_t add_dummy_prefix, remove_extra_ws;
    int64_t unk_id, bos_id, eos_id, pad_id;
    size_t charsmap_len;
} spm_spec;

/* Opens a SentencePiece ModelProto; see the file comment. */
int tok_load_spm_model(const char *path, tok_tokenizer **out, char *err,
                       size_t errlen)
{
    unsigned char *data;
    size_t n;
    if (out)
        *out = NULL;
    if (!out)
        return -EINVAL;
    int rc = read_file(path, &data, &n, err, errlen);
    if (rc < 0)
        return rc;
    piece_list l = {0};
    spm_spec sp = {.model_type = 1, .escape_ws = 1, .add_dummy_prefix = 1,
                   .remove_extra_ws = 1, .unk_id = 0, .bos_id = 1,
                   .eos_id = 2, .pad_id = -1};
    pb_buf b = {data, data + n};
    pb_field f;
    while (b.p < b.end) {
        if (pb_next(&b, &f) < 0)
            goto bad;
        if (f.field == 1 && f.wt == 2) {
            if (parse_piece(f.sub, &l) < 0)
                goto bad;
        } else if ((f.field == 2 || f.field == 3) && f.wt == 2) {
            pb_buf s = f.sub;
            pb_field g;
            while (s.p < s.end) {
                if (pb_next(&s, &g) < 0)
                    goto bad;
                int64_t v = (int64_t)g.v;
                if (f.field == 2 && g.wt == 0) { /* TrainerSpec */
                    switch (g.field) {
                    case 3: sp.model_type = v; break;
                    case 24: sp.ws_suffix = v; break;
                    case 35: sp.byte_fallback = v; break;
                    case 40: sp.unk_id = (int32_t)v; break;
                    case 41: sp.bos_id = (int32_t)v; break;
                    case 42: sp.eos_id = (int32_t)v; break;
                    case 43: sp.pad_id = (int32_t)v; break;
                    default: break;
                    }
                } else if (f.field == 3) { /* NormalizerSpec */
                    if (g.field == 2 && g.wt == 2)
                        sp.charsmap_len = (size_t)(g.sub.end - g.sub.p);
                    else if (g.wt == 0 && g.field == 3)
                        sp.add_dummy_prefix = v;
                    else if (g.wt == 0 && g.field == 4)
                        sp.remove_extra_ws = v;
                    else if (g.wt == 0 && g.field == 5)
                        sp.escape_ws = v;
                }
            }
        }
    }
    if (l.n == 0) {
        tok_errf(err, errlen, "'%s': no pieces in SentencePiece model", path);
        rc = -EINVAL;
        goto done;
    }
    if (sp.model_type != 2) {
        tok_errf(err, errlen, "'%s': SentencePiece model type %lld is not BPE",
                 path, (long long)sp.model_type);
        rc = -ENOTSUP;
        goto done;
    }
    if (sp.ws_suffix || !sp.escape_ws) {
        tok_errf(err, errlen, "'%s': treat_whitespace_as_suffix / no "
                 "escape_whitespaces are not supported", path);
        rc = -ENOTSUP;
        goto done;
    }
    if (!sp.byte_fallback) /* byte pieces then never stand in for text */
        for (int32_t i = 0; i < l.n; i++)
            if (l.types[i] == TOK_TYPE_BYTE)
                l.types[i] = TOK_TYPE_UNUSED;
    tok_desc d = {
        .kind = TOK_SPM, .n_vocab = l.n, .tokens = l.tokens,
        .scores = l.scores, .types = l.types,
        .bos_id = sp.bos_id, .eos_id = sp.eos_id, .unk_id = sp.unk_id,
        .pad_id = sp.pad_id, .add_bos = 1,
        .add_space_prefix = (int)sp.add_dummy_prefix,
    };
    rc = tok_create(&d, out, err, errlen);
    if (rc == 0)
        (*out)->remove_extra_ws = sp.remove_extra_ws != 0;
    goto done;
bad:
    tok_errf(err, errlen, "'%s': malformed SentencePiece protobuf", path);
    rc = -EINVAL;
done:
    pieces_free(&l);
    free(data);
    return rc;
}

/* Little-endian int32 at p. */
static int32_t rd_i32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                 (uint32_t)p[3] << 24;
    int32_t v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Opens a llama2.c tokenizer.bin with n_vocab tokens (n_vocab <= 0: as many
 * as the file holds). See the file comment for the conventions undone. */
int tok_load_llama2c(const char *path, int32_t n_vocab, tok_tokenizer **out,
                     char *err, size_t errlen)
{
    unsigned char *data;
    size_t n;
    if (out)
        *out = NULL;
    if (!out)
        return -EINVAL;
    int rc = read_file(path, &data, &n, err, errlen);
    if (rc < 0)
        return rc;
    piece_list l = {0};
    char *arena = NULL;
    size_t pos = 4;
    if (n < 4)
        goto bad;
    while ((n_vocab <= 0 && pos < n) || (n_vocab > 0 && l.n < n_vocab)) {
        if (n - pos < 8)
            goto bad;
        uint32_t sbits = (uint32_t)rd_i32(data + pos);
        int32_t len = rd_i32(data + pos + 4);
        pos += 8;
        if (len < 0 || (size_t)len > n - pos)
            goto bad;
        tok_str s = {(const char *)data + pos, (uint32_t)len};
        if (pieces_push(&l, s, bits_to_float(sbits), TOK_TYPE_NORMAL) < 0) {
            rc = -ENOMEM;
            tok_errf(err, errlen, "out of memory");
            goto done;
        }
        pos += (size_t)len;
    }
    if (l.n < 3)
        goto bad;

    /* byte pieces: "<0xXX>" (later format) or code point b (early format) */
    int fmt = 0;
    if (l.n >= 259) {
        int hex = 1, early = 1;
        for (int b = 0; b < 256; b++) {
            char want[8];
            snprintf(want, sizeof want, "<0x%02X>", b);
            const tok_str *s = &l.tokens[3 + b];
            hex &= s->len == 6 && memcmp(s->s, want, 6) == 0;
            uint32_t cp;
            early &= s->len >= 1 &&
                     (uint32_t)uni_decode((const unsigned char *)s->s, s->len, &cp) == s->len &&
                     cp == (uint32_t)b;
        }
        fmt = hex ? 1 : early ? 2 : 0;
    }

    /* rewritten texts: ' ' -> U+2581 (3 bytes), bytes as "<0xXX>" */
    size_t total = 0;
    for (int32_t i = 0; i < l.n; i++)
        total += 3 * (size_t)l.tokens[i].len + 8;
    arena = malloc(total);
    if (!arena) {
        rc = -ENOMEM;
        tok_errf(err, errlen, "out of memory");
        goto done;
    }
    size_t o = 0;
    for (int32_t i = 0; i < l.n; i++) {
        tok_str *s = &l.tokens[i];
        char *dst = arena + o;
        size_t k = 0;
        if (fmt && i >= 3 && i < 259) {
            k = (size_t)snprintf(dst, 8, "<0x%02X>", i - 3);
            l.types[i] = TOK_TYPE_BYTE;
        } else if (i == 1 || i == 2) { /* "\n<s>\n" -> "<s>" */
            const char *p = s->s;
            uint32_t len = s->len;
            while (len && p[0] == '\n')
                p++, len--;
            while (len && p[len - 1] == '\n')
                len--;
            memcpy(dst, p, len);
            k = len;
            l.types[i] = TOK_TYPE_CONTROL;
        } else {
            for (uint32_t j = 0; j < s->len; j++) {
                if (s->s[j] == ' ') {
                    memcpy(dst + k, TOK_SPACE_UTF8, 3);
                    k += 3;
                } else {
                    dst[k++] = s->s[j];
                }
            }
            if (i == 0)
                l.types[i] = TOK_TYPE_UNKNOWN;
        }
        s->s = dst;
        s->len = (uint32_t)k;
        o += k;
    }
    tok_desc d = {
        .kind = TOK_SPM, .n_vocab = l.n, .tokens = l.tokens,
        .scores = l.scores, .types = l.types, .bos_id = 1, .eos_id = 2,
        .unk_id = 0, .pad_id = -1, .add_bos = 1, .add_space_prefix = 1,
    };
    rc = tok_create(&d, out, err, errlen);
    goto done;
bad:
    tok_errf(err, errlen, "'%s': truncated or malformed llama2.c tokenizer", path);
    rc = -EINVAL;
done:
    pieces_free(&l);
    free(arena);
    free(data);
    return rc;
}
