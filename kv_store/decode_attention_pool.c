/* The kernels' own thread pool: a call's rows fanned out to `n` threads (the calling
 * thread and n - 1 workers) that claim them from one counter (FOR_EACH_CHUNK). Included
 * by decode_attention.c, after the kernels.
 *
 * Why not Python threads: fanning a call out to 16 of them costs about 0.5 ms (every
 * thread takes the GIL to start and to end its ctypes call), as long as a whole attend
 * of a small batch, and an INT4 attend makes three calls. Here a call is one ctypes
 * call: the job is published with one atomic store, workers that finished the last job
 * spin on it for POOL_SPIN_US (the next call of an attend, or the next layer's, usually
 * comes sooner) and otherwise sleep on a condition variable, and the caller runs its
 * share, then spins up to POOL_WAIT_US for the others before it sleeps: waking a
 * sleeping thread costs tens of microseconds, a job of a small batch about as much.
 *
 * A job is a kernel (`kind`) and its arguments as an array of int64: pointers and
 * integers as they are, the float scale as its 32 bits. Each thread has its own
 * scratch, grown by the caller between jobs (workers are idle then). */

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#ifndef POOL_SPIN_US
#define POOL_SPIN_US 500 /* a worker's spin for the next job before it sleeps */
#endif
#ifndef POOL_WAIT_US
#define POOL_WAIT_US 5000 /* the caller's spin for the workers to finish before it sleeps */
#endif

enum { JOB_BF16 = 0, JOB_QUANT = 1, JOB_QUANTIZE = 2 };

typedef struct strata_pool {
    int n; /* threads, the caller's included */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    uint64_t gen;  /* the job's number: workers run each new one once */
    int pending;   /* workers still on the current job */
    int stop, rc;
    int kind;
    const int64_t *args;
    int64_t rows, chunk, next;
    float **scratch;
    int64_t scratch_floats;
} strata_pool;

typedef struct {
    strata_pool *pool;
    int tid;
} pool_worker_arg;

static inline void pool_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline int64_t pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spin until *word differs from `from` (a worker waiting for a new job) or is 0 (the
 * caller waiting for pending workers), for at most `us`; returns its last value. Past
 * the first POOL_PAUSE_NS the spin yields its core between looks, so a thread that
 * needs the core (the caller's own Python, a gRPC thread, another process) gets it. */
#ifndef POOL_PAUSE_NS
#define POOL_PAUSE_NS 20000
#endif
static uint64_t pool_spin(const void *word, int is_gen, uint64_t from, int64_t us) {
    const int64_t start = pool_now_ns(), until = start + us * 1000;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            const uint64_t v = is_gen ? __atomic_load_n((const uint64_t *)word, __ATOMIC_ACQUIRE)
                                      : (uint64_t)__atomic_load_n((const int *)word, __ATOMIC_ACQUIRE);
            if (is_gen ? v != from : v == 0) return v;
            pool_pause();
        }
        const int64_t now = pool_now_ns();
        if (now > until)
            return is_gen ? __atomic_load_n((const uint64_t *)word, __ATOMIC_ACQUIRE)
                          : (uint64_t)__atomic_load_n((const int *)word, __ATOMIC_ACQUIRE);
        if (now - start > POOL_PAUSE_NS) sched_yield();
    }
}

static inline float pool_f32(int64_t bits) {
    const uint32_t u = (uint32_t)bits;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One thread's share of the job: the kernel claims rows until none are left. */
static int pool_task(strata_pool *p, int tid) {
    const int64_t *a = p->args;
    float *s = p->scratch[tid];
    switch (p->kind) {
    case JOB_BF16:
        strata_decode_attention_bf16((const uint16_t *)a[0], (uint16_t *)a[1], (uint16_t *)a[2],
                                     (const float *)a[3], (uint16_t *)a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                                     a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18], a[19], a[20],
                                     pool_f32(a[21]),
                                     (bf16_new){(const uint16_t *)a[22], (const uint16_t *)a[23],
                                                (const int64_t *)a[24], a[25], a[26]},
                                     &p->next, p->rows, p->chunk, s);
        return 0;
    case JOB_QUANT:
        strata_decode_attention_quant((const uint16_t *)a[0], (const uint8_t *)a[1], (const uint16_t *)a[2],
                                      (const uint16_t *)a[3], (const uint8_t *)a[4], (const uint16_t *)a[5],
                                      (const uint16_t *)a[6], (const float *)a[7], (uint16_t *)a[8], a[9], a[10],
                                      a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18], a[19], a[20], a[21],
                                      a[22], a[23], a[24], a[25], a[26], pool_f32(a[27]), &p->next, p->rows,
                                      p->chunk, s);
        return 0;
    case JOB_QUANTIZE:
        return strata_quantize_bf16((const uint16_t *)a[0], (uint8_t *)a[1], (uint16_t *)a[2], (uint16_t *)a[3],
                                    a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15],
                                    a[16], a[17], &p->next, p->rows, p->chunk);
    default:
        return -2;
    }
}

