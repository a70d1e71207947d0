/*
 * test_threadpool.c - kcpu_pool: every ith in [0, nth) runs exactly once per
 * run (on whichever pool thread claims it), over many runs (back to back, so workers are caught spinning, and with
 * pauses, so they are caught asleep), for pools of 1, 2 and 4 threads and the
 * NULL pool; the caller is ith 0; results written by workers are visible when
 * kcpu_pool_run returns.
 * Threading: each Criterion test runs in its own process.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "kernels/cpu/kcpu.h"

#define MAX_T 8

typedef struct {
    atomic_int runs[MAX_T];  /* times each ith ran in this run */
    atomic_int bad_nth;      /* nth differed from the pool size */
    int expect_nth;
    pthread_t caller;
    atomic_int caller_not_0; /* ith 0 ran on another thread */
    long plain[MAX_T];       /* non-atomic writes, checked after the run */
    long round;
} run_ctx;

static void task(void *arg, int ith, int nth)
{
    run_ctx *c = arg;
    if (nth != c->expect_nth)
        atomic_fetch_add(&c->bad_nth, 1);
    if (ith == 0 && !pthread_equal(pthread_self(), c->caller))
        atomic_fetch_add(&c->caller_not_0, 1);
    if (ith >= 0 && ith < MAX_T) {
        atomic_fetch_add(&c->runs[ith], 1);
        c->plain[ith] = c->round * 100 + ith;
    }
}

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&ts, NULL);
}

static void exercise(kcpu_pool *p, int nth, int n_runs, long pause_us)
{
    run_ctx c;
    memset(&c, 0, sizeof c);
    c.expect_nth = nth;
    c.caller = pthread_self();
    for (int r = 0; r < n_runs; r++) {
        for (int i = 0; i < MAX_T; i++)
            atomic_store(&c.runs[i], 0);
        c.round = r;
        kcpu_pool_run(p, task, &c);
        for (int i = 0; i < MAX_T; i++) {
            int want = i < nth ? 1 : 0;
            cr_assert_eq(atomic_load(&c.runs[i]), want, "run %d: ith %d ran %d times",
                         r, i, atomic_load(&c.runs[i]));
            if (i < nth)
                cr_assert_eq(c.plain[i], (long)r * 100 + i, "run %d: write of ith %d not visible", r, i);
        }
        if (pause_us)
            sleep_us(pause_us);
    }
    cr_assert_eq(atomic_load(&c.bad_nth), 0);
    cr_assert_eq(atomic_load(&c.caller_not_0), 0);
}

Test(threadpool, null_pool)
{
    cr_assert_eq(kcpu_pool_size(NULL), 1);
    exercise(NULL, 1, 100, 0);
}

Test(threadpool, sizes_back_to_back, .timeout = 120)
{
    static const int sizes[] = { 1, 2, 4 };
    for (int s = 0; s < 3; s++) {
        kcpu_pool *p = NULL;
        cr_assert_eq(kcpu_pool_create(sizes[s], &p), 0);
        cr_assert_eq(kcpu_pool_size(p), sizes[s]);
        exercise(p, sizes[s], sizes[s] > 2 ? 5000 : 20000, 0);
        kcpu_pool_destroy(p);
    }
}

/* Pauses longer than the spin budget make the workers go to sleep, so each
 * run must wake them through the condition variable. */
Test(threadpool, sizes_with_sleeping_workers, .timeout = 120)
{
    static const int sizes[] = { 2, 4 };
    for (int s = 0; s < 2; s++) {
        kcpu_pool *p = NULL;
        cr_assert_eq(kcpu_pool_create(sizes[s], &p), 0);
        exercise(p, sizes[s], 100, 1000);
        exercise(p, sizes[s], 200, 150); /* around the spin budget */
        kcpu_pool_destroy(p);
    }
}

Test(threadpool, create_destroy_cycles)
{
    for (int i = 0; i < 200; i++) {
        kcpu_pool *p = NULL;
        cr_assert_eq(kcpu_pool_create(1 + i % 4, &p), 0);
        if (i % 2)
            exercise(p, 1 + i % 4, 3, 0);
        kcpu_pool_destroy(p);
    }
    kcpu_pool_destroy(NULL);
}

Test(threadpool, bad_size)
{
    kcpu_pool *p = (kcpu_pool *)&p;
    cr_assert_lt(kcpu_pool_create(0, &p), 0);
    cr_assert_null(p);
    cr_assert_lt(kcpu_pool_create(-3, &p), 0);
}
