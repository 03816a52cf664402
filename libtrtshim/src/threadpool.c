/* threadpool.c: a lazily created pool of cpu_count() - 1 persistent worker threads running parallel_for.
 *
 * One job at a time: parallel_for takes the pool mutex for the whole call, so concurrent callers queue.
 * Workers sleep on a condition variable between jobs (no spinning). A parallel_for called from inside a
 * job (nested) runs inline instead of waiting on the pool it is part of.
 */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#define MAX_WORKERS 255

typedef struct {
    pthread_mutex_t call_lock;  /* serializes parallel_for calls */
    pthread_mutex_t lock;       /* guards the fields below */
    pthread_cond_t job_posted;
    pthread_cond_t job_done;
    int num_workers;
    uint64_t generation;        /* bumped for each job; a worker runs each generation once */
    int active;                 /* workers taking part in the current job: worker w runs chunk w + 1 */
    int pending;                /* workers of the current job that have not finished */
    int64_t n;
    int chunks;
    parallel_fn fn;
    void *context;
} pool_state;

static pool_state pool = {
    .call_lock = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .job_posted = PTHREAD_COND_INITIALIZER,
    .job_done = PTHREAD_COND_INITIALIZER,
};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static _Thread_local int inside_job;

int cpu_count(void) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int count = online > 0 ? (int)online : 1;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int allowed = CPU_COUNT(&set);
        if (allowed > 0 && allowed < count) count = allowed;
    }
#endif
    return count;
}

/* Contiguous chunk `index` of `chunks` over [0, n): sizes differ by at most one. */
static void chunk_range(int64_t n, int chunks, int index, int64_t *begin, int64_t *end) {
    int64_t base = n / chunks, extra = n % chunks;
    *begin = index * base + (index < extra ? index : extra);
    *end = *begin + base + (index < extra ? 1 : 0);
}

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint64_t seen = 0;
    inside_job = 1;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.job_posted, &pool.lock);
        seen = pool.generation;
        if (index >= pool.active) continue;
        int64_t n = pool.n, begin, end;
        int chunks = pool.chunks;
        parallel_fn fn = pool.fn;
        void *context = pool.context;
        pthread_mutex_unlock(&pool.lock);
        chunk_range(n, chunks, index + 1, &begin, &end);
        if (begin < end) fn(context, begin, end);
        pthread_mutex_lock(&pool.lock);
        if (--pool.pending == 0) pthread_cond_signal(&pool.job_done);
    }
    return NULL;
}

static void start_workers(void) {
    int wanted = cpu_count() - 1;
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 0; i < wanted; i++) {
        pthread_t thread;
        /* A worker that cannot be created just leaves the pool smaller. */
        if (pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)i) != 0) break;
        pool.num_workers++;
    }
    pthread_attr_destroy(&attr);
}

void parallel_for(int64_t n, int num_threads, parallel_fn fn, void *context) {
    if (n <= 0) return;
    if (num_threads <= 1 || n == 1 || inside_job) {
        fn(context, 0, n);
        return;
    }
    pthread_once(&pool_once, start_workers);
    int threads = num_threads;
    if (threads > pool.num_workers + 1) threads = pool.num_workers + 1;
    if ((int64_t)threads > n) threads = (int)n;
    if (threads <= 1) {
        fn(context, 0, n);
        return;
    }

    pthread_mutex_lock(&pool.call_lock);
    pthread_mutex_lock(&pool.lock);
    pool.n = n;
    pool.chunks = threads;
    pool.fn = fn;
    pool.context = context;
    pool.active = threads - 1;
    pool.pending = threads - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.job_posted);
    pthread_mutex_unlock(&pool.lock);

    int64_t begin, end;
    chunk_range(n, threads, 0, &begin, &end);
    inside_job = 1;
    fn(context, begin, end);
    inside_job = 0;

    pthread_mutex_lock(&pool.lock);
    while (pool.pending > 0) pthread_cond_wait(&pool.job_done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call_lock);
}
