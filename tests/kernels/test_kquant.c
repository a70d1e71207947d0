/*
 * test_kquant.c - dequantization of the weight types Q5_0, Q5_1, Q8_0,
 * Q4_K, Q5_K, Q6_K against the official `gguf` Python package
 * (gguf.quants.dequantize), through goldens made by
 * tests/golden/make_kquant_golden.py:
 *  - kquant_gemma.txt: real tensors of Gemma-3-270M Q4_K_M (Q5_0, Q4_K,
 *    Q6_K, Q8_0), read from the model file at the recorded offsets - the
 *    file is $LKQ_GEMMA, else $LKQ_MODELS/gemma-3-270m-q4_k_m.gguf, else
 *    ~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf (scripts/setup.sh); the test
 *    skips without it;
 *  - kquant_synth.txt: small tensors with their bytes inline (Q5_1 from
 *    gguf's quantizer, random blocks of Q5_0, Q5_1, Q4_K, Q5_K, Q6_K).
 * Expected: bit exact. Every one of these formats dequantizes with f32
 * products and one f32 addition / subtraction (d*(q-16), d*q + m,
 * (d*sc)*q - dmin*m, (d*sc)*(q-32), d*q), which numpy evaluates in the same
 * order with the same IEEE rounding, so kref_dequant_row must give the same
 * bits - checked per tensor by a position-weighted checksum of all f32 bit
 * patterns (any single changed value changes it) and value by value on the
 * recorded runs (the largest |difference| is logged). kcpu_dequant_row on
 * every back end must equal kref bit for bit on the same tensors.
 * Threading: each Criterion test runs in its own process.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/ref/kref.h"

#define MAX_VALS 8 /* V records per tensor */

typedef struct {
    int row, col;
    uint32_t bits[8];
} gold_vals;

typedef struct {
    char name[96];
    int synth;              /* 1: S record (bytes inline), 0: T (from the model) */
    kt_type type;
    int64_t ne0, rows;
    uint64_t offset;        /* T only */
    size_t nbytes;
    uint64_t raw_ck, deq_ck;
    double deq_sum;
    uint8_t *data;          /* S only: the bytes */
    size_t have;            /* S only: bytes read so far */
    int n_vals;
    gold_vals vals[MAX_VALS];
} gold_tensor;

typedef struct {
    uint64_t file_size;     /* G record (0: none) */
    int n;
    gold_tensor t[64];
} gold_file;

/* sum_i u_i * (2i + 1) mod 2^64, continued from ck over values starting at
 * position i0 (the golden script's checksum). */
static uint64_t ck_bytes(uint64_t ck, const uint8_t *p, size_t n, uint64_t i0)
{
    for (size_t i = 0; i < n; i++)
        ck += (uint64_t)p[i] * (2 * (i0 + i) + 1);
    return ck;
}

static uint64_t ck_floats(uint64_t ck, const float *x, size_t n, uint64_t i0)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        ck += (uint64_t)u * (2 * (i0 + i) + 1);
    }
    return ck;
}

