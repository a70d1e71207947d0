/*
 * lkq_prompt.h - prompts and request bodies of the load generator: a text
 * corpus (Moby-Dick by default) sliced at a different, seeded offset for
 * every request, so that no two requests share a prefix; the JSON body of a
 * streamed /v1/completions or /v1/chat/completions request; and the seeded
 * random numbers behind offsets and Poisson arrivals.
 *
 * Threading: none; a corpus is read-only once loaded.
 */
#ifndef LKQ_PROMPT_H
#define LKQ_PROMPT_H

#include <stddef.h>
#include <stdint.h>

#include "loadtests/lkq_args.h"

typedef struct lkq_corpus {
    char *text; /* NUL-terminated, valid UTF-8 */
    size_t len;
} lkq_corpus;

/* Reads the whole file at path into c. Fails with a reason when it cannot be
 * read, is empty, is not valid UTF-8 or is over 256 MiB. */
int lkq_corpus_load(lkq_corpus *c, const char *path, char *err, size_t errlen);
void lkq_corpus_free(lkq_corpus *c);

/* Default corpus path: $LKQ_SHARED/data/moby-dick.txt, else
 * ../shared/data/moby-dick.txt (the path the project documents). */
const char *lkq_corpus_default_path(char *buf, size_t len);

/* Slice number `index` of about nchars bytes: its start is drawn from
 * (seed, index), moved past the next whitespace (so it begins with a word) and
 * its end moved back to a UTF-8 boundary. Returns 0 with *off, *len set, or -1
 * when the corpus is shorter than nchars + 64. */
int lkq_corpus_slice(const lkq_corpus *c, uint64_t seed, uint64_t index, size_t nchars,
                     size_t *off, size_t *len);

/* splitmix64 step: the next 64 random bits of *state. */
uint64_t lkq_rng_next(uint64_t *state);
/* Uniform in (0, 1]. */
double lkq_rng_unit(uint64_t *state);
/* Exponential inter-arrival gap for a Poisson process of `rate` per second. */
double lkq_rng_exp(uint64_t *state, double rate);

/* JSON body of one streamed request with prompt[0..len) (valid UTF-8):
 * model (when given), prompt or messages, max_tokens, temperature,
 * stream: true, stream_options.include_usage: true, ignore_eos when asked. Caller frees with free().
 * NULL on out of memory or invalid UTF-8. */
char *lkq_request_body(const lkq_args *a, const char *model, const char *prompt, size_t len);

#endif
