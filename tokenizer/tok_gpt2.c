/*
 * tok_gpt2.c - GPT-2 byte-level BPE encoding of one text fragment:
 *   1. pre-tokenization by the family's regex, matched by hand over code
 *      points (classes \p{L}, \p{N}, \s from unicode.h):
 *      gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      smollm: every \p{N} character alone first (HF Digits(individual_digits)),
 *              then the gpt2 regex on the pieces in between
 *      llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *              ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *              (+ HF ignore_merges: a pre-token that is a vocab token is kept)
 *      qwen2:  the llama3 regex with \p{N} (one digit per pre-token), without
 *              ignore_merges. Qwen2's tokenizer.json also NFC-normalizes the
 *              text first; that is not done here (as in llama.cpp): text that
 *              is not in NFC may tokenize differently from HF.
 *   2. each pre-token's bytes start as the tokens of their GPT-2
 *      byte-to-unicode characters; merges are applied lowest rank first,
 *      leftmost on ties (min-heap + linked list, as HF tokenizers' BPE).
 * Invalid UTF-8 bytes are "other" characters (neither letter, number nor
 * space) and are mapped like any byte.
 *
 * Threading: reentrant; all state is local to the call.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"
#include "tokenizer/unicode.h"

/* GPT-2's reversible byte -> code point map: printable Latin-1 bytes map to
 * themselves, the other 68 to 256, 257, ... in byte order. */
void tok_gpt2_init_bytes(tok_tokenizer *t)
{
    uint32_t next = 256;
    for (int i = 0; i < 512; i++)
        t->cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) ||
                        (b >= 0xAE && b <= 0xFF);
        uint32_t cp = printable ? (uint32_t)b : next++;
        t->byte_cp[b] = (uint16_t)cp;
        t->cp_byte[cp] = (int16_t)b;
    }
}

typedef struct {
    int32_t rank, pos, id; /* merge of symbols pos and next(pos) into id */
} bpe_merge;

typedef struct {
    const tok_tokenizer *t;
    const char *text;
    const uint32_t *cp;  /* code points [n_cp] */
    const uint8_t *cl;   /* class flags [n_cp] */
    const uint32_t *off; /* byte offset of each code point [n_cp + 1] */
    int32_t *id, *prev, *next; /* symbols of the current word [cap] */
    bpe_merge *heap;           /* [3 * cap] */
    size_t n_heap, cap;
    char *buf; /* mapped text of a word (llama3 ignore_merges) */
    tok_sink *out;
} g_ctx;

static int merge_before(const bpe_merge *a, const bpe_merge *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(g_ctx *c, bpe_merge m)
{
    size_t i = c->n_heap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!merge_before(&m, &c->heap[up]))
            break;
        c->heap[i] = c->heap[up];
        i = up;
    }
    c->heap[i] = m;
}

static bpe_merge heap_pop(g_ctx *c)
{
    bpe_merge top = c->heap[0], last = c->heap[--c->n_heap];
    size_t i = 0, n = c->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, best = l;
        if (l >= n)
            break;
        if (l + 1 < n && merge_before(&c->heap[l + 1], &c->heap[l]))
            best = l + 1;
        if (!merge_before(&c->heap[best], &last))
            break;
        c->heap[i] = c->heap[best];
        i = best;
    }
    if (n > 0)
        c->heap[i] = last;
    return top;
}

static void push_pair(g_ctx *c, int32_t pos)
{
    int32_t nx = c->next[pos], id;
    if (nx < 0)
        return;
    int32_t rank = tok_pair_get(c->t, c->id[pos], c->id[nx], &id);
    if (rank >= 0) {
        bpe_merge m = {rank, pos, id};
        heap_push(c, m);
    }
}

