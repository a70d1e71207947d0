/*
 * tok_internal.h - the tokenizer object and the helpers its source files
 * share (tok.c: construction, maps, special tokens, encode dispatch;
 * tok_spm.c / tok_gpt2.c: the two encoders; tok_decode.c: pieces and
 * decoding; tok_load.c: file loaders). Not a public header.
 *
 * A built tokenizer is never written again: all functions taking a
 * const tok_tokenizer * may run concurrently.
 */
#ifndef LKQ_TOK_INTERNAL_H
#define LKQ_TOK_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>

#include "tokenizer/tok.h"

#define TOK_SPACE_UTF8 "\xE2\x96\x81" /* U+2581, SentencePiece's space */

/* Pre-tokenizer families of the GPT-2 path. */
typedef enum { TOK_PRE_GPT2 = 0, TOK_PRE_SMOLLM, TOK_PRE_LLAMA3, TOK_PRE_QWEN2 } tok_pre;

/* Open-addressing map from a token's text to its id (texts live in the
 * tokenizer's arena). A slot holds id (-1 = empty) and the text's hash, so
 * that probes compare text only when the hashes agree. */
typedef struct {
    int32_t id;
    uint32_t hash;
} tok_smap_slot;

typedef struct {
    tok_smap_slot *slots;
    uint32_t mask;
} tok_smap;

/* Open-addressing map from a GPT-2 merge pair (left id, right id) to its
 * rank and the id of the merged token. */
typedef struct {
    uint64_t key; /* ((uint64_t)left << 32 | right) + 1; 0 = empty */
    int32_t rank;
    int32_t id;
} tok_pair_slot;

struct tok_tokenizer {
    tok_kind kind;
    int32_t n_vocab;
    char *text;          /* arena of raw vocab texts */
    uint32_t *text_off;  /* [n_vocab + 1] offsets into text */
    char *dec;           /* arena of decoded pieces (what tok_piece gives) */
    uint32_t *dec_off;   /* [n_vocab + 1] */
    float *scores;       /* [n_vocab] */
    int32_t *types;      /* [n_vocab] TOK_TYPE_* */
    int16_t *byte_val;   /* [n_vocab] byte of a BYTE token, else -1 */
    tok_smap map;        /* text -> id; merge candidates first on clashes */
    int32_t byte_id[256];/* SPM: byte-fallback token; GPT-2: token of byte b */

    int32_t bos, eos, unk, pad;
    int add_bos, add_eos, add_space_prefix, remove_extra_ws;
    int n_user;          /* SPM: number of USER_DEFINED pieces */
    uint64_t *bigrams;   /* SPM: set of adjacent character pairs found inside
                            mergeable pieces (tok_spm_bigram_key); 0 = empty */
    uint32_t bigram_mask;
    uint32_t max_user_len;

    int32_t *special;    /* ids matched in text, by first byte, longest first */
    int n_special;
    int special_start[257]; /* specials starting with byte b: [start[b], start[b+1]) */
    int32_t eog[8];
    int n_eog;

    tok_pre pre;         /* GPT-2 */
    tok_pair_slot *pairs;
    uint32_t pair_mask;
    uint16_t byte_cp[256];  /* GPT-2 byte -> code point */
    int16_t cp_byte[512];   /* code point (< 512) -> byte, or -1 */
};

/* Growing id output of one encode call: ids past cap are counted only. */
typedef struct {
    int32_t *out;
    int cap;
    int n;
} tok_sink;

static inline void tok_emit(tok_sink *s, int32_t id)
{
    if (s->n < s->cap)
        s->out[s->n] = id;
    s->n++;
}

static inline const char *tok_text(const tok_tokenizer *t, int32_t id,
                                   uint32_t *len)
{
    *len = t->text_off[id + 1] - t->text_off[id];
    return t->text + t->text_off[id];
}

static inline uint32_t tok_hash_u64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return (uint32_t)k;
}

void tok_errf(char *err, size_t errlen, const char *fmt, ...);
int32_t tok_smap_get(const tok_tokenizer *t, const char *s, size_t len);
/* rank / id of the merge (l, r), or rank -1. */
int32_t tok_pair_get(const tok_tokenizer *t, int32_t l, int32_t r, int32_t *id);
int tok_is_mergeable(const tok_tokenizer *t, int32_t id);

/* Encoders of one text fragment (no special tokens inside). Return 0 or a
 * negative value when out of memory. */
int tok_spm_encode(const tok_tokenizer *t, const char *text, size_t len,
                   tok_sink *out);
int tok_gpt2_encode(const tok_tokenizer *t, const char *text, size_t len,
                    tok_sink *out);
/* SPM: builds t->bigrams; returns 0 or -ENOMEM. */
int tok_spm_build_bigrams(tok_tokenizer *t);
/* GPT-2 byte <-> unicode tables into t (byte_cp, cp_byte). */
void tok_gpt2_init_bytes(tok_tokenizer *t);

#endif
