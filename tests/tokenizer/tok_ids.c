/*
 * tok_ids.c - test-only helper: prints the token ids our tokenizer gives
 * for a text, with the tokenizer built from a GGUF's metadata alone (no
 * tensors are read, so it works on files whose weight types the loader does
 * not take yet). tests/golden/make_gemma3_golden.py uses it so that a
 * golden file holds exactly the ids the engine would feed itself.
 *
 * usage: tok_ids GGUF TEXTFILE [--bos]   -> ids on one line, space separated
 * Single-threaded; exit 0, or 1 with one line on stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/tokenizer/tok_test_util.h"

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "--bos"))) {
        fprintf(stderr, "usage: tok_ids GGUF TEXTFILE [--bos]\n");
        return 1;
    }
    tt_vocab v;
    if (tt_load_gguf_vocab(argv[1], &v) < 0) {
        fprintf(stderr, "tok_ids: cannot read the vocabulary of %s\n", argv[1]);
        return 1;
    }
    tok_tokenizer *t = NULL;
    char err[256];
    if (tok_create(&v.d, &t, err, sizeof err) < 0) {
        fprintf(stderr, "tok_ids: %s\n", err);
        tt_vocab_free(&v);
        return 1;
    }
    tt_vocab_free(&v);
    size_t n = 0;
    char *text = tt_read(argv[2], &n);
    int rc = 1, n_ids = 0;
    int32_t *ids = text ? tt_encode(t, text, n, argc == 4, 0, &n_ids) : NULL;
    if (!ids) {
        fprintf(stderr, "tok_ids: cannot read or encode %s\n", argv[2]);
    } else {
        for (int i = 0; i < n_ids; i++)
            printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        rc = 0;
    }
    free(ids);
    free(text);
    tok_destroy(t);
    return rc;
}
