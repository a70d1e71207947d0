/*
 * moby_tokens.h - the engine tests' real text: Moby-Dick from its line
 * "CHAPTER 1." (../shared/data/moby-dick.txt, its first 40 KB), tokenized
 * with the model's tokenizer (BOS per the model). Criterion asserts; one
 * translation unit per test program.
 */
#ifndef LKQ_TEST_MOBY_TOKENS_H
#define LKQ_TEST_MOBY_TOKENS_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/model.h"
#include "tests/test_util.h"

/* At least want tokens (asserted); caller frees. *n_out: all of them. */
static int32_t *moby_tokens(const mdl_model *m, int want, int *n_out)
{
    FILE *f = fopen(tu_shared("data/moby-dick.txt"), "rb");
    cr_assert_not_null(f);
    static char buf[40000];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = '\0';
    const char *from = strncmp(buf, "CHAPTER 1.", 10) == 0 ? buf : strstr(buf, "\nCHAPTER 1.");
    cr_assert_not_null(from);
    int32_t *ids = malloc(sizeof(int32_t) * 60000);
    int n = 0;
    cr_assert_eq(tok_encode(m->tok, from, strlen(from), tok_default_add_bos(m->tok), 0, ids,
                            60000, &n), 0);
    cr_assert_geq(n, want);
    *n_out = n;
    return ids;
}

#endif
