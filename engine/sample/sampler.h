/*
 * sampler.h - token sampling: logit bias, penalties (repetition, presence,
 * frequency), temperature, top-k, top-p (nucleus), min-p, greedy at temperature 0, and
 * a seeded PRNG so the same seed gives the same tokens.
 * Room: engine/sample (sampling and chat formatting). May call: libc only.
 *
 * A smp_sampler is per sequence and not thread-safe; all scratch is
 * allocated at creation (no allocation per token).
 */
#ifndef LKQ_SAMPLER_H
#define LKQ_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temperature;      /* 0 = greedy */
    int32_t top_k;          /* 0 = off */
    float top_p;            /* 1 = off */
    float min_p;            /* 0 = off; relative to the most likely token */
    float repeat_penalty;   /* 1 = off; llama.cpp style over repeat_last_n */
    int32_t repeat_last_n;  /* window for repeat_penalty, -1 = whole history */
    float presence_penalty; /* OpenAI: logit -= p if the token appeared */
    float frequency_penalty;/* OpenAI: logit -= f * count */
    uint64_t seed;
    /* OpenAI logit_bias: added to the logit of each listed token before the
     * penalties (llama.cpp's order); a bias of -100 or less bans the token
     * (its logit becomes -inf). Borrowed here; smp_create copies it. */
    const struct smp_bias *logit_bias;
    int32_t n_logit_bias;
} smp_params;

typedef struct smp_bias {
    int32_t token;          /* [0, n_vocab) */
    float bias;             /* [-100, 100] */
} smp_bias;

#define SMP_BIAS_MIN (-100.0f)
#define SMP_BIAS_MAX 100.0f

typedef struct smp_sampler smp_sampler;

/* Defaults: temperature 1, top_k 0, top_p 1, min_p 0, penalties off,
 * repeat_last_n 64, seed 0, no logit bias. */
smp_params smp_default_params(void);

/* Checks ranges (the bias values too, not the token ids: smp_create knows
 * the vocabulary); writes a reason to err and returns negative if invalid. */
int smp_validate(const smp_params *p, char *err, size_t errlen);

/* Creates a sampler for n_vocab logits; caller frees with smp_destroy.
 * Copies p->logit_bias (a token out of range or a bias outside
 * [SMP_BIAS_MIN, SMP_BIAS_MAX] is refused with a reason). */
int smp_create(const smp_params *p, int32_t n_vocab, smp_sampler **out,
               char *err, size_t errlen);
void smp_destroy(smp_sampler *s); /* NULL is a no-op */

/* Picks the next token from logits[n_vocab] (not modified). history:
 * tokens the penalties look at (typically the generated ones for
 * presence/frequency and the last repeat_last_n of the whole context for
 * repeat_penalty; here one array serves both). If prob is not NULL it
 * receives the probability of the chosen token under the final
 * (post-filter) distribution. */
int32_t smp_sample(smp_sampler *s, const float *logits, const int32_t *history,
                   int n_history, float *prob);

/* Deterministic PRNG step (splitmix64), exposed for tests. */
uint64_t smp_rng_next(uint64_t *state);

#endif
