/*
 * tok_spm.c - SentencePiece-style BPE encoding of one text fragment, with
 * the semantics of libsentencepiece's BPE model:
 *   normalize: optional removal of extra spaces (leading, trailing, runs),
 *     dummy prefix U+2581, ' ' -> U+2581;
 *   split into UTF-8 characters (USER_DEFINED pieces are matched first and
 *     frozen); an invalid byte is a one-byte "character";
 *   merge: repeatedly join the adjacent pair whose concatenation is a vocab
 *     piece with the highest score, leftmost on ties (max-heap of candidate
 *     pairs + doubly linked symbol list: O(n log n));
 *     speed-up with the same result: the text is first cut between two
 *     characters that occur next to each other in no mergeable piece (no
 *     merge can ever cross such a point, so the parts are independent),
 *     which keeps the heaps small (typically one word each);
 *   UNUSED pieces produced by merges are split back into their parts;
 *   pieces not in the vocab become byte-fallback tokens <0xXX> (or unk).
 * Difference from libsentencepiece: it turns an invalid UTF-8 byte into
 * U+FFFD before encoding; here the byte itself goes through byte fallback,
 * so no input byte is lost.
 *
 * Threading: reentrant; all state is local to the call.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"
#include "tokenizer/unicode.h"

typedef struct {
    uint32_t start, len; /* span in the normalized text; len 0 = merged away */
    int32_t prev, next;
    uint32_t cp;         /* the character (before merges); see char_key */
    int frozen;
} spm_sym;

typedef struct {
    float score;
    int32_t left, right;
    uint32_t size; /* byte length of the merged piece, to spot stale pairs */
} spm_pair;

/* Split record of a merge that produced an UNUSED piece. */
typedef struct {
    uint32_t start, len, left_len;
} spm_rev;

typedef struct {
    const tok_tokenizer *t;
    const char *s; /* normalized text */
    spm_sym *sym;  /* symbols of the current part [cap_sym] */
    size_t cap_sym;
    spm_pair *heap;
    size_t n_heap, cap_heap;
    spm_rev *rev;
    size_t n_rev, cap_rev;
    tok_sink *out;
} spm_ctx;

/* a outranks b: higher score, then leftmost. */
static int pair_before(const spm_pair *a, const spm_pair *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(spm_ctx *c, spm_pair p)
{
    size_t i = c->n_heap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!pair_before(&p, &c->heap[up]))
            break;
        c->heap[i] = c->heap[up];
        i = up;
    }
    c->heap[i] = p;
}

static spm_pair heap_pop(spm_ctx *c)
{
    spm_pair top = c->heap[0], last = c->heap[--c->n_heap];
    size_t i = 0, n = c->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, best = l;
        if (l >= n)
            break;
        if (l + 1 < n && pair_before(&c->heap[l + 1], &c->heap[l]))
            best = l + 1;
        if (!pair_before(&c->heap[best], &last))
            break;
        c->heap[i] = c->heap[best];
        i = best;
    }
    if (n > 0)
        c->heap[i] = last;
    return top;
}

/* Queues the pair (l, r) if their concatenation is a mergeable piece. The
 * heap has room for every pair a part can push (at most 3 per character). */
static int add_pair(spm_ctx *c, int32_t l, int32_t r)
{
    if (l < 0 || r < 0 || c->sym[l].frozen || c->sym[r].frozen)
        return 0;
    uint32_t size = c->sym[l].len + c->sym[r].len;
    int32_t id = tok_smap_get(c->t, c->s + c->sym[l].start, size);
    if (id < 0 || !tok_is_mergeable(c->t, id))
        return 0;
    spm_pair p = {c->t->scores[id], l, r, size};
    heap_push(c, p);
    if (c->t->types[id] == TOK_TYPE_UNUSED) {
        if (c->n_rev == c->cap_rev) {
            size_t nc = c->cap_rev ? 2 * c->cap_rev : 64;
            spm_rev *nr = realloc(c->rev, nc * sizeof(*nr));
            if (!nr)
                return -ENOMEM;
            c->rev = nr;
            c->cap_rev = nc;
        }
        spm_rev rv = {c->sym[l].start, size, c->sym[l].len};
        c->rev[c->n_rev++] = rv;
    }
    return 0;
}

