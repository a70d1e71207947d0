/*
 * tok.h - tokenizers in C: SentencePiece-style BPE (scores-driven merges,
 * byte fallback, U+2581 spaces) and GPT-2 byte-level BPE (merge ranks,
 * byte-to-unicode map, family pre-tokenizer regex).
 *
 * A tok_tokenizer is immutable after creation: encode/decode may be called
 * from any number of threads at once. A tok_decoder is per-stream state.
 * Errors: functions return 0 on success, negative on failure (a negated
 * errno value: -EINVAL, -ENOMEM, -EIO, -ENOTSUP, -ENOSPC, ...), and write a
 * one-line reason into err[errlen] when err is not NULL.
 *
 * Reference behaviour (checked by tests/tokenizer): SPM encodes exactly like
 * libsentencepiece's BPE model (except that invalid UTF-8 bytes go through
 * byte fallback instead of becoming U+FFFD); GPT-2 exactly like HF
 * tokenizers for the "smollm", "gpt2" and "llama-bpe" families. A byte whose
 * GPT-2 character is missing from the vocab is dropped, as HF drops it.
 */
#ifndef LKQ_TOK_H
#define LKQ_TOK_H

#include <stddef.h>
#include <stdint.h>

typedef struct tok_tokenizer tok_tokenizer;

typedef enum { TOK_SPM = 1, TOK_GPT2 = 2 } tok_kind;

/* GGUF token types (tokenizer.ggml.token_type) */
enum {
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER_DEFINED = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
};

/* A byte string that need not be NUL-terminated (GGUF strings are not). */
typedef struct {
    const char *s;
    uint32_t len;
} tok_str;

/* Plain-data description of a vocabulary, e.g. as read from GGUF metadata.
 * tok_create() copies everything it needs; the caller keeps ownership. */
typedef struct {
    tok_kind kind;
    int32_t n_vocab;
    const tok_str *tokens;   /* [n_vocab] */
    const float *scores;     /* [n_vocab] or NULL (SPM needs them) */
    const int32_t *types;    /* [n_vocab] TOK_TYPE_*, or NULL */
    int32_t n_merges;        /* GPT-2: merges "left right", rank = index */
    const tok_str *merges;
    int32_t bos_id, eos_id, unk_id, pad_id; /* -1 when absent */
    int add_bos, add_eos;    /* default for tok_encode(add_special=1) */
    int add_space_prefix;    /* SPM: prepend U+2581 to the text */
    const char *pre;         /* GPT-2 pre-tokenizer family ("smollm", "gpt2",
                                "llama-bpe", ...), NULL = "gpt2" */
} tok_desc;

int tok_create(const tok_desc *d, tok_tokenizer **out, char *err, size_t errlen);
/* SentencePiece ModelProto file (tokenizer.model), parsed in C. */
int tok_load_spm_model(const char *path, tok_tokenizer **out, char *err,
                       size_t errlen);
/* llama2.c tokenizer.bin (both the early and the <0xXX> byte formats). */
int tok_load_llama2c(const char *path, int32_t n_vocab, tok_tokenizer **out,
                     char *err, size_t errlen);
void tok_destroy(tok_tokenizer *t); /* NULL is a no-op */

tok_kind tok_get_kind(const tok_tokenizer *t);
int32_t tok_n_vocab(const tok_tokenizer *t);
int32_t tok_bos(const tok_tokenizer *t); /* -1 if none */
int32_t tok_eos(const tok_tokenizer *t); /* -1 if none */
int tok_default_add_bos(const tok_tokenizer *t);
/* 1 if id ends a generation (EOS, and end-of-turn tokens such as
 * <|im_end|>, <|eot_id|>, <|endoftext|> when present). */
int tok_is_eog(const tok_tokenizer *t, int32_t id);
/* Id of the token whose text is exactly s, or -1. */
int32_t tok_find(const tok_tokenizer *t, const char *s);

/* Encodes len bytes of text (any bytes: invalid UTF-8 is handled, never
 * read past len). add_bos: prepend BOS if the vocab has one (and append EOS
 * if the vocab says add_eos). parse_special: text spelled like a control /
 * user-defined token (e.g. "<|im_start|>") becomes that token.
 * Writes at most cap ids to out and the full count to *n_out; returns 0, or
 * a negative value if cap was too small (*n_out then says how many needed). */
int tok_encode(const tok_tokenizer *t, const char *text, size_t len,
               int add_bos, int parse_special, int32_t *out, int cap,
               int *n_out);

/* Raw bytes of one token as it appears in text (byte tokens give their
 * byte; SPM U+2581 becomes ' '; GPT-2 bytes are un-mapped; control tokens
 * give "" unless render_special). Returns the length (may exceed cap: then
 * nothing past cap is written), negative for an invalid id. */
int tok_piece(const tok_tokenizer *t, int32_t id, int render_special,
              char *buf, size_t cap);

/* Streaming decoder: turns ids into valid UTF-8 text as they come, holding
 * back an incomplete multi-byte character until its last byte arrives and
 * dropping the SPM leading space of the first piece. A caller that decodes
 * a continuation of text already shown (e.g. generated tokens after a
 * prompt) sets d.first = 0 after tok_decoder_init to keep that space. */
typedef struct {
    const tok_tokenizer *t;
    unsigned char pending[8];
    int n_pending;
    int first;
    int render_special;
} tok_decoder;

void tok_decoder_init(tok_decoder *d, const tok_tokenizer *t, int render_special);
/* Appends the text completed by id to out (at most cap bytes, NUL
 * terminated when cap > 0); returns bytes written (without NUL). Invalid
 * byte sequences come out as U+FFFD. Text past cap - 1 is lost: a cap of
 * 3 * (piece length + 4) + 1 always suffices (tok_piece gives the length). */
size_t tok_decoder_push(tok_decoder *d, int32_t id, char *out, size_t cap);
/* Emits what is still pending (as U+FFFD for an incomplete character). */
size_t tok_decoder_flush(tok_decoder *d, char *out, size_t cap);

/* Decodes a whole id sequence to text (convenience over tok_decoder).
 * Returns the full length; writes at most cap-1 bytes plus NUL. */
size_t tok_decode(const tok_tokenizer *t, const int32_t *ids, int n,
                  int render_special, char *out, size_t cap);

#endif
