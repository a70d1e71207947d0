/*
 * tok.c - tokenizer construction (tok_create), the text -> id and merge-pair
 * hash maps, accessors, and tok_encode: special tokens are cut out of the
 * text first, then each remaining fragment goes to the SPM or GPT-2 encoder.
 *
 * Threading: tok_create builds the object once; afterwards it is read-only
 * and every function here may be called from any number of threads.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"
#include "tokenizer/unicode.h"

void tok_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* FNV-1a over a byte string. */
static uint32_t hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

/* Smallest power of two >= 2 * n (at least 16). */
static uint32_t table_size(uint32_t n)
{
    uint32_t s = 16;
    while (s < 2u * n)
        s <<= 1;
    return s;
}

int32_t tok_smap_get(const tok_tokenizer *t, const char *s, size_t len)
{
    uint32_t h = hash_bytes(s, len), i = h & t->map.mask;
    for (;;) {
        const tok_smap_slot *sl = &t->map.slots[i];
        if (sl->id < 0)
            return -1;
        if (sl->hash == h) {
            uint32_t tl;
            const char *tx = tok_text(t, sl->id, &tl);
            if (tl == len && memcmp(tx, s, len) == 0)
                return sl->id;
        }
        i = (i + 1) & t->map.mask;
    }
}

/* Inserts id under its text unless that text is already mapped. */
static void smap_put(tok_tokenizer *t, int32_t id)
{
    uint32_t len;
    const char *s = tok_text(t, id, &len);
    uint32_t h = hash_bytes(s, len), i = h & t->map.mask;
    for (;;) {
        tok_smap_slot *sl = &t->map.slots[i];
        if (sl->id < 0) {
            sl->id = id;
            sl->hash = h;
            return;
        }
        uint32_t cl;
        const char *cs = tok_text(t, sl->id, &cl);
        if (sl->hash == h && cl == len && memcmp(cs, s, len) == 0)
            return;
        i = (i + 1) & t->map.mask;
    }
}

int32_t tok_pair_get(const tok_tokenizer *t, int32_t l, int32_t r, int32_t *id)
{
    if (!t->pairs)
        return -1;
    uint64_t key = (((uint64_t)(uint32_t)l << 32) | (uint32_t)r) + 1;
    uint32_t i = tok_hash_u64(key) & t->pair_mask;
    for (;;) {
        const tok_pair_slot *s = &t->pairs[i];
        if (s->key == 0)
            return -1;
        if (s->key == key) {
            *id = s->id;
            return s->rank;
        }
        i = (i + 1) & t->pair_mask;
    }
}

/* Adds merge (l, r) -> id with the given rank; the first rank of a pair wins. */
static void pair_put(tok_tokenizer *t, int32_t l, int32_t r, int32_t rank,
                     int32_t id)
{
    uint64_t key = (((uint64_t)(uint32_t)l << 32) | (uint32_t)r) + 1;
    uint32_t i = tok_hash_u64(key) & t->pair_mask;
    while (t->pairs[i].key != 0) {
        if (t->pairs[i].key == key)
            return;
        i = (i + 1) & t->pair_mask;
    }
    t->pairs[i].key = key;
    t->pairs[i].rank = rank;
    t->pairs[i].id = id;
}

int tok_is_mergeable(const tok_tokenizer *t, int32_t id)
{
    int ty = t->types[id];
    return ty == TOK_TYPE_NORMAL || ty == TOK_TYPE_USER_DEFINED ||
           ty == TOK_TYPE_UNUSED;
}

/* Byte of a byte token: "<0xXX>", or (llama2.c early format) the UTF-8 of
 * code point XX. -1 if the text is neither. */
static int parse_byte_piece(const char *s, uint32_t n)
{
    if (n == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>') {
        int v = 0;
        for (int i = 3; i < 5; i++) {
            char c = s[i];
            int d = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                           : -1;
            if (d < 0)
                return -1;
            v = v * 16 + d;
        }
        return v;
    }
    if (n >= 1 && n <= 2) {
        uint32_t cp;
        int k = uni_decode((const unsigned char *)s, n, &cp);
        if ((uint32_t)k == n && cp < 256)
            return (int)cp;
    }
    return -1;
}