/* Emits the piece s[start, start+len): its id; an UNUSED piece split back
 * along its latest recorded merge; an unknown piece as bytes or unk. */
static void emit_piece(spm_ctx *c, uint32_t start, uint32_t len, int depth)
{
    const tok_tokenizer *t = c->t;
    const char *p = c->s + start;
    int32_t id = tok_smap_get(t, p, len);
    if (id >= 0 && t->types[id] == TOK_TYPE_UNUSED && depth < 64) {
        for (size_t k = c->n_rev; k-- > 0;) {
            const spm_rev *rv = &c->rev[k];
            if (rv->len == len && memcmp(c->s + rv->start, p, len) == 0) {
                emit_piece(c, start, rv->left_len, depth + 1);
                emit_piece(c, start + rv->left_len, len - rv->left_len, depth + 1);
                return;
            }
        }
    }
    if (id >= 0 && tok_is_mergeable(t, id)) {
        tok_emit(c->out, id);
        return;
    }
    int have_bytes = 0;
    for (uint32_t i = 0; i < len && !have_bytes; i++)
        have_bytes = t->byte_id[(unsigned char)p[i]] >= 0;
    if (!have_bytes) {
        if (t->unk >= 0)
            tok_emit(c->out, t->unk);
        return;
    }
    for (uint32_t i = 0; i < len; i++) {
        int32_t b = t->byte_id[(unsigned char)p[i]];
        if (b >= 0 || t->unk >= 0)
            tok_emit(c->out, b >= 0 ? b : t->unk);
    }
}

/* Normalizes text[0..len) into out (room for 3 * len + 3 bytes) as
 * SentencePiece does with an identity rule set; returns the length. */
static size_t normalize(const tok_tokenizer *t, const char *text, size_t len,
                        char *out)
{
    size_t i = 0, o = 0;
    int rew = t->remove_extra_ws;
    if (rew)
        while (i < len && text[i] == ' ')
            i++;
    if (i == len)
        return 0;
    if (t->add_space_prefix) {
        memcpy(out, TOK_SPACE_UTF8, 3);
        o = 3;
    }
    int prev_space = rew;
    for (; i < len; i++) {
        if (text[i] == ' ') {
            if (rew && prev_space)
                continue;
            memcpy(out + o, TOK_SPACE_UTF8, 3);
            o += 3;
            prev_space = rew;
        } else {
            out[o++] = text[i];
            prev_space = 0;
        }
    }
    if (rew)
        while (o >= 3 && memcmp(out + o - 3, TOK_SPACE_UTF8, 3) == 0)
            o -= 3;
    return o;
}

/* Longest USER_DEFINED piece at s[0..n), or 0. */
static uint32_t match_user(const tok_tokenizer *t, const char *s, size_t n)
{
    uint32_t maxl = t->max_user_len < n ? t->max_user_len : (uint32_t)n;
    for (uint32_t l = maxl; l > 0; l--) {
        int32_t id = tok_smap_get(t, s, l);
        if (id >= 0 && t->types[id] == TOK_TYPE_USER_DEFINED)
            return l;
    }
    return 0;
}

/* Character identity for the bigram set: the code point, or for an invalid
 * byte 0x110000 + the byte. */
static uint32_t char_key(const char *s, size_t n, uint32_t *len)
{
    uint32_t cp;
    *len = (uint32_t)uni_decode((const unsigned char *)s, n, &cp);
    return cp == UNI_INVALID ? UNI_INVALID + (unsigned char)s[0] : cp;
}

static uint64_t bigram_key(uint32_t a, uint32_t b)
{
    return ((uint64_t)a << 32 | b) + 1;
}

static void bigram_put(tok_tokenizer *t, uint64_t key)
{
    uint32_t i = tok_hash_u64(key) & t->bigram_mask;
    while (t->bigrams[i] != 0) {
        if (t->bigrams[i] == key)
            return;
        i = (i + 1) & t->bigram_mask;
    }
    t->bigrams[i] = key;
}

static int bigram_has(const tok_tokenizer *t, uint32_t a, uint32_t b)
{
    uint64_t key = bigram_key(a, b);
    uint32_t i = tok_hash_u64(key) & t->bigram_mask;
    for (;;) {
        if (t->bigrams[i] == key)
            return 1;
        if (t->bigrams[i] == 0)
            return 0;
        i = (i + 1) & t->bigram_mask;
    }
}

