/*
 * test_eval_cmds.c - the evaluation subcommands as a user runs them, on the
 * tiny stories260K checkpoint and Moby-Dick:
 *   ablate  a 2-cell sweep writes CSV/JSON rows with sane values; a second
 *           run reruns nothing (files byte-identical); a lost or torn cell
 *           is rerun alone; malformed sweeps, unknown knobs, impossible
 *           combinations and budgets are refused with one line, exit 2;
 *   needle  prompts are deterministic (two dry runs dump identical files),
 *           hold the needle at increasing depths and fit the length; a small
 *           run scores both caches and a rerun asks nothing again;
 *   plots   bench/plots.sh turns the committed CSVs into PNGs (skipped
 *           without gnuplot).
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/test_util.h"

typedef struct {
    int status;
    char out[65536];
    char err[65536];
} run_result;

static run_result R;

static size_t slurp(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(buf, 1, cap - 1, f) : 0;
    buf[n] = '\0';
    if (f)
        fclose(f);
    return n;
}

/* Runs a shell command line (stdin /dev/null), capturing out and err. */
static void sh(run_result *r, const char *cmdline)
{
    char o[] = "/tmp/lkq_ev_outXXXXXX", e[] = "/tmp/lkq_ev_errXXXXXX";
    int fo = mkstemp(o), fe = mkstemp(e);
    cr_assert(fo >= 0 && fe >= 0);
    close(fo);
    close(fe);
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "( %s ) </dev/null >%s 2>%s", cmdline, o, e);
    int st = system(cmd);
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    slurp(o, r->out, sizeof r->out);
    slurp(e, r->err, sizeof r->err);
    unlink(o);
    unlink(e);
}

/* "livekvq ARGS" from the build directory. */
static void lkq(run_result *r, const char *args)
{
    const char *bd = getenv("LKQ_BUILDDIR");
    char cmd[12288];
    snprintf(cmd, sizeof cmd, "%s/livekvq %s", bd ? bd : "build", args);
    sh(r, cmd);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* The tiny model's path (copied: tu_shared's buffers rotate). */
static const char *stories(void)
{
    static char path[1024];
    snprintf(path, sizeof path, "%s", tu_shared("models/stories260K/stories260K.bin"));
    if (access(path, R_OK) != 0)
        cr_skip_test("stories260K not found (%s)", path);
    return path;
}

static char tmpdir[64];

static void make_tmp(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/lkq_evalXXXXXX");
    cr_assert(mkdtemp(tmpdir) != NULL);
}

static void rm_tmp(void)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    (void)system(cmd);
}

/* The base of the 2-cell sweep (stories260K: ctx 512, so small chunks). */
static void sweep_args(char *buf, size_t cap, const char *model, const char *extra)
{
    snprintf(buf, cap,
             "ablate -m %s -f %s -o %s/sw -c 256 --set chunk_size=128 --set block_tokens=64 "
             "--decode 8 -t 1 %s",
             model, tu_shared("data/moby-dick.txt"), tmpdir, extra);
}

Test(ablate, two_cells_then_resume, .init = make_tmp, .fini = rm_tmp, .timeout = 120)
{
    const char *m = stories();
    char args[4096], path[256];
    static char csv1[65536], csv2[65536], js[65536];
    sweep_args(args, sizeof args, m, "--vary warmup_chunks=0,1");
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.err, "2 to run") != NULL, "%s", R.err);
    cr_assert(strstr(R.err, "eta") != NULL, "progress line with ETA: %s", R.err);
    snprintf(path, sizeof path, "%s/sw/ablate.csv", tmpdir);
    slurp(path, csv1, sizeof csv1);
    cr_assert_eq(count_lines(csv1), 3, "header + 2 rows: %s", csv1);
    cr_assert(strncmp(csv1, "cell,label,ctx,", 15) == 0);
    cr_assert(strstr(csv1, "\"warmup_chunks=0\"") && strstr(csv1, "\"warmup_chunks=1\""));
    snprintf(path, sizeof path, "%s/sw/ablate.jsonl", tmpdir);
    slurp(path, js, sizeof js);
    cr_assert_eq(count_lines(js), 2);
    /* sane values: perplexity of the tiny model on Moby-Dick, INT4 bits */
    const char *p = strstr(js, "\"ppl\": ");
    cr_assert(p != NULL);
    double ppl = atof(p + 7);
    cr_assert(ppl > 1.0 && ppl < 1e5, "ppl %g", ppl);
    p = strstr(js, "\"bits_per_element\": ");
    double bits = atof(p + 20);
    cr_assert(bits > 3.0 && bits < 16.0, "bits %g", bits);
    cr_assert(strstr(js, "\"decode_ms_per_tok\": ") != NULL);
    snprintf(path, sizeof path, "%s/sw/layers.csv", tmpdir);
    slurp(path, js, sizeof js);
    cr_assert_eq(count_lines(js), 1 + 2 * 5, "5 layers per cell: %s", js);

    /* second run: nothing to do, same files */
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.err, "0 to run") != NULL, "%s", R.err);
    snprintf(path, sizeof path, "%s/sw/ablate.csv", tmpdir);
    slurp(path, csv2, sizeof csv2);
    cr_assert_str_eq(csv1, csv2);

    /* a torn cell (crash while writing its marker) is rerun alone */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "f=$(ls %s/sw/cells/*.json | head -n1); head -c 20 \"$f\" > "
             "\"$f.x\" && mv \"$f.x\" \"$f\"", tmpdir);
    sh(&R, cmd);
    cr_assert_eq(R.status, 0, "%s", R.err);
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.err, "1 finished earlier, 1 to run") != NULL, "%s", R.err);
    slurp(path, csv2, sizeof csv2);
    cr_assert_eq(count_lines(csv2), 3, "%s", csv2);

    /* a larger sweep in the same directory reuses the finished cells */
    sweep_args(args, sizeof args, m, "--vary warmup_chunks=0,1 --dry-run");
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.out, "2 cells, 0 to run") != NULL, "%s", R.out);
    sweep_args(args, sizeof args, m, "--vary warmup_chunks=0,1,2 --dry-run");
    lkq(&R, args);
    cr_assert(strstr(R.out, "3 cells, 1 to run") != NULL, "%s", R.out);
}