/* Decoded form of token id (what tok_piece gives without render_special),
 * written to out (at most 4 * text length bytes); returns its length. */
static uint32_t make_dec(const tok_tokenizer *t, int32_t id, char *out)
{
    uint32_t n;
    const char *s = tok_text(t, id, &n);
    int ty = t->types[id];
    uint32_t o = 0;
    if (ty == TOK_TYPE_CONTROL)
        return 0;
    if (ty == TOK_TYPE_UNKNOWN) {
        memcpy(out, "\xEF\xBF\xBD", 3);
        return 3;
    }
    if (ty == TOK_TYPE_BYTE && t->byte_val[id] >= 0) {
        out[0] = (char)t->byte_val[id];
        return 1;
    }
    if (t->kind == TOK_SPM) {
        for (uint32_t i = 0; i < n;) {
            if (n - i >= 3 && memcmp(s + i, TOK_SPACE_UTF8, 3) == 0) {
                out[o++] = ' ';
                i += 3;
            } else {
                out[o++] = s[i++];
            }
        }
        return o;
    }
    if (ty == TOK_TYPE_USER_DEFINED) {
        memcpy(out, s, n);
        return n;
    }
    for (uint32_t i = 0; i < n;) { /* GPT-2: un-map byte-level characters */
        uint32_t cp;
        int k = uni_decode((const unsigned char *)s + i, n - i, &cp);
        if (cp < 512 && t->cp_byte[cp] >= 0)
            out[o++] = (char)t->cp_byte[cp];
        else {
            memcpy(out + o, s + i, (size_t)k);
            o += (uint32_t)k;
        }
        i += (uint32_t)k;
    }
    return o;
}

static int cmp_special(const void *a, const void *b, void *ctx)
{
    const tok_tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx, ly;
    const char *sx = tok_text(t, x, &lx), *sy = tok_text(t, y, &ly);
    if ((unsigned char)sx[0] != (unsigned char)sy[0])
        return (unsigned char)sx[0] < (unsigned char)sy[0] ? -1 : 1;
    if (lx != ly)
        return lx > ly ? -1 : 1; /* longest first */
    int c = memcmp(sx, sy, lx);
    return c ? c : (x < y ? -1 : x > y);
}

static tok_pre parse_pre(const char *pre, int *ok)
{
    *ok = 1;
    if (!pre || !strcmp(pre, "gpt2") || !strcmp(pre, "gpt-2") ||
        !strcmp(pre, "default"))
        return TOK_PRE_GPT2;
    if (!strcmp(pre, "smollm"))
        return TOK_PRE_SMOLLM;
    if (!strcmp(pre, "llama-bpe") || !strcmp(pre, "llama3") ||
        !strcmp(pre, "llama-v3"))
        return TOK_PRE_LLAMA3;
    if (!strcmp(pre, "qwen2"))
        return TOK_PRE_QWEN2;
    *ok = 0;
    return TOK_PRE_GPT2;
}

/* Builds the GPT-2 merge map from "left right" strings (rank = index).
 * Merges naming unknown tokens are skipped. */
