/*
 * test_cli.c - the livekvq binary as a user runs it: help, tokenize,
 * generate (known-good text, seeds), and bad input (missing or wrong model
 * files, bad options, prompt over the context, non-UTF-8 prompt): each a
 * clear message and the documented exit status, never a crash.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/test_util.h"

typedef struct {
    int status;  /* exit status, or 128+signal */
    char out[65536];
    char err[65536];
} run_result;

static void slurp(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(buf, 1, cap - 1, f) : 0;
    buf[n] = '\0';
    if (f)
        fclose(f);
}

/* Runs "livekvq ARGS" through sh with stdin from in (or /dev/null). */
static void run(run_result *r, const char *args, const char *in)
{
    const char *bd = getenv("LKQ_BUILDDIR");
    char o[] = "/tmp/lkq_cli_outXXXXXX", e[] = "/tmp/lkq_cli_errXXXXXX";
    int fo = mkstemp(o), fe = mkstemp(e);
    cr_assert(fo >= 0 && fe >= 0);
    close(fo);
    close(fe);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s%s/livekvq %s <%s >%s 2>%s",
             in ? "printf '%s' \"$LKQ_IN\" | " : "", bd ? bd : "build", args,
             in ? "/dev/stdin" : "/dev/null", o, e);
    if (in)
        setenv("LKQ_IN", in, 1);
    int st = system(cmd);
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    slurp(o, r->out, sizeof r->out);
    slurp(e, r->err, sizeof r->err);
    unlink(o);
    unlink(e);
}

static run_result R;

Test(cli, help_and_usage)
{
    run(&R, "--help", NULL);
    cr_assert_eq(R.status, 0);
    cr_assert(strstr(R.out, "generate") && strstr(R.out, "tokenize"));
    run(&R, "generate --help", NULL);
    cr_assert_eq(R.status, 0);
    cr_assert(strstr(R.out, "--top-p") != NULL);
    run(&R, "", NULL);
    cr_assert_eq(R.status, 2);
    run(&R, "frobnicate", NULL);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "unknown command") != NULL, "%s", R.err);
    run(&R, "generate -p hi", NULL);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "-m MODEL is required") != NULL, "%s", R.err);
    run(&R, "generate -m x --bogus", NULL);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "unknown option") != NULL, "%s", R.err);
    run(&R, "generate -m x -n abc", NULL);
    cr_assert_eq(R.status, 2);
    run(&R, "generate -m x --temp -1", NULL);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "temperature") != NULL, "%s", R.err);
}