/* Runs a sweep that must be refused: exit 2, one line containing want. */
static void refused(const char *model, const char *extra, const char *want)
{
    char args[4096];
    sweep_args(args, sizeof args, model, extra);
    lkq(&R, args);
    cr_assert_eq(R.status, 2, "%s -> %d: %s", extra, R.status, R.err);
    cr_assert_eq(count_lines(R.err), 1, "one line for %s: %s", extra, R.err);
    cr_assert(strstr(R.err, want) != NULL, "%s: want '%s' in: %s", extra, want, R.err);
}

Test(ablate, refuses_bad_sweeps, .init = make_tmp, .fini = rm_tmp, .timeout = 60)
{
    const char *m = stories();
    refused(m, "--vary chunk_size", "expected KNOB=V1,V2");
    refused(m, "--vary frobs=1,2", "unknown knob 'frobs'");
    refused(m, "--vary chunk_size=128,,256", "empty item");
    refused(m, "--vary chunk_size=128,", "empty item");
    refused(m, "--vary chunk_size=", "no values");
    refused(m, "--vary chunk_size=abc", "chunk_size");
    refused(m, "--vary ema_decay=0.5,1.5", "ema_decay");
    refused(m, "--vary warmup_chunks=1,1", "listed twice");
    refused(m, "--vary sink_tokens=0 --vary sink-tokens=4", "already varied");
    refused(m, "--vary chunk_size=96", "multiple of block_tokens");
    refused(m, "--vary ctx=4096", "exceeds the model");
    refused(m, "--vary kv_budget=10K", "impossible budget");
    refused(m, "--vary kv_budget=100t", "impossible budget");
    refused(m, "--vary v_group=5", "v_group");
    refused(m, "--design zigzag", "grid or oat");
    refused(m, "--vary chunk_size=64,128 --vary sink_tokens=0,1,2,3 --max-cells 4",
            "more than 4 cells");
    refused(m, "--bogus", "unknown option");
    /* nothing was run: no results */
    char path[256];
    snprintf(path, sizeof path, "%s/sw/ablate.csv", tmpdir);
    cr_assert(access(path, F_OK) != 0);
}

static void needle_args(char *buf, size_t cap, const char *model, const char *out,
                        const char *extra)
{
    snprintf(buf, cap,
             "needle -m %s -f %s -o %s --lengths 256,384 --depths 0,50,100 --trials 2 "
             "--plain -t 1 %s",
             model, tu_shared("data/moby-dick.txt"), out, extra);
}