static int build_merges(tok_tokenizer *t, const tok_desc *d, char *err,
                        size_t errlen)
{
    if (d->n_merges <= 0)
        return 0;
    if (!d->merges) {
        tok_errf(err, errlen, "n_merges=%d but merges is NULL", d->n_merges);
        return -EINVAL;
    }
    uint32_t sz = table_size((uint32_t)d->n_merges);
    t->pairs = calloc(sz, sizeof(*t->pairs));
    char *buf = NULL;
    size_t bufcap = 0;
    if (!t->pairs)
        goto oom;
    t->pair_mask = sz - 1;
    for (int32_t r = 0; r < d->n_merges; r++) {
        const tok_str *m = &d->merges[r];
        if (!m->s && m->len)
            continue;
        const char *sp = m->len ? memchr(m->s, ' ', m->len) : NULL;
        if (!sp) {
            tok_errf(err, errlen, "merge %d has no space separator", r);
            free(buf);
            return -EINVAL;
        }
        size_t ll = (size_t)(sp - m->s), rl = m->len - ll - 1;
        int32_t li = tok_smap_get(t, m->s, ll);
        int32_t ri = tok_smap_get(t, sp + 1, rl);
        if (li < 0 || ri < 0)
            continue;
        if (ll + rl > bufcap) {
            bufcap = 2 * (ll + rl) + 64;
            char *nb = realloc(buf, bufcap);
            if (!nb)
                goto oom;
            buf = nb;
        }
        memcpy(buf, m->s, ll);
        memcpy(buf + ll, sp + 1, rl);
        int32_t id = tok_smap_get(t, buf, ll + rl);
        if (id >= 0)
            pair_put(t, li, ri, r, id);
    }
    free(buf);
    return 0;
oom:
    free(buf);
    tok_errf(err, errlen, "out of memory building merges");
    return -ENOMEM;
}

/* Creates a tokenizer from a vocabulary description (copied; d stays the
 * caller's). On success *out owns everything; free with tok_destroy(). */
