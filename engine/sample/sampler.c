/*
 * sampler.c - see sampler.h. Pipeline per token:
 *   logits -> logit bias -> penalties -> (greedy if temperature == 0) -> /temperature ->
 *   top-k -> softmax -> min-p -> top-p -> renormalize -> draw.
 * Candidates live in one preallocated array; only the candidates that can
 * matter are sorted (top-k selects first; top-p sorts the tokens above a
 * probability floor when they already hold enough mass).
 */
#include "engine/sample/sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t id;
    float v; /* logit, then probability */
} smp_cand;

struct smp_sampler {
    smp_params p;
    int32_t n_vocab;
    uint64_t rng;
    smp_cand *cand;   /* [n_vocab] */
    float *adj;       /* [n_vocab] penalized logits */
    int32_t *counts;  /* [n_vocab] occurrence counts, reset after use */
    smp_bias *bias;   /* [p.n_logit_bias] own copy */
};

smp_params smp_default_params(void)
{
    smp_params p = {
        .temperature = 1.0f,
        .top_k = 0,
        .top_p = 1.0f,
        .min_p = 0.0f,
        .repeat_penalty = 1.0f,
        .repeat_last_n = 64,
        .presence_penalty = 0.0f,
        .frequency_penalty = 0.0f,
        .seed = 0,
        .logit_bias = NULL,
        .n_logit_bias = 0,
    };
    return p;
}

int smp_validate(const smp_params *p, char *err, size_t errlen)
{
    const char *why = NULL;
    if (!(p->temperature >= 0.0f && p->temperature <= 100.0f))
        why = "temperature must be in [0, 100]";
    else if (p->top_k < 0)
        why = "top_k must be >= 0";
    else if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        why = "top_p must be in (0, 1]";
    else if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        why = "min_p must be in [0, 1]";
    else if (!(p->repeat_penalty > 0.0f && p->repeat_penalty <= 10.0f))
        why = "repeat_penalty must be in (0, 10]";
    else if (p->repeat_last_n < -1)
        why = "repeat_last_n must be >= -1";
    else if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        why = "presence_penalty must be in [-2, 2]";
    else if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        why = "frequency_penalty must be in [-2, 2]";
    else if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias))
        why = "logit_bias: no entries given";
    for (int32_t i = 0; !why && i < p->n_logit_bias; i++)
        if (!(p->logit_bias[i].bias >= SMP_BIAS_MIN && p->logit_bias[i].bias <= SMP_BIAS_MAX))
            why = "logit_bias values must be in [-100, 100]";
    if (why) {
        if (err && errlen)
            snprintf(err, errlen, "%s", why);
        return -1;
    }
    return 0;
}

uint64_t smp_rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform float in [0, 1) with 24 random bits. */
static float rng_uniform(uint64_t *state)
{
    return (float)(smp_rng_next(state) >> 40) * (1.0f / 16777216.0f);
}

int smp_create(const smp_params *p, int32_t n_vocab, smp_sampler **out,
               char *err, size_t errlen)
{
    *out = NULL;
    if (smp_validate(p, err, errlen) < 0)
        return -1;
    if (n_vocab <= 0) {
        if (err && errlen)
            snprintf(err, errlen, "n_vocab must be positive");
        return -1;
    }
    smp_sampler *s = calloc(1, sizeof *s);
    if (!s)
        goto oom;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->rng = p->seed;
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    s->adj = malloc((size_t)n_vocab * sizeof *s->adj);
    s->counts = calloc((size_t)n_vocab, sizeof *s->counts);
    if (!s->cand || !s->adj || !s->counts)
        goto oom;
    s->p.logit_bias = NULL;
    if (p->n_logit_bias > 0) {
        for (int32_t i = 0; i < p->n_logit_bias; i++) {
            if (p->logit_bias[i].token < 0 || p->logit_bias[i].token >= n_vocab) {
                if (err && errlen)
                    snprintf(err, errlen, "logit_bias: token %d is not in [0, %d)",
                             p->logit_bias[i].token, n_vocab);
                smp_destroy(s);
                return -1;
            }
        }
        s->bias = malloc((size_t)p->n_logit_bias * sizeof *s->bias);
        if (!s->bias)
            goto oom;
        memcpy(s->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *s->bias);
        s->p.logit_bias = s->bias;
    }
    *out = s;
    return 0;
oom:
    smp_destroy(s);
    if (err && errlen)
        snprintf(err, errlen, "out of memory creating sampler");
    return -1;
}

void smp_destroy(smp_sampler *s)
{
    if (!s)
        return;
    free(s->cand);
    free(s->adj);
    free(s->counts);
    free(s->bias);
    free(s);
}

static int cand_desc(const void *a, const void *b)
{
    const smp_cand *x = a, *y = b;
    if (x->v > y->v)
        return -1;
    if (x->v < y->v)
        return 1;
    return (x->id > y->id) - (x->id < y->id); /* stable order on ties */
}

/* Moves the k largest candidates (by v) to the front, unordered
 * (quickselect, expected O(n)). */