/* Makes room for a word of n bytes; 0 or -ENOMEM. */
static int reserve(g_ctx *c, size_t n)
{
    if (n <= c->cap)
        return 0;
    size_t nc = c->cap ? c->cap : 64;
    while (nc < n)
        nc *= 2;
    int32_t *a = realloc(c->id, nc * sizeof(int32_t));
    if (a)
        c->id = a;
    int32_t *b = realloc(c->prev, nc * sizeof(int32_t));
    if (b)
        c->prev = b;
    int32_t *d = realloc(c->next, nc * sizeof(int32_t));
    if (d)
        c->next = d;
    bpe_merge *h = realloc(c->heap, 3 * nc * sizeof(bpe_merge));
    if (h)
        c->heap = h;
    char *u = c->t->pre == TOK_PRE_LLAMA3 ? realloc(c->buf, 2 * nc) : c->buf;
    if (u)
        c->buf = u;
    if (!a || !b || !d || !h || (c->t->pre == TOK_PRE_LLAMA3 && !u))
        return -ENOMEM;
    c->cap = nc;
    return 0;
}

/* BPE over the bytes s[0..n) of one pre-token; emits the resulting ids.
 * Returns 0 or -ENOMEM. */
static int bpe_word(g_ctx *c, const unsigned char *s, int32_t n)
{
    const tok_tokenizer *t = c->t;
    if (n == 1) {
        if (t->byte_id[s[0]] >= 0)
            tok_emit(c->out, t->byte_id[s[0]]);
        return 0;
    }
    if (reserve(c, (size_t)n) < 0)
        return -ENOMEM;
    if (t->pre == TOK_PRE_LLAMA3 && n > 1) { /* ignore_merges */
        size_t o = 0;
        for (int32_t i = 0; i < n; i++)
            o += (size_t)uni_encode(t->byte_cp[s[i]], c->buf + o);
        int32_t id = tok_smap_get(t, c->buf, o);
        if (id >= 0) {
            tok_emit(c->out, id);
            return 0;
        }
    }
    int32_t m = 0; /* bytes without a token (absent in a sane vocab) drop */
    for (int32_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0)
            continue;
        c->id[m] = id;
        c->prev[m] = m - 1;
        c->next[m] = -1;
        if (m > 0)
            c->next[m - 1] = m;
        m++;
    }
    c->n_heap = 0;
    for (int32_t i = 0; i + 1 < m; i++)
        push_pair(c, i);
    while (c->n_heap > 0) {
        bpe_merge top = heap_pop(c);
        int32_t p = top.pos, nx = c->next[p], id;
        if (c->id[p] < 0 || nx < 0)
            continue;
        if (tok_pair_get(t, c->id[p], c->id[nx], &id) < 0 || id != top.id)
            continue; /* stale entry */
        c->id[p] = top.id;
        c->id[nx] = -1;
        c->next[p] = c->next[nx];
        if (c->next[nx] >= 0)
            c->prev[c->next[nx]] = p;
        if (c->prev[p] >= 0)
            push_pair(c, c->prev[p]);
        push_pair(c, p);
    }
    for (int32_t i = m > 0 ? 0 : -1; i >= 0; i = c->next[i])
        tok_emit(c->out, c->id[i]);
    return 0;
}

/* Emits the pre-token made of code points [a, b). */
static int emit_word(g_ctx *c, size_t a, size_t b)
{
    return bpe_word(c, (const unsigned char *)c->text + c->off[a],
                    (int32_t)(c->off[b] - c->off[a]));
}

static int is_contraction(const uint32_t *cp, size_t i, size_t e, int fold,
                          size_t *end)
{
    if (cp[i] != '\'' || i + 1 >= e)
        return 0;
    uint32_t a = cp[i + 1], b = i + 2 < e ? cp[i + 2] : 0;
    if (fold) {
        a = a < 128 ? (a | 0x20) : a;
        b = b < 128 ? (b | 0x20) : b;
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        *end = i + 2;
        return 1;
    }
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        *end = i + 3;
        return 1;
    }
    return 0;
}

static size_t run(const uint8_t *cl, size_t i, size_t e, unsigned want)
{
    while (i < e && cl[i] == want)
        i++;
    return i;
}

/* \s+(?!\S)|\s+ at i (a whitespace character): the whole run at the end of
 * the input, else the run minus its last character (which joins the next
 * pre-token), else one character. */
static size_t space_run(const uint8_t *cl, size_t i, size_t e)
{
    size_t k = run(cl, i, e, UNI_S);
    if (k == e || k - i < 2)
        return k;
    return k - 1;
}