Test(needle, prompts_are_deterministic, .init = make_tmp, .fini = rm_tmp, .timeout = 60)
{
    const char *m = stories();
    char args[4096], a[128], b[128];
    snprintf(a, sizeof a, "%s/a", tmpdir);
    snprintf(b, sizeof b, "%s/b", tmpdir);
    needle_args(args, sizeof args, m, a, "--dry-run --dump-prompts -q");
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    needle_args(args, sizeof args, m, b, "--dry-run --dump-prompts -q");
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "diff -r %s/prompts %s/prompts && ls %s/prompts | wc -l", a, b, a);
    sh(&R, cmd);
    cr_assert_eq(R.status, 0, "prompts differ: %s", R.out);
    cr_assert_eq(atoi(R.out), 2 * 3 * 2, "%s / %s", R.out, cmd);
    /* the needle is there, deeper for larger depths, and the prompt fits */
    static char p0[65536], p50[65536], p100[65536];
    char path[600];
    snprintf(path, sizeof path, "%s/prompts/passkey_384_000_1.txt", a);
    slurp(path, p0, sizeof p0);
    snprintf(path, sizeof path, "%s/prompts/passkey_384_050_1.txt", a);
    slurp(path, p50, sizeof p50);
    snprintf(path, sizeof path, "%s/prompts/passkey_384_100_1.txt", a);
    slurp(path, p100, sizeof p100);
    char key[16];
    int ntok = 0;
    cr_assert_eq(sscanf(p50, "# answer %15[0-9], %d tokens", key, &ntok), 2, "%s", p50);
    cr_assert(ntok <= 384 - 16 && ntok > 300, "%d tokens", ntok);
    char needle[64];
    snprintf(needle, sizeof needle, "The pass key is %s.", key);
    const char *n50 = strstr(p50, needle);
    cr_assert(n50 != NULL, "needle missing: %s", p50);
    const char *n0 = strstr(p0, "The pass key is "), *n100 = strstr(p100, "The pass key is ");
    cr_assert(n0 && n100);
    double f0 = (double)(n0 - p0) / strlen(p0), f50 = (double)(n50 - p50) / strlen(p50),
           f100 = (double)(n100 - p100) / strlen(p100);
    /* the instruction comes first, the question last: depth 0 is just after
     * the instruction, 100 just before the question */
    cr_assert(f0 < 0.35 && f0 < f50 && f50 < f100 && f100 > 0.8, "%g %g %g", f0, f50, f100);
    cr_assert(strstr(p50, "What is the pass key?") != NULL);
    /* another seed, other prompts */
    needle_args(args, sizeof args, m, b, "--dry-run --dump-prompts -q --seed 99");
    lkq(&R, args);
    snprintf(cmd, sizeof cmd, "diff -q %s/prompts/passkey_256_050_0.txt "
             "%s/prompts/passkey_256_050_0.txt", a, b);
    sh(&R, cmd);
    cr_assert_neq(R.status, 0, "seed 99 gave the same prompt");
}

Test(needle, runs_both_caches_and_resumes, .init = make_tmp, .fini = rm_tmp, .timeout = 120)
{
    const char *m = stories();
    char args[4096], out[128], path[600];
    static char csv1[65536], csv2[65536];
    snprintf(out, sizeof out, "%s/n", tmpdir);
    needle_args(args, sizeof args, m, out, "--set chunk_size=128 --set block_tokens=64");
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.out, "fp16 cache") && strstr(R.out, "int4 cache"), "%s", R.out);
    cr_assert(strstr(R.out, "| 256 |") && strstr(R.out, "overall int4:"), "%s", R.out);
    snprintf(path, sizeof path, "%s/needle.csv", out);
    slurp(path, csv1, sizeof csv1);
    cr_assert_eq(count_lines(csv1), 1 + 2 * 2 * 3 * 2, "%s", csv1);
    snprintf(path, sizeof path, "%s/needle_summary.csv", out);
    slurp(path, csv2, sizeof csv2);
    cr_assert_eq(count_lines(csv2), 1 + 2 * 2 * 3, "%s", csv2);
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.err, "24 in") && strstr(R.err, "0 prompt tokens to run"), "%s", R.err);
    snprintf(path, sizeof path, "%s/needle.csv", out);
    slurp(path, csv2, sizeof csv2);
    cr_assert_str_eq(csv1, csv2, "a rerun adds nothing");
    /* a run with other lengths into the same directory: only its answers run,
     * the summary covers both runs (the rows of earlier runs once overflowed
     * a buffer sized for the new run) */
    snprintf(args, sizeof args,
             "needle -m %s -f %s -o %s --lengths 200 --depths 0,100 --trials 1 --plain -t 1 "
             "--set chunk_size=128 --set block_tokens=64", m, tu_shared("data/moby-dick.txt"), out);
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "%s", R.err);
    cr_assert(strstr(R.err, "4 answers, 0 in"), "%s", R.err);
    cr_assert(strstr(R.out, "| 200 |") && strstr(R.out, "| 384 |"), "%s", R.out);
    snprintf(path, sizeof path, "%s/needle.csv", out);
    slurp(path, csv2, sizeof csv2);
    cr_assert_eq(count_lines(csv2), count_lines(csv1) + 4, "%s", csv2);
    snprintf(path, sizeof path, "%s/needle_summary.csv", out);
    slurp(path, csv2, sizeof csv2);
    /* (256, 384) x (0, 50, 100) + 200 x (0, 100), both caches */
    cr_assert_eq(count_lines(csv2), 1 + 2 * (2 * 3 + 2), "%s", csv2);
    cr_assert(strstr(csv2, "passkey,fp16,384,50,2,") && strstr(csv2, "passkey,int4,200,100,1,"),
              "%s", csv2);
    /* bad input */
    needle_args(args, sizeof args, m, out, "--depths 0,150");
    lkq(&R, args);
    cr_assert_eq(R.status, 2);
    cr_assert(strstr(R.err, "--depths") && count_lines(R.err) == 1, "%s", R.err);
    needle_args(args, sizeof args, m, out, "--kv-cache fp16,fp16");
    lkq(&R, args);
    cr_assert_eq(R.status, 2, "%s", R.err);
    needle_args(args, sizeof args, m, out, "--variant haystack");
    lkq(&R, args);
    cr_assert_eq(R.status, 2, "%s", R.err);
}