static int hexval(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Parses a golden file of tests/golden (format: make_kquant_golden.py). */
static void gold_load(const char *file, gold_file *g)
{
    const char *src = getenv("LKQ_SRCDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/golden/%s", src ? src : ".", file);
    FILE *f = fopen(path, "r");
    cr_assert(f, "cannot open %s", path);
    memset(g, 0, sizeof *g);
    static char line[8192];
    gold_tensor *cur = NULL;
    while (fgets(line, sizeof line, f)) {
        unsigned long long a, b, c, d;
        int type;
        long long ne0, rows;
        if (line[0] == '#' || line[0] == '\n')
            continue;
        if (line[0] == 'G') {
            cr_assert_eq(sscanf(line, "G %llu", &a), 1, "%s: %s", file, line);
            g->file_size = a;
        } else if (line[0] == 'T' || line[0] == 'S') {
            cr_assert(g->n < 64, "%s: too many tensors", file);
            cur = &g->t[g->n++];
            cur->synth = line[0] == 'S';
            int k = cur->synth
                        ? sscanf(line, "S %95s %d %lld %lld %llu %llx %llx %lf", cur->name, &type,
                                 &ne0, &rows, &b, &c, &d, &cur->deq_sum) + 1
                        : sscanf(line, "T %95s %d %lld %lld %llu %llu %llx %llx %lf", cur->name,
                                 &type, &ne0, &rows, &a, &b, &c, &d, &cur->deq_sum);
            cr_assert_eq(k, 9, "%s: bad record: %s", file, line);
            cr_assert(kt_type_valid((uint32_t)type), "%s: type %d", file, type);
            cur->type = (kt_type)type;
            cur->ne0 = ne0;
            cur->rows = rows;
            cur->offset = cur->synth ? 0 : a;
            cur->nbytes = (size_t)b;
            cur->raw_ck = c;
            cur->deq_ck = d;
            cr_assert(ne0 > 0 && rows > 0 && ne0 % kt_block_elems(cur->type) == 0 &&
                          kt_row_bytes(cur->type, ne0) * (size_t)rows == cur->nbytes,
                      "%s: %s: shape and size disagree", file, cur->name);
            if (cur->synth) {
                cur->data = malloc(cur->nbytes);
                cr_assert(cur->data);
            }
        } else if (line[0] == 'H') {
            cr_assert(cur && cur->synth, "%s: H without S", file);
            for (const char *p = line + 2; hexval(p[0]) >= 0 && hexval(p[1]) >= 0; p += 2) {
                cr_assert(cur->have < cur->nbytes, "%s: %s: too many bytes", file, cur->name);
                cur->data[cur->have++] = (uint8_t)(hexval(p[0]) * 16 + hexval(p[1]));
            }
        } else if (line[0] == 'V') {
            cr_assert(cur && cur->n_vals < MAX_VALS, "%s: stray V", file);
            gold_vals *v = &cur->vals[cur->n_vals++];
            unsigned u[8];
            int k = sscanf(line, "V %d %d %x %x %x %x %x %x %x %x", &v->row, &v->col, &u[0],
                           &u[1], &u[2], &u[3], &u[4], &u[5], &u[6], &u[7]);
            cr_assert_eq(k, 10, "%s: bad V: %s", file, line);
            cr_assert(v->row >= 0 && v->row < cur->rows && v->col >= 0 && v->col + 8 <= cur->ne0);
            for (int i = 0; i < 8; i++)
                v->bits[i] = u[i];
        } else {
            cr_assert_fail("%s: unknown record: %s", file, line);
        }
    }
    fclose(f);
    for (int i = 0; i < g->n; i++)
        cr_assert(!g->t[i].synth || g->t[i].have == g->t[i].nbytes, "%s: %s: short data", file,
                  g->t[i].name);
    cr_assert(g->n > 0, "%s: no tensors", file);
}

static void gold_free(gold_file *g)
{
    for (int i = 0; i < g->n; i++)
        free(g->t[i].data);
}

static const char *gemma_path(void)
{
    static char buf[4096];
    struct stat st;
    const char *e = getenv("LKQ_GEMMA");
    if (e && *e)
        return stat(e, &st) == 0 ? e : NULL;
    const char *models = getenv("LKQ_MODELS");
    if (models) {
        snprintf(buf, sizeof buf, "%s/gemma-3-270m-q4_k_m.gguf", models);
        if (stat(buf, &st) == 0)
            return buf;
    }
    const char *home = getenv("HOME");
    snprintf(buf, sizeof buf, "%s/.cache/livekvq/gemma-3-270m-q4_k_m.gguf", home ? home : "");
    return stat(buf, &st) == 0 ? buf : NULL;
}

typedef struct {
    size_t tensors, values;
    double max_diff;      /* over the recorded values */
} gold_stats;

/* Checks one tensor (raw bytes in data): raw checksum, kref_dequant_row vs
 * the goldens, kcpu_dequant_row on every back end vs kref. */
static void check_tensor(const gold_tensor *t, const uint8_t *data, gold_stats *st)
{
    cr_assert_eq(ck_bytes(0, data, t->nbytes, 0), t->raw_ck,
                 "%s: raw bytes differ from the goldens' (another file?)", t->name);
    size_t rb = kt_row_bytes(t->type, t->ne0), n = (size_t)t->ne0;
    float *ref = malloc((size_t)t->rows * n * sizeof(float)), *got = malloc(n * sizeof(float));
    cr_assert(ref && got);
    uint64_t ck = 0;
    double sum = 0.0;
    for (int64_t r = 0; r < t->rows; r++) {
        float *o = ref + (size_t)r * n;
        kref_dequant_row(t->type, data + (size_t)r * rb, o, t->ne0);
        ck = ck_floats(ck, o, n, (uint64_t)r * n);
        for (size_t j = 0; j < n; j++)
            sum += (double)o[j];
    }
    for (int i = 0; i < t->n_vals; i++) {
        const gold_vals *v = &t->vals[i];
        for (int j = 0; j < 8; j++) {
            float want;
            memcpy(&want, &v->bits[j], 4);
            float have = ref[(size_t)v->row * n + (size_t)v->col + (size_t)j];
            double d = fabs((double)have - (double)want);
            if (d > st->max_diff || (isnan(have) != isnan(want)))
                st->max_diff = isnan(d) ? INFINITY : d;
            uint32_t hb;
            memcpy(&hb, &have, 4);
            cr_expect_eq(hb, v->bits[j], "%s %s [%d][%d]: kref %.9g (0x%08x), gguf %.9g (0x%08x)",
                         t->name, kt_name(t->type), v->row, v->col + j, (double)have, hb,
                         (double)want, v->bits[j]);
            st->values++;
        }
    }
    cr_assert_eq(ck, t->deq_ck, "%s %s: dequantized tensor is not bit exact with gguf "
                 "(sum %.17g vs %.17g)", t->name, kt_name(t->type), sum, t->deq_sum);
    /* the sums are taken in different orders (numpy: pairwise) */
    cr_assert(fabs(sum - t->deq_sum) <= 1e-9 * (1.0 + fabs(t->deq_sum)) + 1e-6,
              "%s: sum %.17g vs %.17g", t->name, sum, t->deq_sum);
    static const kcpu_path paths[] = { KCPU_PATH_SCALAR, KCPU_PATH_AVX2, KCPU_PATH_AVX512,
                                       KCPU_PATH_AVX512VNNI };
    for (int p = 0; p < 4; p++) {
        if (kcpu_force_path(paths[p]) != 0)
            continue;
        for (int64_t r = 0; r < t->rows; r++) {
            kcpu_dequant_row(t->type, data + (size_t)r * rb, got, t->ne0);
            cr_assert(memcmp(got, ref + (size_t)r * n, n * sizeof(float)) == 0,
                      "%s %s: kcpu_dequant_row (%s) row %lld differs from kref", t->name,
                      kt_name(t->type), kcpu_simd_name(), (long long)r);
        }
    }
    kcpu_force_path(KCPU_PATH_AUTO);
    st->tensors++;
    free(ref);
    free(got);
}

Test(kquant_golden, synthetic_blocks_bit_exact)
{
    gold_file *g = malloc(sizeof *g);
    cr_assert(g);
    gold_load("kquant_synth.txt", g);
    gold_stats st = {0};
    int seen[64] = {0};
    for (int i = 0; i < g->n; i++) {
        check_tensor(&g->t[i], g->t[i].data, &st);
        seen[g->t[i].type] = 1;
    }
    cr_assert(seen[KT_Q5_0] && seen[KT_Q5_1] && seen[KT_Q4_K] && seen[KT_Q5_K] && seen[KT_Q6_K],
              "kquant_synth.txt lacks a type");
    cr_log_info("synthetic: %zu tensors, %zu recorded values, max |kref - gguf| = %g; all "
                "checksums bit exact", st.tensors, st.values, st.max_diff);
    gold_free(g);
    free(g);
}

Test(kquant_golden, gemma_tensors_bit_exact, .timeout = 240)
{
    const char *path = gemma_path();
    if (!path)
        cr_skip_test("Gemma-3 GGUF absent ($LKQ_GEMMA or ~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf;"
                     " scripts/setup.sh fetches it)");
    gold_file *g = malloc(sizeof *g);
    cr_assert(g);
    gold_load("kquant_gemma.txt", g);
    int fd = open(path, O_RDONLY);
    cr_assert(fd >= 0, "%s: %s", path, strerror(errno));
    struct stat sb;
    cr_assert(fstat(fd, &sb) == 0);
    cr_assert_eq((uint64_t)sb.st_size, g->file_size,
                 "%s is %lld bytes, the goldens were made from a %llu-byte file", path,
                 (long long)sb.st_size, (unsigned long long)g->file_size);
    gold_stats st = {0};
    int seen[64] = {0};
    for (int i = 0; i < g->n; i++) {
        gold_tensor *t = &g->t[i];
        cr_assert(t->offset + t->nbytes <= (uint64_t)sb.st_size, "%s: past the end", t->name);
        uint8_t *buf = malloc(t->nbytes);
        cr_assert(buf);
        size_t got = 0;
        while (got < t->nbytes) {
            ssize_t k = pread(fd, buf + got, t->nbytes - got, (off_t)(t->offset + got));
            cr_assert(k > 0, "%s: read failed", t->name);
            got += (size_t)k;
        }
        check_tensor(t, buf, &st);
        seen[t->type]++;
        free(buf);
    }
    close(fd);
    cr_assert(seen[KT_Q5_0] >= 2 && seen[KT_Q4_K] >= 2 && seen[KT_Q6_K] >= 2 && seen[KT_Q8_0] >= 2,
              "kquant_gemma.txt should cover several tensors of each type");
    cr_log_info("gemma: %zu tensors (Q5_0 %d, Q4_K %d, Q6_K %d, Q8_0 %d), %zu recorded values, "
                "max |kref - gguf| = %g; all checksums bit exact",
                st.tensors, seen[KT_Q5_0], seen[KT_Q4_K], seen[KT_Q6_K], seen[KT_Q8_0], st.values,
                st.max_diff);
    gold_free(g);
    free(g);
}