int tok_create(const tok_desc *d, tok_tokenizer **out, char *err, size_t errlen)
{
    int rc = -ENOMEM;
    if (!d || !out || (d->kind != TOK_SPM && d->kind != TOK_GPT2) ||
        d->n_vocab <= 0 || d->n_vocab > (1 << 24) || !d->tokens) {
        tok_errf(err, errlen, "invalid tokenizer description");
        return -EINVAL;
    }
    *out = NULL;
    int32_t n = d->n_vocab;
    tok_tokenizer *t = calloc(1, sizeof(*t));
    if (!t)
        goto oom;
    t->kind = d->kind;
    t->n_vocab = n;
    uint64_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        if (!d->tokens[i].s && d->tokens[i].len) {
            tok_errf(err, errlen, "token %d has NULL text", i);
            rc = -EINVAL;
            goto fail;
        }
        total += d->tokens[i].len;
    }
    if (total > UINT32_MAX / 4) {
        tok_errf(err, errlen, "vocabulary text too large");
        rc = -EINVAL;
        goto fail;
    }
    t->text = malloc(total + 1);
    t->text_off = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    t->dec = malloc(4 * total + 4 * (size_t)n + 1);
    t->dec_off = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    t->scores = malloc(sizeof(float) * (size_t)n);
    t->types = malloc(sizeof(int32_t) * (size_t)n);
    t->byte_val = malloc(sizeof(int16_t) * (size_t)n);
    uint32_t msz = table_size((uint32_t)n);
    t->map.slots = malloc(sizeof(tok_smap_slot) * msz);
    if (!t->text || !t->text_off || !t->dec || !t->dec_off || !t->scores ||
        !t->types || !t->byte_val || !t->map.slots)
        goto oom;
    t->map.mask = msz - 1;
    for (uint32_t i = 0; i < msz; i++)
        t->map.slots[i].id = -1;

    uint32_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        t->text_off[i] = off;
        if (d->tokens[i].len)
            memcpy(t->text + off, d->tokens[i].s, d->tokens[i].len);
        off += d->tokens[i].len;
    }
    t->text_off[n] = off;

    t->bos = d->bos_id >= 0 && d->bos_id < n ? d->bos_id : -1;
    t->eos = d->eos_id >= 0 && d->eos_id < n ? d->eos_id : -1;
    t->unk = d->unk_id >= 0 && d->unk_id < n ? d->unk_id : -1;
    t->pad = d->pad_id >= 0 && d->pad_id < n ? d->pad_id : -1;
    t->add_bos = d->add_bos && t->bos >= 0;
    t->add_eos = d->add_eos && t->eos >= 0;
    t->add_space_prefix = d->kind == TOK_SPM && d->add_space_prefix;

    for (int32_t i = 0; i < n; i++) {
        uint32_t len;
        const char *s = tok_text(t, i, &len);
        int ty = d->types ? d->types[i] : 0;
        if (ty < TOK_TYPE_NORMAL || ty > TOK_TYPE_BYTE) {
            /* absent or unknown type: infer what we can */
            ty = TOK_TYPE_NORMAL;
            if (!d->types) {
                if (i == t->unk)
                    ty = TOK_TYPE_UNKNOWN;
                else if (i == t->bos || i == t->eos)
                    ty = TOK_TYPE_CONTROL;
                else if (d->kind == TOK_SPM && len == 6 &&
                         parse_byte_piece(s, len) >= 0)
                    ty = TOK_TYPE_BYTE;
            }
        }
        t->types[i] = ty;
        t->scores[i] = d->scores ? d->scores[i] : -(float)i;
        t->byte_val[i] = (int16_t)(ty == TOK_TYPE_BYTE ? parse_byte_piece(s, len) : -1);
    }

    /* text -> id; on duplicate texts merge candidates win, then control /
     * unknown, then byte tokens */
    for (int pass = 0; pass < 3; pass++)
        for (int32_t i = 0; i < n; i++) {
            int ty = t->types[i];
            int p = tok_is_mergeable(t, i) ? 0 : ty == TOK_TYPE_BYTE ? 2 : 1;
            if (p == pass)
                smap_put(t, i);
        }

    for (int b = 0; b < 256; b++)
        t->byte_id[b] = -1;
    if (d->kind == TOK_SPM) {
        for (int32_t i = n - 1; i >= 0; i--)
            if (t->byte_val[i] >= 0)
                t->byte_id[t->byte_val[i]] = i;
        if (tok_spm_build_bigrams(t) < 0)
            goto oom;
    } else {
        int ok;
        t->pre = parse_pre(d->pre, &ok);
        if (!ok) {
            tok_errf(err, errlen, "unsupported pre-tokenizer '%s'", d->pre);
            rc = -EINVAL;
            goto fail;
        }
        tok_gpt2_init_bytes(t);
        for (int b = 0; b < 256; b++) {
            char u[4];
            int k = uni_encode(t->byte_cp[b], u);
            int32_t id = tok_smap_get(t, u, (size_t)k);
            t->byte_id[b] = id >= 0 && tok_is_mergeable(t, id) ? id : -1;
        }
        rc = build_merges(t, d, err, errlen);
        if (rc < 0)
            goto fail;
    }

    uint32_t doff = 0;
    for (int32_t i = 0; i < n; i++) {
        t->dec_off[i] = doff;
        doff += make_dec(t, i, t->dec + doff);
    }
    t->dec_off[n] = doff;

    /* tokens cut out of the text before the encoders run */
    t->special = malloc(sizeof(int32_t) * (size_t)n);
    if (!t->special)
        goto oom;
    for (int32_t i = 0; i < n; i++) {
        int ty = t->types[i];
        uint32_t len = t->text_off[i + 1] - t->text_off[i];
        if (len == 0)
            continue;
        if (ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNKNOWN ||
            (ty == TOK_TYPE_USER_DEFINED && d->kind == TOK_GPT2))
            t->special[t->n_special++] = i;
        if (ty == TOK_TYPE_USER_DEFINED && d->kind == TOK_SPM) {
            t->n_user++;
            if (len > t->max_user_len)
                t->max_user_len = len;
        }
    }
    qsort_r(t->special, (size_t)t->n_special, sizeof(int32_t), cmp_special, t);
    for (int k = 0, b = 0; b <= 256; b++) {
        while (k < t->n_special && (unsigned char)t->text[t->text_off[t->special[k]]] < b)
            k++;
        t->special_start[b] = k;
    }

    static const char *const eog_names[] = {
        "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>",
        "<end_of_turn>", "<|end|>", "<|eom_id|>"};
    if (t->eos >= 0)
        t->eog[t->n_eog++] = t->eos;
    for (size_t k = 0; k < sizeof(eog_names) / sizeof(eog_names[0]); k++) {
        int32_t id = tok_find(t, eog_names[k]);
        if (id >= 0 && id != t->eos && t->n_eog < 8 &&
            t->types[id] != TOK_TYPE_NORMAL)
            t->eog[t->n_eog++] = id;
    }
    *out = t;
    return 0;
