/*
 * tok_decode.c - from ids back to text: tok_piece (one token's bytes), the
 * streaming tok_decoder (valid UTF-8 out, incomplete characters held back
 * across tokens, invalid sequences replaced by U+FFFD as in the Unicode
 * "maximal subpart" practice, i.e. like Python's errors="replace") and
 * tok_decode over a whole sequence.
 *
 * Threading: tok_piece / tok_decode are reentrant; a tok_decoder belongs to
 * one stream and must not be shared between threads without a lock.
 */
#include <string.h>

#include "tokenizer/tok_internal.h"
#include "tokenizer/unicode.h"

#define REPL "\xEF\xBF\xBD"

/* Bytes of token id as tok_piece gives them (borrowed from t). */
static const char *piece_ref(const tok_tokenizer *t, int32_t id,
                             int render_special, uint32_t *len)
{
    int ty = t->types[id];
    if (render_special && (ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNKNOWN))
        return tok_text(t, id, len);
    *len = t->dec_off[id + 1] - t->dec_off[id];
    return t->dec + t->dec_off[id];
}

int tok_piece(const tok_tokenizer *t, int32_t id, int render_special,
              char *buf, size_t cap)
{
    if (!t || id < 0 || id >= t->n_vocab)
        return -1;
    uint32_t len;
    const char *p = piece_ref(t, id, render_special, &len);
    if (buf)
        memcpy(buf, p, len < cap ? len : cap);
    return (int)len;
}

/* Output cursor: writes while room is left for a NUL, counts everything. */
typedef struct {
    char *p;
    size_t cap, len;
} dec_out;

static void put(dec_out *o, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++, o->len++)
        if (o->cap > 0 && o->len < o->cap - 1)
            o->p[o->len] = s[i];
}

/* Whether b may follow the bytes already pending (n >= 1) in a valid
 * sequence: the second byte has narrower ranges after E0, ED, F0, F4. */
static int continues(const unsigned char *pend, int n, unsigned char b)
{
    if ((b & 0xC0) != 0x80)
        return 0;
    if (n == 1) {
        switch (pend[0]) {
        case 0xE0: return b >= 0xA0;
        case 0xED: return b <= 0x9F;
        case 0xF0: return b >= 0x90;
        case 0xF4: return b <= 0x8F;
        default: return 1;
        }
    }
    return 1;
}

static void feed_byte(tok_decoder *d, unsigned char b, dec_out *o)
{
    if (d->n_pending > 0) {
        if (continues(d->pending, d->n_pending, b)) {
            d->pending[d->n_pending++] = b;
            if (d->n_pending == uni_seq_len(d->pending[0])) {
                put(o, (const char *)d->pending, (size_t)d->n_pending);
                d->n_pending = 0;
            }
            return;
        }
        put(o, REPL, 3); /* truncated sequence: one U+FFFD, then b afresh */
        d->n_pending = 0;
    }
    int l = uni_seq_len(b);
    if (l == 1)
        put(o, (const char *)&b, 1);
    else if (l == 0)
        put(o, REPL, 3);
    else
        d->pending[d->n_pending++] = b;
}

void tok_decoder_init(tok_decoder *d, const tok_tokenizer *t, int render_special)
{
    memset(d, 0, sizeof(*d));
    d->t = t;
    d->first = 1;
    d->render_special = render_special;
}

/* Feeds one id; invalid ids produce nothing. */
static void feed_id(tok_decoder *d, int32_t id, dec_out *o)
{
    const tok_tokenizer *t = d->t;
    if (!t || id < 0 || id >= t->n_vocab)
        return;
    uint32_t len;
    const char *p = piece_ref(t, id, d->render_special, &len);
    if (len == 0)
        return;
    if (d->first) {
        d->first = 0;
        /* SentencePiece's dummy prefix: the first word's space is not text */
        if (t->add_space_prefix && p[0] == ' ' && t->types[id] != TOK_TYPE_BYTE &&
            t->types[id] != TOK_TYPE_CONTROL) {
            p++;
            len--;
        }
    }
    for (uint32_t i = 0; i < len; i++)
        feed_byte(d, (unsigned char)p[i], o);
}

static size_t finish(dec_out *o)
{
    size_t w = o->cap == 0 ? 0 : o->len < o->cap - 1 ? o->len : o->cap - 1;
    if (o->cap > 0)
        o->p[w] = '\0';
    return w;
}

size_t tok_decoder_push(tok_decoder *d, int32_t id, char *out, size_t cap)
{
    dec_out o = {out, out ? cap : 0, 0};
    feed_id(d, id, &o);
    return finish(&o);
}

size_t tok_decoder_flush(tok_decoder *d, char *out, size_t cap)
{
    dec_out o = {out, out ? cap : 0, 0};
    if (d->n_pending > 0)
        put(&o, REPL, 3);
    d->n_pending = 0;
    return finish(&o);
}

size_t tok_decode(const tok_tokenizer *t, const int32_t *ids, int n,
                  int render_special, char *out, size_t cap)
{
    tok_decoder d;
    tok_decoder_init(&d, t, render_special);
    dec_out o = {out, out ? cap : 0, 0};
    for (int i = 0; i < n && ids; i++)
        feed_id(&d, ids[i], &o);
    if (d.n_pending > 0)
        put(&o, REPL, 3);
    finish(&o);
    return o.len;
}