static void select_top(smp_cand *c, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        smp_cand pivot = c[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (cand_desc(&c[i], &pivot) < 0)
                i++;
            while (cand_desc(&c[j], &pivot) > 0)
                j--;
            if (i <= j) {
                smp_cand t = c[i];
                c[i] = c[j];
                c[j] = t;
                i++;
                j--;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
}

/* Applies repetition / presence / frequency penalties into s->adj. */
static void apply_penalties(smp_sampler *s, const int32_t *hist, int n_hist)
{
    const smp_params *p = &s->p;
    if (!hist || n_hist <= 0)
        return;
    if (p->repeat_penalty != 1.0f) {
        int start = 0;
        if (p->repeat_last_n >= 0 && n_hist > p->repeat_last_n)
            start = n_hist - p->repeat_last_n;
        for (int i = start; i < n_hist; i++) {
            int32_t t = hist[i];
            if (t < 0 || t >= s->n_vocab || s->counts[t] < 0)
                continue;
            float *l = &s->adj[t];
            *l = *l > 0.0f ? *l / p->repeat_penalty : *l * p->repeat_penalty;
            s->counts[t] = -1; /* penalize each token once */
        }
        for (int i = start; i < n_hist; i++)
            if (hist[i] >= 0 && hist[i] < s->n_vocab)
                s->counts[hist[i]] = 0;
    }
    if (p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) {
        for (int i = 0; i < n_hist; i++)
            if (hist[i] >= 0 && hist[i] < s->n_vocab)
                s->counts[hist[i]]++;
        for (int i = 0; i < n_hist; i++) {
            int32_t t = hist[i];
            if (t < 0 || t >= s->n_vocab || s->counts[t] == 0)
                continue;
            s->adj[t] -= p->frequency_penalty * (float)s->counts[t] +
                         p->presence_penalty;
            s->counts[t] = 0;
        }
    }
}

int32_t smp_sample(smp_sampler *s, const float *logits, const int32_t *history,
                   int n_history, float *prob)
{
    const smp_params *p = &s->p;
    const int nv = s->n_vocab;
    memcpy(s->adj, logits, (size_t)nv * sizeof *s->adj);
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        const smp_bias *b = &s->bias[i];
        s->adj[b->token] = b->bias <= SMP_BIAS_MIN ? -INFINITY : s->adj[b->token] + b->bias;
    }
    apply_penalties(s, history, n_history);

    /* NaN logits are treated as -inf so they can never be chosen. */
    if (p->temperature == 0.0f) {
        int32_t best = 0;
        float bv = -INFINITY;
        for (int i = 0; i < nv; i++)
            if (s->adj[i] > bv) {
                bv = s->adj[i];
                best = i;
            }
        if (prob)
            *prob = 1.0f;
        return best;
    }

    smp_cand *c = s->cand;
    int n = 0;
    for (int i = 0; i < nv; i++) {
        float v = s->adj[i];
        if (isnan(v) || v == -INFINITY)
            continue;
        c[n].id = i;
        c[n].v = v / p->temperature;
        n++;
    }
    if (n == 0) {
        if (prob)
            *prob = 0.0f;
        return 0;
    }
    int sorted = 0;
    if (p->top_k > 0 && p->top_k < n) {
        select_top(c, n, p->top_k);
        n = p->top_k;
        qsort(c, (size_t)n, sizeof *c, cand_desc);
        sorted = 1;
    }
    /* softmax over the survivors */
    float mx = -INFINITY;
    for (int i = 0; i < n; i++)
        mx = c[i].v > mx ? c[i].v : mx;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        c[i].v = expf(c[i].v - mx);
        sum += c[i].v;
    }
    for (int i = 0; i < n; i++)
        c[i].v = (float)(c[i].v / sum);
    float pmax = (float)(1.0 / sum); /* the max had exp(0) = 1 */

    if (p->min_p > 0.0f) {
        float floor_p = p->min_p * pmax;
        int m = 0;
        for (int i = 0; i < n; i++)
            if (c[i].v >= floor_p)
                c[m++] = c[i];
        n = m;
    }
    if (p->top_p < 1.0f && n > 1) {
        if (!sorted) {
            /* Sort only tokens above a floor if they hold >= top_p mass:
             * the nucleus is then inside them, so the result is exact. */
            float floor_p = 1e-5f;
            int m = 0;
            double mass = 0.0;
            for (int i = 0; i < n; i++)
                if (c[i].v >= floor_p) {
                    smp_cand t = c[m];
                    c[m] = c[i];
                    c[i] = t;
                    mass += c[m].v;
                    m++;
                }
            if (mass >= p->top_p)
                n = m;
            qsort(c, (size_t)n, sizeof *c, cand_desc);
        }
        double cum = 0.0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += c[i].v;
            if (cum >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    double tot = 0.0;
    for (int i = 0; i < n; i++)
        tot += c[i].v;
    double r = (double)rng_uniform(&s->rng) * tot;
    double acc = 0.0;
    int pick = n - 1;
    for (int i = 0; i < n; i++) {
        acc += c[i].v;
        if (r < acc) {
            pick = i;
            break;
        }
    }
    if (prob)
        *prob = (float)(c[pick].v / tot);
    return c[pick].id;
}
