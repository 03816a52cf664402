/* threadpool.h: a fixed pool of worker threads running parallel loops. */
#ifndef TRTSHIM_THREADPOOL_H
#define TRTSHIM_THREADPOOL_H

#include <stdint.h>

/* Calls fn(context, begin, end) over disjoint ranges covering [0, n), on up to num_threads threads (the
   caller's thread included), and returns when all have finished. num_threads <= 1 or a small n runs
   inline. Safe to call from several threads at once (calls are serialized on the pool). */
typedef void (*parallel_fn)(void *context, int64_t begin, int64_t end);
void parallel_for(int64_t n, int num_threads, parallel_fn fn, void *context);

/* Number of online cores. */
int cpu_count(void);

#endif