Test(plots, pngs_from_committed_csvs, .init = make_tmp, .fini = rm_tmp, .timeout = 120)
{
    if (system("command -v gnuplot >/dev/null 2>&1") != 0)
        cr_skip_test("gnuplot not installed (apt-get install gnuplot-nox)");
    char cmd[4096], src[1024];
    snprintf(src, sizeof src, "%s", tu_src("."));
    snprintf(cmd, sizeof cmd, "%s/bench/plots.sh %s/docs/data %s", src, src, tmpdir);
    sh(&R, cmd);
    cr_assert_eq(R.status, 0, "%s%s", R.out, R.err);
    snprintf(cmd, sizeof cmd, "ls %s/*.png | wc -l", tmpdir);
    sh(&R, cmd);
    cr_assert_geq(atoi(R.out), 5, "%s", R.out);
    static const char *const want[] = {"pareto", "quality_vs_ctx", "memory_vs_ctx",
                                       "ema_per_layer", "outliers_per_layer"};
    for (int i = 0; i < 5; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s.png", tmpdir, want[i]);
        struct stat st;
        cr_assert(stat(path, &st) == 0 && st.st_size > 2000, "%s missing or empty", path);
        unsigned char sig[8] = {0};
        FILE *f = fopen(path, "rb");
        cr_assert(f && fread(sig, 1, 8, f) == 8);
        fclose(f);
        cr_assert(sig[0] == 0x89 && sig[1] == 'P' && sig[2] == 'N' && sig[3] == 'G', "%s", path);
    }
}

/* --device on the three evaluation commands: cpu runs, a name that is no
 * device is refused at parsing (exit 2), and cuda without a usable CUDA
 * backend or device fails with one line that says so (exit 1). */
Test(device, eval_commands_take_device, .init = make_tmp, .fini = rm_tmp, .timeout = 120)
{
    const char *m = stories(), *txt = tu_shared("data/moby-dick.txt");
    char args[4096];
    snprintf(args, sizeof args, "profile -m %s -f %s -c 64 -n 2 -t 1 --device cpu", m, txt);
    lkq(&R, args);
    cr_assert_eq(R.status, 0, "profile --device cpu: %s", R.err);
    cr_assert(strstr(R.out, "int4:") != NULL, "%s", R.out);
    const char *cmds[] = {"profile -c 64 -n 2", "ablate -o %s/ab -c 64 --vary sink_tokens=0,4",
                          "needle -o %s/nd --lengths 256 --depths 0 --trials 1"};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        char c[512];
        snprintf(c, sizeof c, cmds[i], tmpdir);
        snprintf(args, sizeof args, "%s -m %s -f %s -t 1 --device tpu", c, m, txt);
        lkq(&R, args);
        cr_assert_eq(R.status, 2, "%s: exit %d (%s)", c, R.status, R.err);
        cr_assert(strstr(R.err, "--device expects cpu or cuda, got 'tpu'") != NULL, "%s", R.err);
        cr_assert_eq(count_lines(R.err), 1, "%s", R.err);
        if (getenv("LKQ_HAVE_GPU"))
            continue; /* a real device would run it */
        snprintf(args, sizeof args, "%s -m %s -f %s -t 1 --device cuda", c, m, txt);
        lkq(&R, args);
        cr_assert_neq(R.status, 0, "%s --device cuda ran without a GPU", c);
        cr_assert(strstr(R.err, "cuda") != NULL || strstr(R.err, "CUDA") != NULL, "%s", R.err);
        cr_assert(R.status < 128, "%s crashed: %s", c, R.err);
    }
}