oom:
    tok_errf(err, errlen, "out of memory creating tokenizer");
    rc = -ENOMEM;
fail:
    tok_destroy(t);
    return rc;
}

void tok_destroy(tok_tokenizer *t)
{
    if (!t)
        return;
    free(t->text);
    free(t->text_off);
    free(t->dec);
    free(t->dec_off);
    free(t->scores);
    free(t->types);
    free(t->byte_val);
    free(t->map.slots);
    free(t->special);
    free(t->pairs);
    free(t->bigrams);
    free(t);
}

tok_kind tok_get_kind(const tok_tokenizer *t) { return t->kind; }
int32_t tok_n_vocab(const tok_tokenizer *t) { return t->n_vocab; }
int32_t tok_bos(const tok_tokenizer *t) { return t->bos; }
int32_t tok_eos(const tok_tokenizer *t) { return t->eos; }
int tok_default_add_bos(const tok_tokenizer *t) { return t->add_bos; }

int tok_is_eog(const tok_tokenizer *t, int32_t id)
{
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return 1;
    return 0;
}

int32_t tok_find(const tok_tokenizer *t, const char *s)
{
    if (!t || !s)
        return -1;
    return tok_smap_get(t, s, strlen(s));
}

/* Id of the special token spelled at text[pos..len) (longest wins), or -1.
 * Only the bucket of specials starting with the byte at pos is tried. */
static int32_t match_special(const tok_tokenizer *t, const char *text,
                             size_t pos, size_t len, int parse_special)
{
    unsigned char b = (unsigned char)text[pos];
    for (int k = t->special_start[b]; k < t->special_start[b + 1]; k++) {
        int32_t id = t->special[k];
        if (!parse_special && t->types[id] != TOK_TYPE_USER_DEFINED)
            continue;
        uint32_t sl;
        const char *s = tok_text(t, id, &sl);
        if (sl <= len - pos && memcmp(s, text + pos, sl) == 0)
            return id;
    }
    return -1;
}

static int encode_fragment(const tok_tokenizer *t, const char *s, size_t n,
                           tok_sink *sink)
{
    if (n == 0)
        return 0;
    return t->kind == TOK_SPM ? tok_spm_encode(t, s, n, sink)
                              : tok_gpt2_encode(t, s, n, sink);
}

/* See tok.h. Special tokens are found by a scan that, at each byte, tries
 * the eligible special texts starting with that byte, longest first. */
int tok_encode(const tok_tokenizer *t, const char *text, size_t len,
               int add_bos, int parse_special, int32_t *out, int cap,
               int *n_out)
{
    if (n_out)
        *n_out = 0;
    if (!t || (!text && len) || !n_out || cap < 0 || (!out && cap > 0))
        return -EINVAL;
    if (len > (size_t)INT32_MAX / 4)
        return -EOVERFLOW;
    tok_sink sink = {out, cap, 0};
    if (add_bos && t->bos >= 0)
        tok_emit(&sink, t->bos);
    int any_special = t->n_special > 0 && (parse_special || t->kind == TOK_GPT2);
    size_t frag = 0;
    if (any_special) {
        for (size_t pos = 0; pos < len;) {
            int32_t id = match_special(t, text, pos, len, parse_special);
            if (id < 0) {
                pos++;
                continue;
            }
            int rc = encode_fragment(t, text + frag, pos - frag, &sink);
            if (rc < 0)
                return rc;
            tok_emit(&sink, id);
            pos += t->text_off[id + 1] - t->text_off[id];
            frag = pos;
        }
    }
    int rc = encode_fragment(t, text ? text + frag : text, len - frag, &sink);
    if (rc < 0)
        return rc;
    if (add_bos && t->add_eos)
        tok_emit(&sink, t->eos);
    *n_out = sink.n;
    return sink.n > cap ? -ENOSPC : 0;
}