static void *pool_worker(void *arg) {
    strata_pool *p = ((pool_worker_arg *)arg)->pool;
    const int tid = ((pool_worker_arg *)arg)->tid;
    free(arg);
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = pool_spin(&p->gen, 1, seen, POOL_SPIN_US);
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while (p->gen == seen) pthread_cond_wait(&p->wake, &p->mu);
            g = p->gen;
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) return NULL;
        const int rc = pool_task(p, tid);
        if (rc) __atomic_store_n(&p->rc, rc, __ATOMIC_RELAXED);
        if (__atomic_sub_fetch(&p->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

void strata_pool_destroy(strata_pool *p);

/* A pool of `n` threads (n - 1 started here), or NULL where threads cannot be made. */
strata_pool *strata_pool_create(int n) {
    strata_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n < 1 ? 1 : n;
    p->threads = calloc((size_t)p->n, sizeof *p->threads);
    p->scratch = calloc((size_t)p->n, sizeof *p->scratch);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    if (!p->threads || !p->scratch) {
        strata_pool_destroy(p);
        return NULL;
    }
    for (int t = 1; t < p->n; t++) {
        pool_worker_arg *arg = malloc(sizeof *arg);
        if (arg) *arg = (pool_worker_arg){p, t};
        if (!arg || pthread_create(&p->threads[t], NULL, pool_worker, arg) != 0) {
            free(arg);
            p->n = t; /* the workers started so far are stopped by destroy */
            strata_pool_destroy(p);
            return NULL;
        }
    }
    return p;
}

void strata_pool_destroy(strata_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&p->gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int t = 1; t < p->n; t++)
        if (p->threads && p->threads[t]) pthread_join(p->threads[t], NULL);
    for (int t = 0; p->scratch && t < p->n; t++) free(p->scratch[t]);
    free(p->scratch);
    free(p->threads);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

static int pool_scratch(strata_pool *p, int64_t floats) {
    if (floats <= p->scratch_floats) return 0;
    for (int t = 0; t < p->n; t++) {
        void *buf = NULL;
        if (posix_memalign(&buf, 64, (size_t)floats * sizeof(float)) != 0) return -1;
        free(p->scratch[t]);
        p->scratch[t] = buf;
    }
    p->scratch_floats = floats;
    return 0;
}

/* Run kernel `kind` over `rows` rows, claimed `chunk` at a time, on every thread of the
 * pool; returns 0, or the first nonzero a thread's kernel returned (-1: the quantizer is
 * not built on this compiler; -3: no memory for the scratch). Not reentrant: one job at
 * a time (the KV store calls from one thread). */
int strata_pool_run(strata_pool *p, int kind, const int64_t *args, int64_t rows, int64_t chunk,
                    int64_t scratch_floats) {
    if (pool_scratch(p, scratch_floats) != 0) return -3;
    p->kind = kind;
    p->args = args;
    p->rows = rows;
    p->chunk = chunk < 1 ? 1 : chunk;
    p->next = 0;
    p->rc = 0;
    p->pending = p->n - 1;
    if (p->n > 1) {
        pthread_mutex_lock(&p->mu);
        __atomic_add_fetch(&p->gen, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mu);
    }
    const int rc = pool_task(p, 0);
    if (p->n > 1 && pool_spin(&p->pending, 0, 0, POOL_WAIT_US) != 0) {
        pthread_mutex_lock(&p->mu);
        while (__atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
    return rc ? rc : __atomic_load_n(&p->rc, __ATOMIC_RELAXED);
}
