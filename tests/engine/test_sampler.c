/*
 * test_sampler.c - sampling: greedy, seeds, top-k/top-p/min-p filters,
 * penalties, temperature, validation, NaN logits, logit bias.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "engine/sample/sampler.h"

#define NV 8

static smp_sampler *mk(smp_params p)
{
    smp_sampler *s = NULL;
    char err[128];
    cr_assert_eq(smp_create(&p, NV, &s, err, sizeof err), 0, "%s", err);
    return s;
}

static const float logits[NV] = {1.0f, 3.0f, 2.0f, 0.5f, -1.0f, 2.9f, 0.0f, -3.0f};

Test(sampler, greedy_picks_argmax)
{
    smp_params p = smp_default_params();
    p.temperature = 0.0f;
    smp_sampler *s = mk(p);
    float pr = 0;
    cr_assert_eq(smp_sample(s, logits, NULL, 0, &pr), 1);
    cr_assert_float_eq(pr, 1.0f, 1e-6);
    smp_destroy(s);
}

Test(sampler, same_seed_same_tokens)
{
    smp_params p = smp_default_params();
    p.seed = 1234;
    smp_sampler *a = mk(p), *b = mk(p);
    int differ_from_greedy = 0;
    for (int i = 0; i < 200; i++) {
        int32_t x = smp_sample(a, logits, NULL, 0, NULL);
        int32_t y = smp_sample(b, logits, NULL, 0, NULL);
        cr_assert_eq(x, y);
        differ_from_greedy += x != 1;
    }
    cr_assert_gt(differ_from_greedy, 20, "temperature 1 must not be greedy");
    smp_destroy(a);
    smp_destroy(b);
}

Test(sampler, different_seed_different_stream)
{
    smp_params p = smp_default_params();
    p.seed = 1;
    smp_sampler *a = mk(p);
    p.seed = 2;
    smp_sampler *b = mk(p);
    int same = 0;
    for (int i = 0; i < 100; i++)
        same += smp_sample(a, logits, NULL, 0, NULL) == smp_sample(b, logits, NULL, 0, NULL);
    cr_assert_lt(same, 100);
    smp_destroy(a);
    smp_destroy(b);
}

Test(sampler, top_k_limits_support)
{
    smp_params p = smp_default_params();
    p.top_k = 2;
    p.seed = 7;
    smp_sampler *s = mk(p);
    int seen[NV] = {0};
    for (int i = 0; i < 2000; i++)
        seen[smp_sample(s, logits, NULL, 0, NULL)]++;
    for (int i = 0; i < NV; i++)
        if (i != 1 && i != 5)
            cr_assert_eq(seen[i], 0, "token %d outside top-2 sampled", i);
    cr_assert_gt(seen[1], 0);
    cr_assert_gt(seen[5], 0);
    /* p(1)/p(5) = e^0.1 = 1.105: both near half */
    cr_assert(seen[1] > 800 && seen[1] < 1300, "seen[1]=%d", seen[1]);
    smp_destroy(s);
}

Test(sampler, top_p_nucleus)
{
    /* probs of logits: sorted 1 (3.0), 5 (2.9), 2 (2.0) ... top_p 0.5 keeps
     * {1, 5}; p(1) alone is ~0.36 < 0.5 */
    smp_params p = smp_default_params();
    p.top_p = 0.5f;
    p.seed = 3;
    smp_sampler *s = mk(p);
    int seen[NV] = {0};
    for (int i = 0; i < 2000; i++)
        seen[smp_sample(s, logits, NULL, 0, NULL)]++;
    for (int i = 0; i < NV; i++)
        if (i != 1 && i != 5)
            cr_assert_eq(seen[i], 0, "token %d outside nucleus", i);
    smp_destroy(s);
}

Test(sampler, min_p_filters_relative_to_max)
{
    smp_params p = smp_default_params();
    p.min_p = 0.5f; /* keep p >= 0.5 * p(1): logit >= 3 - ln 2 = 2.31 */
    p.seed = 9;
    smp_sampler *s = mk(p);
    for (int i = 0; i < 1000; i++) {
        int32_t t = smp_sample(s, logits, NULL, 0, NULL);
        cr_assert(t == 1 || t == 5, "token %d below min-p", t);
    }
    smp_destroy(s);
}

Test(sampler, low_temperature_is_nearly_greedy)
{
    smp_params p = smp_default_params();
    p.temperature = 0.01f;
    smp_sampler *s = mk(p);
    for (int i = 0; i < 200; i++)
        cr_assert_eq(smp_sample(s, logits, NULL, 0, NULL), 1);
    smp_destroy(s);
}

Test(sampler, repetition_penalty_changes_argmax)
{
    smp_params p = smp_default_params();
    p.temperature = 0.0f;
    p.repeat_penalty = 1.5f; /* 3.0 / 1.5 = 2.0 < 2.9 */
    smp_sampler *s = mk(p);
    int32_t hist[] = {1, 1, 1};
    cr_assert_eq(smp_sample(s, logits, hist, 3, NULL), 5);
    /* outside the window: no effect */
    smp_destroy(s);
    p.repeat_last_n = 1;
    s = mk(p);
    int32_t hist2[] = {1, 4};
    cr_assert_eq(smp_sample(s, logits, hist2, 2, NULL), 1);
    smp_destroy(s);
}