/* End of the GPT-2 regex match at i within [i, e). */
static size_t match_gpt2(const g_ctx *c, size_t i, size_t e)
{
    const uint32_t *cp = c->cp;
    const uint8_t *cl = c->cl;
    size_t end;
    if (is_contraction(cp, i, e, 0, &end))
        return end;
    size_t j = (cp[i] == ' ' && i + 1 < e) ? i + 1 : i;
    if (cl[j] == UNI_L || cl[j] == UNI_N || cl[j] == 0)
        return run(cl, j, e, cl[j]); /* ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+' */
    return space_run(cl, i, e);
}

/* End of the Llama-3 regex match at i within [i, e). */
static size_t match_llama3(const g_ctx *c, size_t i, size_t e)
{
    const uint32_t *cp = c->cp;
    const uint8_t *cl = c->cl;
    size_t end;
    if (is_contraction(cp, i, e, 1, &end))
        return end;
    if (cl[i] == UNI_L)
        return run(cl, i, e, UNI_L);
    if (cp[i] != '\r' && cp[i] != '\n' && cl[i] != UNI_N && i + 1 < e &&
        cl[i + 1] == UNI_L)
        return run(cl, i + 1, e, UNI_L);
    if (cl[i] == UNI_N) {
        size_t k = i;
        size_t max = c->t->pre == TOK_PRE_QWEN2 ? 1 : 3;
        while (k < e && k - i < max && cl[k] == UNI_N)
            k++;
        return k;
    }
    size_t j = (cp[i] == ' ' && i + 1 < e) ? i + 1 : i;
    if (cl[j] == 0) {
        size_t k = run(cl, j, e, 0);
        while (k < e && (cp[k] == '\r' || cp[k] == '\n'))
            k++;
        return k;
    }
    /* cl[i] is whitespace: \s*[\r\n]+ ends after the run's last \r or \n */
    size_t k = run(cl, i, e, UNI_S);
    for (size_t m = k; m > i; m--)
        if (cp[m - 1] == '\r' || cp[m - 1] == '\n')
            return m;
    return space_run(cl, i, e);
}

/* Pre-tokenizes code points [a, b) with the family regex and encodes.
 * Returns 0 or -ENOMEM. */
static int regex_split(g_ctx *c, size_t a, size_t b)
{
    while (a < b) {
        size_t e = c->t->pre == TOK_PRE_LLAMA3 || c->t->pre == TOK_PRE_QWEN2
                       ? match_llama3(c, a, b)
                       : match_gpt2(c, a, b);
        if (emit_word(c, a, e) < 0)
            return -ENOMEM;
        a = e;
    }
    return 0;
}

int tok_gpt2_encode(const tok_tokenizer *t, const char *text, size_t len,
                    tok_sink *out)
{
    int rc = -ENOMEM;
    g_ctx c = {.t = t, .text = text, .out = out};
    uint32_t *cp = malloc(sizeof(uint32_t) * (len + 1));
    uint32_t *off = malloc(sizeof(uint32_t) * (len + 1));
    uint8_t *cl = malloc(len + 1);
    if (!cp || !off || !cl)
        goto done;
    size_t n = 0;
    for (size_t i = 0; i < len; n++) {
        off[n] = (uint32_t)i;
        i += (size_t)uni_decode((const unsigned char *)text + i, len - i, &cp[n]);
        cl[n] = (uint8_t)uni_class(cp[n]);
    }
    off[n] = (uint32_t)len;
    c.cp = cp;
    c.cl = cl;
    c.off = off;
    if (t->pre == TOK_PRE_SMOLLM) {
        size_t a = 0;
        for (size_t i = 0; i < n; i++) {
            if (cl[i] != UNI_N)
                continue;
            if (regex_split(&c, a, i) < 0 || emit_word(&c, i, i + 1) < 0)
                goto done;
            a = i + 1;
        }
        if (regex_split(&c, a, n) < 0)
            goto done;
    } else if (regex_split(&c, 0, n) < 0) {
        goto done;
    }
    rc = 0;
done:
    free(cp);
    free(off);
    free(cl);
    free(c.id);
    free(c.prev);
    free(c.next);
    free(c.heap);
    free(c.buf);
    return rc;
}