Test(cli, tokenize_llama2c)
{
    char args[2048];
    snprintf(args, sizeof args, "tokenize -m %s -p 'Once upon a time'",
             tu_shared("models/stories15M/stories15M.bin"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert_str_eq(R.out, "1 9038 2501 263 931\n");
}

Test(cli, generate_greedy_known_good, .timeout = 120)
{
    char args[2048];
    snprintf(args, sizeof args, "generate -m %s -p 'Once upon a time' -n 24 --temp 0",
             tu_shared("models/stories15M/stories15M.bin"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strncmp(R.out, ", there was a little girl named Lily. She loved to play outside",
                      60) == 0, "got: %s", R.out);
    cr_assert(strstr(R.err, "tok/s") != NULL, "timings go to stderr: %s", R.err);
}

Test(cli, prompt_from_stdin_and_seed_reproducible, .timeout = 120)
{
    char args[2048];
    snprintf(args, sizeof args, "generate -m %s -n 30 --temp 1 --seed 42 -q",
             tu_shared("models/stories260K/stories260K.bin"));
    run(&R, args, "Once upon a time");
    cr_assert_eq(R.status, 0, "%s", R.err);
    char first[65536];
    strcpy(first, R.out);
    cr_assert_gt(strlen(first), 10);
    run(&R, args, "Once upon a time");
    cr_assert_str_eq(R.out, first, "same seed, same text");
    snprintf(args, sizeof args, "generate -m %s -n 30 --temp 1 --seed 43 -q",
             tu_shared("models/stories260K/stories260K.bin"));
    run(&R, args, "Once upon a time");
    cr_assert_str_neq(R.out, first, "another seed, another text");
}

Test(cli, bad_model_files)
{
    run(&R, "generate -m /nonexistent/model.gguf -p hi", NULL);
    cr_assert_eq(R.status, 1);
    cr_assert(strstr(R.err, "/nonexistent/model.gguf") != NULL, "%s", R.err);
    char args[2048];
    snprintf(args, sizeof args, "generate -m %s -p hi", tu_shared("data/moby-dick.txt"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 1, "%s", R.err);
    cr_assert_gt(strlen(R.err), 10);
    cr_assert(strchr(R.err, '\n') == R.err + strlen(R.err) - 1, "one line: %s", R.err);
    snprintf(args, sizeof args, "generate -m %s -p hi", tu_shared("models"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 1, "%s", R.err);
    snprintf(args, sizeof args, "generate -m %s --tokenizer /nonexistent/tok.bin -p hi",
             tu_shared("models/stories260K/stories260K.bin"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 1, "%s", R.err);
    cr_assert(strstr(R.err, "/nonexistent/tok.bin") != NULL, "%s", R.err);
}

Test(cli, prompt_longer_than_context)
{
    char args[2048];
    snprintf(args, sizeof args,
             "generate -m %s -c 8 -p 'Once upon a time there was a very long story indeed'",
             tu_shared("models/stories260K/stories260K.bin"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 1);
    cr_assert(strstr(R.err, "prompt is") && strstr(R.err, "context"), "%s", R.err);
}

Test(cli, non_utf8_prompt_is_handled, .timeout = 60)
{
    char path[] = "/tmp/lkq_cli_badutf8XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    const char bytes[] = "\xff\xfe abc \xc3 \xe2\x82 end \xc3";
    cr_assert_eq(write(fd, bytes, sizeof bytes - 1), (ssize_t)(sizeof bytes - 1));
    close(fd);
    char args[2048];
    snprintf(args, sizeof args, "generate -m %s -n 8 --temp 0 -q -f %s",
             tu_shared("models/stories260K/stories260K.bin"), path);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 0, "%s", R.err);
    snprintf(args, sizeof args, "tokenize -m %s -f %s",
             tu_shared("models/stories15M/stories15M.bin"), path);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert_gt(strlen(R.out), 4);
    unlink(path);
}

Test(cli, perplexity_json_last_line, .timeout = 120)
{
    char args[2048];
    snprintf(args, sizeof args,
             "perplexity -m %s -f %s -c 256 --chunk-size 64 --block-tokens 32 -q --json",
             tu_shared("models/stories260K/stories260K.bin"), tu_shared("data/moby-dick.txt"));
    run(&R, args, NULL);
    cr_assert_eq(R.status, 0, "%s", R.err);
    char *last = R.out + strlen(R.out) - 1;
    cr_assert_eq(*last, '\n');
    *last = '\0';
    char *line = strrchr(R.out, '\n');
    line = line ? line + 1 : R.out;
    cr_assert_eq(line[0], '{', "%s", line);
    const char *keys[] = {"\"ppl\":", "\"kld\":", "\"top1_agree\":", "\"bits_per_element\":",
                          "\"kv_bytes\":", "\"n_tokens\": 255"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        cr_assert(strstr(line, keys[i]) != NULL, "missing %s in %s", keys[i], line);
}

Test(cli, cache_knobs_are_validated)
{
    char args[2048];
    const char *m = tu_shared("models/stories260K/stories260K.bin");
    snprintf(args, sizeof args, "generate -m %s -p hi --chunk-size 0", m);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "chunk_size") != NULL, "%s", R.err);
    snprintf(args, sizeof args, "generate -m %s -p hi --chunk-size 300", m);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "not a multiple of block_tokens") != NULL, "%s", R.err);
    snprintf(args, sizeof args, "generate -m %s -p hi --kv-cache int5", m);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 2);
    /* code widths: outside {2, 3, 4, 8}, or int3 with groups not of 8 codes:
     * one line, exit 2 */
    static const char *bad_bits[][2] = {
        { "--k-bits 5", "2, 3, 4 or 8" }, { "--v-bits 1", "2, 3, 4 or 8" },
        { "--kv-cache int3 --v-group 12", "multiple of 8" },
    };
    for (int i = 0; i < 3; i++) {
        snprintf(args, sizeof args, "perplexity -m %s -f /dev/null -c 64 %s", m, bad_bits[i][0]);
        run(&R, args, NULL);
        cr_assert_eq(R.status, 2, "%s: %s", bad_bits[i][0], R.err);
        cr_assert(strstr(R.err, bad_bits[i][1]) != NULL, "%s: %s", bad_bits[i][0], R.err);
        cr_assert_eq(strchr(R.err, '\n'), R.err + strlen(R.err) - 1, "one line: %s", R.err);
    }
    snprintf(args, sizeof args, "generate -m %s -p 'Once upon a time' -n 4 --temp 0 -q "
             "--kv-cache int3 --chunk-size 64 --block-tokens 32", m);
    run(&R, args, NULL); /* stories260K: head_dim 8, one group of 8 */
    cr_assert_eq(R.status, 0, "%s", R.err);
    snprintf(args, sizeof args, "generate -m %s -p hi --v-group 48", m);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 1, "v_group must divide head_dim 8: %s", R.err);
    cr_assert(strstr(R.err, "v_group") != NULL, "%s", R.err);
    snprintf(args, sizeof args, "generate -m %s -p 'Once upon a time' -n 8 --temp 0 -q "
             "--kv-cache int4 --chunk-size 64 --block-tokens 32", m);
    run(&R, args, NULL);
    cr_assert_eq(R.status, 0, "%s", R.err);
}