Test(sampler, presence_and_frequency_penalties)
{
    smp_params p = smp_default_params();
    p.temperature = 0.0f;
    p.frequency_penalty = 0.05f; /* 3.0 - 3*0.05 = 2.85 < 2.9 */
    smp_sampler *s = mk(p);
    int32_t hist[] = {1, 1, 1};
    cr_assert_eq(smp_sample(s, logits, hist, 3, NULL), 5);
    int32_t hist1[] = {1};
    cr_assert_eq(smp_sample(s, logits, hist1, 1, NULL), 1); /* 2.95 > 2.9 */
    smp_destroy(s);
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.2f;
    s = mk(p);
    cr_assert_eq(smp_sample(s, logits, hist1, 1, NULL), 5);
    smp_destroy(s);
}

Test(sampler, nan_logits_never_chosen)
{
    float l[NV];
    for (int i = 0; i < NV; i++)
        l[i] = NAN;
    l[3] = 0.0f;
    smp_params p = smp_default_params();
    smp_sampler *s = mk(p);
    for (int i = 0; i < 50; i++)
        cr_assert_eq(smp_sample(s, l, NULL, 0, NULL), 3);
    smp_destroy(s);
    p.temperature = 0.0f;
    s = mk(p);
    cr_assert_eq(smp_sample(s, l, NULL, 0, NULL), 3);
    smp_destroy(s);
}

Test(sampler, validation_rejects_bad_params)
{
    char err[128];
    smp_params p = smp_default_params();
    p.temperature = -1.0f;
    cr_assert_lt(smp_validate(&p, err, sizeof err), 0);
    cr_assert(strstr(err, "temperature") != NULL);
    p = smp_default_params();
    p.top_p = 0.0f;
    cr_assert_lt(smp_validate(&p, err, sizeof err), 0);
    p = smp_default_params();
    p.top_p = NAN;
    cr_assert_lt(smp_validate(&p, err, sizeof err), 0);
    p = smp_default_params();
    p.top_k = -3;
    cr_assert_lt(smp_validate(&p, err, sizeof err), 0);
    p = smp_default_params();
    p.presence_penalty = 3.0f;
    cr_assert_lt(smp_validate(&p, err, sizeof err), 0);
    smp_sampler *s = NULL;
    p = smp_default_params();
    cr_assert_lt(smp_create(&p, 0, &s, err, sizeof err), 0);
    cr_assert_null(s);
}

/* OpenAI logit_bias: added to the logits before everything else; -100
 * bans; the caller's array is copied; bad entries are refused. */
Test(sampler, logit_bias)
{
    smp_params p = smp_default_params();
    p.temperature = 0.0f;
    smp_bias b[2] = {{4, 100.0f}, {1, -100.0f}};
    p.logit_bias = b;
    p.n_logit_bias = 1;
    smp_sampler *s = mk(p);
    b[0].token = 7; /* the sampler holds its own copy */
    cr_assert_eq(smp_sample(s, logits, NULL, 0, NULL), 4, "+100 makes token 4 win");
    smp_destroy(s);
    /* -100 bans the argmax (1): the runner-up (5) wins, even against +1e30
     * logits a ban is a ban */
    b[0] = (smp_bias){1, -100.0f};
    p.n_logit_bias = 1;
    s = mk(p);
    float big[NV];
    memcpy(big, logits, sizeof big);
    big[1] = 1e30f;
    cr_assert_eq(smp_sample(s, big, NULL, 0, NULL), 5);
    smp_destroy(s);
    /* sampled: a banned token is never drawn, a +5 token dominates */
    b[0] = (smp_bias){1, -100.0f};
    b[1] = (smp_bias){6, 5.0f};
    p.n_logit_bias = 2;
    p.temperature = 1.0f;
    p.seed = 7;
    s = mk(p);
    int n6 = 0;
    for (int i = 0; i < 500; i++) {
        int32_t t = smp_sample(s, logits, NULL, 0, NULL);
        cr_assert_neq(t, 1, "a banned token was drawn");
        n6 += t == 6;
    }
    cr_assert_gt(n6, 250, "token 6 (logit 0 + 5) drawn %d of 500 times", n6);
    smp_destroy(s);
    /* refused: a token outside the vocabulary, a value outside [-100, 100] */
    char err[128];
    b[0] = (smp_bias){NV, 1.0f};
    p.n_logit_bias = 1;
    s = NULL;
    cr_assert_lt(smp_create(&p, NV, &s, err, sizeof err), 0);
    cr_assert_null(s);
    cr_assert(strstr(err, "logit_bias") != NULL, "%s", err);
    b[0] = (smp_bias){2, 100.5f};
    cr_assert_lt(smp_validate(&p, err, sizeof err), 0);
    b[0] = (smp_bias){2, NAN};
    cr_assert_lt(smp_create(&p, NV, &s, err, sizeof err), 0);
}

Test(sampler, rng_is_splitmix64)
{
    uint64_t st = 0;
    /* first outputs of splitmix64 seeded with 0 */
    cr_assert_eq(smp_rng_next(&st), 0xe220a8397b1dcdafull);
    cr_assert_eq(smp_rng_next(&st), 0x6e789e6aa1b965f4ull);
}
