/*
 * threadpool.c - persistent worker pool behind kcpu_pool_run.
 *
 * n_threads - 1 workers are created once; the caller of kcpu_pool_run always
 * runs share ith 0. The other shares 1..n-1 are claimed from an atomic word
 * (generation << 32 | next share) by whichever thread gets there first: a
 * worker that was woken, or the caller itself once share 0 is done. So a run
 * never waits for a worker that has not been scheduled yet (the machine may
 * be busy with other processes); it only waits for shares already started.
 *
 * Waiting: workers spin on the generation for a short while (the engine
 * issues ~10 runs per layer, microseconds apart) and then sleep on a
 * condition variable; the caller waits for the last started share the same
 * way. Every ith runs exactly once per run, on some pool thread.
 *
 * Threading: kcpu_pool_run must be called by one thread at a time per pool;
 * create/destroy by the owner only.
 */
#include "kernels/cpu/kcpu.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* How long a waiting thread spins before it sleeps. */
#define POOL_SPIN_NS 100000LL

struct kcpu_pool {
    int n;                   /* threads including the caller */
    pthread_t *threads;      /* n - 1 workers */
    kcpu_task_fn fn;         /* current task, published before the claim word */
    void *ctx;
    _Atomic uint64_t claim;  /* generation << 32 | next unclaimed share */
    atomic_int done;         /* shares 1..n-1 finished in this generation */
    atomic_int stop;
    atomic_int n_sleep_work; /* workers sleeping on cv_work */
    atomic_int caller_sleep; /* 1 while the caller sleeps on cv_done */
    pthread_mutex_t mu;
    pthread_cond_t cv_work;
    pthread_cond_t cv_done;
};

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint32_t gen_of(uint64_t c)
{
    return (uint32_t)(c >> 32);
}

/* Claims and runs shares of generation g until none is left (or a newer
 * generation started). fn/ctx are read only after a successful claim, and
 * the caller does not publish a new run before every claimed share is done,
 * so they belong to g. */
static void run_shares(kcpu_pool *p, uint32_t g)
{
    uint64_t c = atomic_load(&p->claim);
    while (gen_of(c) == g && (uint32_t)c < (uint32_t)p->n) {
        if (!atomic_compare_exchange_weak(&p->claim, &c, c + 1))
            continue; /* c was reloaded */
        p->fn(p->ctx, (int)(uint32_t)c, p->n);
        if (atomic_fetch_add(&p->done, 1) == p->n - 2 && atomic_load(&p->caller_sleep)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
        c = atomic_load(&p->claim);
    }
}

static void *worker_main(void *argp)
{
    kcpu_pool *p = argp;
    uint32_t seen = 0;
    for (;;) {
        /* spin, then sleep, until a new generation or stop */
        long long t0 = now_ns();
        uint32_t g;
        for (int i = 1;; i++) {
            g = gen_of(atomic_load_explicit(&p->claim, memory_order_acquire));
            if (g != seen || atomic_load_explicit(&p->stop, memory_order_relaxed))
                break;
            cpu_relax();
            if ((i & 63) == 0 && now_ns() - t0 > POOL_SPIN_NS) {
                pthread_mutex_lock(&p->mu);
                atomic_fetch_add(&p->n_sleep_work, 1);
                while ((g = gen_of(atomic_load(&p->claim))) == seen && !atomic_load(&p->stop))
                    pthread_cond_wait(&p->cv_work, &p->mu);
                atomic_fetch_sub(&p->n_sleep_work, 1);
                pthread_mutex_unlock(&p->mu);
                break;
            }
        }
        if (atomic_load(&p->stop))
            break;
        seen = g;
        run_shares(p, g);
    }
    return NULL;
}

/* See kcpu.h. On failure nothing is left running or allocated. */
int kcpu_pool_create(int n_threads, kcpu_pool **out)
{
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024)
        return -1;
    kcpu_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return -1;
    p->n = n_threads;
    atomic_init(&p->claim, (uint64_t)n_threads); /* generation 0: nothing to claim */
    atomic_init(&p->done, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->n_sleep_work, 0);
    atomic_init(&p->caller_sleep, 0);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (!p->threads) {
            p->n = 1;
            kcpu_pool_destroy(p);
            return -1;
        }
    }
    for (int i = 1; i < n_threads; i++) {
        if (pthread_create(&p->threads[i - 1], NULL, worker_main, p) != 0) {
            p->n = i; /* destroy joins the i - 1 workers started so far */
            kcpu_pool_destroy(p);
            return -1;
        }
    }
    *out = p;
    return 0;
}

void kcpu_pool_destroy(kcpu_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++)
        pthread_join(p->threads[i - 1], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p->threads);
    free(p);
}

int kcpu_pool_size(const kcpu_pool *p)
{
    return p ? p->n : 1;
}

/* Publish, wake sleepers, run share 0, help with unclaimed shares, wait for
 * the claimed ones. The seq_cst pairs (claim store / n_sleep_work load here,
 * n_sleep_work add / claim load in the worker; caller_sleep store / done
 * load here, done add / caller_sleep load in run_shares) guarantee that no
 * sleeper misses its wake-up. */
void kcpu_pool_run(kcpu_pool *p, kcpu_task_fn fn, void *ctx)
{
    if (!p || p->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store(&p->done, 0);
    uint32_t g = gen_of(atomic_load(&p->claim)) + 1;
    atomic_store(&p->claim, (uint64_t)g << 32 | 1u); /* share 0 is ours */
    if (atomic_load(&p->n_sleep_work) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->mu);
    }
    fn(ctx, 0, p->n);
    run_shares(p, g);

    long long t0 = now_ns();
    for (int i = 1; atomic_load_explicit(&p->done, memory_order_acquire) < p->n - 1; i++) {
        cpu_relax();
        if ((i & 63) == 0 && now_ns() - t0 > POOL_SPIN_NS) {
            pthread_mutex_lock(&p->mu);
            atomic_store(&p->caller_sleep, 1);
            while (atomic_load(&p->done) < p->n - 1)
                pthread_cond_wait(&p->cv_done, &p->mu);
            atomic_store(&p->caller_sleep, 0);
            pthread_mutex_unlock(&p->mu);
            break;
        }
    }
}
