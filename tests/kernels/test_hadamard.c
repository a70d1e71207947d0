/*
 * test_hadamard.c - the Walsh-Hadamard rotation of kv_rotate: kcpu_hadamard
 * (fast transform, f32) against kref_hadamard (the definition, double sums)
 * on every power of two up to 512 with an outlier channel; the rotation is
 * its own inverse; and rotating both the keys and the query leaves every
 * attention score q.k unchanged (to 1e-5 of |q| |k|), which is what lets
 * the graph cache rotated K and rotate the query instead of un-rotating K.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/ref/kref.h"

static uint32_t rng = 12345;

static float frand(void)
{
    rng = rng * 1664525u + 1013904223u;
    return ((float)(rng >> 8) / 16777216.0f - 0.5f) * 4.0f;
}

static double l2(const float *x, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    return sqrt(s);
}

Test(hadamard, fast_transform_matches_definition)
{
    for (int dim = 1; dim <= 512; dim *= 2) {
        const int rows = 3;
        float *x = malloc(sizeof(float) * rows * dim), *a = malloc(sizeof(float) * rows * dim),
              *b = malloc(sizeof(float) * rows * dim);
        for (int i = 0; i < rows * dim; i++)
            x[i] = frand();
        x[dim / 2] = 3e3f; /* an outlier channel */
        memcpy(a, x, sizeof(float) * rows * dim);
        memcpy(b, x, sizeof(float) * rows * dim);
        kref_hadamard(a, rows, dim);
        kcpu_hadamard(b, rows, dim);
        for (int r = 0; r < rows; r++) {
            double tol = 1e-6 * (log2(dim) + 1) * l2(x + r * dim, dim);
            /* orthonormal: the norm is kept */
            cr_assert_leq(fabs(l2(a + r * dim, dim) - l2(x + r * dim, dim)),
                          1e-6 * l2(x + r * dim, dim) + 1e-30, "dim %d row %d: norm", dim, r);
            for (int i = 0; i < dim; i++)
                cr_assert_leq(fabs((double)a[r * dim + i] - b[r * dim + i]), tol,
                              "dim %d row %d elt %d: ref %g fast %g", dim, r, i,
                              a[r * dim + i], b[r * dim + i]);
        }
        free(x), free(a), free(b);
    }
}

Test(hadamard, its_own_inverse)
{
    for (int dim = 2; dim <= 256; dim *= 2) {
        float x[256], y[256];
        for (int i = 0; i < dim; i++)
            x[i] = y[i] = frand();
        kcpu_hadamard(y, 1, dim);
        kcpu_hadamard(y, 1, dim);
        for (int i = 0; i < dim; i++)
            cr_assert_leq(fabsf(x[i] - y[i]), 1e-5f * (1.0f + fabsf(x[i])), "dim %d elt %d", dim,
                          i);
    }
}

/* K rotated, query rotated: the scores of a head over many keys are equal
 * to 1e-5 of |q| |k| (and the softmax over them with it). */
Test(hadamard, rotated_scores_equal)
{
    const int dims[] = {64, 128, 256};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const int d = dims[di], n_keys = 200;
        float *q = malloc(sizeof(float) * d), *k = malloc(sizeof(float) * n_keys * d);
        float *qr = malloc(sizeof(float) * d), *kr = malloc(sizeof(float) * n_keys * d);
        for (int i = 0; i < d; i++)
            q[i] = frand();
        for (int i = 0; i < n_keys * d; i++)
            k[i] = frand();
        for (int j = 0; j < n_keys; j++)
            k[j * d + 5] *= 40.0f; /* a channel of large keys, as after RoPE */
        memcpy(qr, q, sizeof(float) * d);
        memcpy(kr, k, sizeof(float) * n_keys * d);
        kcpu_hadamard(qr, 1, d);
        kcpu_hadamard(kr, n_keys, d);
        for (int j = 0; j < n_keys; j++) {
            double s = 0, sr = 0;
            for (int i = 0; i < d; i++) {
                s += (double)q[i] * k[j * d + i];
                sr += (double)qr[i] * kr[j * d + i];
            }
            double scale = l2(q, d) * l2(k + j * d, d);
            cr_assert_leq(fabs(s - sr), 1e-5 * scale, "d %d key %d: %g vs %g", d, j, s, sr);
        }
        free(q), free(k), free(qr), free(kr);
    }
}