int tok_spm_build_bigrams(tok_tokenizer *t)
{
    uint64_t total = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (tok_is_mergeable(t, id))
            total += t->text_off[id + 1] - t->text_off[id];
    uint64_t sz = 16;
    while (sz < 2 * total)
        sz <<= 1;
    t->bigrams = calloc(sz, sizeof(uint64_t));
    if (!t->bigrams)
        return -ENOMEM;
    t->bigram_mask = (uint32_t)(sz - 1);
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (!tok_is_mergeable(t, id))
            continue;
        uint32_t n, l;
        const char *s = tok_text(t, id, &n);
        uint32_t prev = 0;
        for (uint32_t i = 0; i < n; i += l) {
            uint32_t k = char_key(s + i, n - i, &l);
            if (i > 0)
                bigram_put(t, bigram_key(prev, k));
            prev = k;
        }
    }
    return 0;
}

/* Grows *p (elements of size sz, capacity *cap) to hold n; 0 or -ENOMEM. */
static int grow(void **p, size_t *cap, size_t n, size_t sz)
{
    if (n <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < n)
        nc *= 2;
    void *np = realloc(*p, nc * sz);
    if (!np)
        return -ENOMEM;
    *p = np;
    *cap = nc;
    return 0;
}

/* Runs the merges over symbols [a, b) (one independent part) and emits. */
static int encode_part(spm_ctx *c, int32_t a, int32_t b)
{
    if (grow((void **)&c->heap, &c->cap_heap, 3 * (size_t)(b - a) + 1,
             sizeof(spm_pair)) < 0)
        return -ENOMEM;
    for (int32_t i = a; i < b; i++) {
        c->sym[i].prev = i > a ? i - 1 : -1;
        c->sym[i].next = i + 1 < b ? i + 1 : -1;
    }
    c->n_heap = 0;
    for (int32_t i = a; i + 1 < b; i++)
        if (add_pair(c, i, i + 1) < 0)
            return -ENOMEM;
    while (c->n_heap > 0) {
        spm_pair top = heap_pop(c);
        spm_sym *l = &c->sym[top.left], *r = &c->sym[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size)
            continue; /* stale: one side changed since it was queued */
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0)
            c->sym[r->next].prev = top.left;
        r->len = 0;
        if (add_pair(c, l->prev, top.left) < 0 ||
            add_pair(c, top.left, l->next) < 0)
            return -ENOMEM;
    }
    for (int32_t i = a; i >= 0; i = c->sym[i].next)
        emit_piece(c, c->sym[i].start, c->sym[i].len, 0);
    return 0;
}

int tok_spm_encode(const tok_tokenizer *t, const char *text, size_t len,
                   tok_sink *out)
{
    int rc = -ENOMEM;
    spm_ctx c = {.t = t, .out = out};
    char *norm = malloc(3 * len + 3);
    if (!norm)
        return -ENOMEM;
    size_t n = normalize(t, text, len, norm);
    c.s = norm;

    /* symbols of the current part only: memory follows the longest part */
    int32_t ns = 0;
    for (size_t i = 0; i < n;) {
        uint32_t l = t->n_user ? match_user(t, norm + i, n - i) : 0;
        spm_sym s = {(uint32_t)i, l, -1, -1, 0, l > 0};
        if (!l)
            s.cp = char_key(norm + i, n - i, &s.len);
        if (ns > 0 && (s.frozen || c.sym[ns - 1].frozen ||
                       !bigram_has(t, c.sym[ns - 1].cp, s.cp))) {
            if (encode_part(&c, 0, ns) < 0)
                goto done;
            ns = 0;
        }
        if (grow((void **)&c.sym, &c.cap_sym, (size_t)ns + 1, sizeof(spm_sym)) < 0)
            goto done;
        c.sym[ns++] = s;
        i += s.len;
    }
    if (ns > 0 && encode_part(&c, 0, ns) < 0)
        goto done;
    rc = 0;
done:
    free(norm);
    free(c.sym);
    free(c.heap);
    free(c.rev);
    return rc;
}
