/* streaming.c: weight streaming. The packed kernels of GEMM and convolution steps are streamable: they live
   in host storage (the engine's host copy, or its mapped file), and a resident arena of at most the budget
   holds those that fit (first fit in step order, so the earliest steps, which a prefetch cannot get ahead
   of, are resident first). A run copies the others into a window of two slots, one step ahead, on a worker
   thread, while the current step computes from the other slot. In the ref backend the arena and the
   windows stand for device memory; a GPU backend would put them in device memory, the host storage in
   pinned memory, and the worker's memcpy on a copy stream. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

typedef struct window {
    void *slot[2];
    struct window *next;
} window;

struct stream_state {
    pthread_mutex_t lock;       /* arena fill, window pool and counters (runs may overlap) */
    uint64_t total, budget, resident_bytes, streamed_bytes, slot_bytes, largest;
    uint64_t *size;             /* per buffer: accounted bytes (64-byte rounded), 0 when not streamable */
    int8_t *resident;           /* per buffer */
    uint64_t *arena_offset;     /* per buffer */
    int32_t *stream_index;      /* per step: position in `order`, -1 when not streamed */
    int32_t *order;             /* streamed steps in run order */
    int32_t num_order;
    uint8_t *arena;             /* NULL until the first run after a budget change */
    window *pool;               /* windows not in use */
    uint64_t allocated, peak, copied, runs;
};

struct stream_run {
    trtshim_engine *e;
    struct stream_state *s;
    window *w;
    pthread_t worker;
    int has_worker;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int32_t filled, consumed; /* streamed steps copied into a slot / finished with their slot */
    int stop;
    uint64_t copied;
};

static uint64_t round64(uint64_t n) { return (n + 63) / 64 * 64; }

static void account(struct stream_state *s, int64_t delta) {
    s->allocated = (uint64_t)((int64_t)s->allocated + delta);
    if (s->allocated > s->peak) s->peak = s->allocated;
}

static void drop_memory(struct stream_state *s) {
    free(s->arena);
    s->arena = NULL;
    while (s->pool) {
        window *w = s->pool;
        s->pool = w->next;
        free(w->slot[0]);
        free(w->slot[1]);
        free(w);
    }
    s->allocated = 0;
}

/* Residency for s->budget; no run is in flight. */
static void plan_budget(trtshim_engine *e, struct stream_state *s, uint64_t budget) {
    drop_memory(s);
    s->budget = budget;
    s->resident_bytes = s->streamed_bytes = s->slot_bytes = 0;
    s->num_order = 0;
    s->peak = s->copied = s->runs = 0;
    uint64_t left = budget;
    for (int32_t i = 0; i < e->num_steps; i++) {
        s->stream_index[i] = -1;
        int32_t b = e->steps[i].packed_buffer;
        if (b < 0 || !s->size[b]) continue;
        if (s->size[b] <= left) {
            s->resident[b] = 1;
            s->arena_offset[b] = s->resident_bytes;
            s->resident_bytes += s->size[b];
            left -= s->size[b];
        } else {
            s->resident[b] = 0;
            s->stream_index[i] = s->num_order;
            s->order[s->num_order++] = i;
            s->streamed_bytes += s->size[b];
            if (s->size[b] > s->slot_bytes) s->slot_bytes = s->size[b];
        }
    }
}

trtshim_status stream_init(trtshim_engine *e) {
    if (!e->weight_streaming) return TRTSHIM_OK;
    struct stream_state *s = calloc(1, sizeof(*s));
    if (!s) return set_error(TRTSHIM_ERR_MEMORY, "weight streaming: out of memory");
    size_t nb = (size_t)e->num_buffers + 1, ns = (size_t)e->num_steps + 1;
    s->size = calloc(nb, sizeof(uint64_t));
    s->resident = calloc(nb, 1);
    s->arena_offset = calloc(nb, sizeof(uint64_t));
    s->stream_index = calloc(ns, sizeof(int32_t));
    s->order = calloc(ns, sizeof(int32_t));
    if (!s->size || !s->resident || !s->arena_offset || !s->stream_index || !s->order) {
        free(s->size), free(s->resident), free(s->arena_offset), free(s->stream_index), free(s->order), free(s);
        return set_error(TRTSHIM_ERR_MEMORY, "weight streaming: out of memory");
    }
    pthread_mutex_init(&s->lock, NULL);
    for (int32_t i = 0; i < e->num_steps; i++) {
        const step *st = &e->steps[i];
        if ((st->kind != STEP_GEMM && st->kind != STEP_CONV) || st->packed_buffer < 0) continue;
        uint64_t n = round64(e->buffers[st->packed_buffer].bytes);
        s->size[st->packed_buffer] = n;
        s->total += n;
        if (n > s->largest) s->largest = n;
    }
    e->stream = s;
    plan_budget(e, s, s->total);
    return TRTSHIM_OK;
}

void stream_free(trtshim_engine *e) {
    struct stream_state *s = e->stream;
    if (!s) return;
    drop_memory(s);
    pthread_mutex_destroy(&s->lock);
    free(s->size), free(s->resident), free(s->arena_offset), free(s->stream_index), free(s->order), free(s);
    e->stream = NULL;
}

/* ---- runs ------------------------------------------------------------------------------------ */

static void *prefetch(void *arg) {
    stream_run *r = arg;
    const trtshim_engine *e = r->e;
    const struct stream_state *s = r->s;
    for (int32_t j = 0; j < s->num_order; j++) {
        pthread_mutex_lock(&r->mu);
        while (!r->stop && j >= r->consumed + 2) pthread_cond_wait(&r->cv, &r->mu);
        int stop = r->stop;
        pthread_mutex_unlock(&r->mu);
        if (stop) break;
        const weight_buffer *b = &e->buffers[e->steps[s->order[j]].packed_buffer];
        memcpy(r->w->slot[j % 2], b->data, (size_t)b->bytes);
        pthread_mutex_lock(&r->mu);
        r->filled = j + 1;
        r->copied += b->bytes;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
    }
    return NULL;
}

static trtshim_status fill_arena(trtshim_engine *e, struct stream_state *s) {
    if (s->arena || !s->resident_bytes) return TRTSHIM_OK;
    s->arena = aligned_zalloc(s->resident_bytes);
    if (!s->arena)
        return set_error(TRTSHIM_ERR_MEMORY, "execute: out of memory for a resident weight arena of %llu bytes (budget %llu)",
                         (unsigned long long)s->resident_bytes, (unsigned long long)s->budget);
    for (int32_t b = 0; b < e->num_buffers; b++)
        if (s->size[b] && s->resident[b]) memcpy(s->arena + s->arena_offset[b], e->buffers[b].data, (size_t)e->buffers[b].bytes);
    account(s, (int64_t)s->resident_bytes);
    return TRTSHIM_OK;
}

static window *take_window(struct stream_state *s) {
    if (s->pool) {
        window *w = s->pool;
        s->pool = w->next;
        return w;
    }
    window *w = calloc(1, sizeof(window));
    if (!w) return NULL;
    w->slot[0] = aligned_zalloc(s->slot_bytes);
    w->slot[1] = aligned_zalloc(s->slot_bytes);
    if (!w->slot[0] || !w->slot[1]) {
        free(w->slot[0]), free(w->slot[1]), free(w);
        return NULL;
    }
    account(s, (int64_t)(2 * s->slot_bytes));
    return w;
}

trtshim_status stream_run_begin(trtshim_engine *e, stream_run **out) {
    *out = NULL;
    struct stream_state *s = e->stream;
    if (!s) return TRTSHIM_OK;
    stream_run *r = calloc(1, sizeof(stream_run));
    if (!r) return set_error(TRTSHIM_ERR_MEMORY, "execute: out of memory");
    r->e = e;
    r->s = s;
    pthread_mutex_lock(&s->lock);
    trtshim_status st = fill_arena(e, s);
    if (!st && s->num_order > 0 && !(r->w = take_window(s)))
        st = set_error(TRTSHIM_ERR_MEMORY, "execute: out of memory for a weight streaming window of 2 x %llu bytes",
                       (unsigned long long)s->slot_bytes);
    if (!st) s->runs++;
    pthread_mutex_unlock(&s->lock);
    if (st) {
        free(r);
        return st;
    }
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    if (s->num_order > 0) {
        if (pthread_create(&r->worker, NULL, prefetch, r) == 0) r->has_worker = 1;
        /* Without a worker the run fetches each weight itself, just before its step (see below). */
    }
    *out = r;
    return TRTSHIM_OK;
}

const void *stream_step_weights(stream_run *r, int32_t i) {
    const struct stream_state *s = r->s;
    const trtshim_engine *e = r->e;
    int32_t b = e->steps[i].packed_buffer;
    if (b < 0 || !s->size[b]) return NULL;
    if (s->resident[b]) return s->arena + s->arena_offset[b];
    int32_t j = s->stream_index[i];
    if (!r->has_worker) {
        memcpy(r->w->slot[j % 2], e->buffers[b].data, (size_t)e->buffers[b].bytes);
        r->copied += e->buffers[b].bytes;
        return r->w->slot[j % 2];
    }
    pthread_mutex_lock(&r->mu);
    while (r->filled <= j) pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
    return r->w->slot[j % 2];
}

void stream_step_done(stream_run *r, int32_t i) {
    int32_t j = r->s->stream_index[i];
    if (j < 0) return;
    pthread_mutex_lock(&r->mu);
    r->consumed = j + 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

void stream_run_end(stream_run *r, int ok) {
    if (!r) return;
    (void)ok;
    if (r->has_worker) {
        pthread_mutex_lock(&r->mu);
        r->stop = 1;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        pthread_join(r->worker, NULL);
    }
    struct stream_state *s = r->s;
    pthread_mutex_lock(&s->lock);
    s->copied += r->copied;
    if (r->w) {
        r->w->next = s->pool;
        s->pool = r->w;
    }
    pthread_mutex_unlock(&s->lock);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void stream_buffer_changed(trtshim_engine *e, int32_t b) {
    struct stream_state *s = e->stream;
    if (!s || b < 0 || b >= e->num_buffers || !s->size[b] || !s->resident[b] || !s->arena) return;
    memcpy(s->arena + s->arena_offset[b], e->buffers[b].data, (size_t)e->buffers[b].bytes);
}

const void *stream_buffer_source(trtshim_engine *e, int32_t b) {
    struct stream_state *s = e->stream;
    if (b < 0 || b >= e->num_buffers) return NULL;
    const void *p = e->buffers[b].data;
    if (!s || !s->size[b]) return p;
    pthread_mutex_lock(&s->lock); /* a run fills the arena under this lock */
    if (s->resident[b] && s->arena) p = s->arena + s->arena_offset[b];
    pthread_mutex_unlock(&s->lock);
    return p;
}

/* ---- the ABI --------------------------------------------------------------------------------- */

trtshim_status trtshim_engine_streamable_weights_size(const trtshim_engine *e, uint64_t *bytes) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "streamable_weights_size: engine is null");
    if (!bytes) return set_error(TRTSHIM_ERR_ARGUMENT, "streamable_weights_size: bytes is null");
    *bytes = e->stream ? e->stream->total : 0;
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_weight_streaming_budget(const trtshim_engine *e, uint64_t *bytes) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_budget: engine is null");
    if (!bytes) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_budget: bytes is null");
    pthread_mutex_lock((pthread_mutex_t *)&e->lock);
    *bytes = e->stream ? e->stream->budget : 0;
    pthread_mutex_unlock((pthread_mutex_t *)&e->lock);
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_set_weight_streaming_budget(trtshim_engine *e, uint64_t bytes) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "set_weight_streaming_budget: engine is null");
    struct stream_state *s = e->stream;
    if (!s) return set_error(TRTSHIM_ERR_STATE, "set_weight_streaming_budget: the engine was built with weight_streaming = 0");
    if (bytes > s->total)
        return set_error(TRTSHIM_ERR_ARGUMENT, "set_weight_streaming_budget: budget %llu bytes exceeds the streamable total of %llu bytes",
                         (unsigned long long)bytes, (unsigned long long)s->total);
    /* Holding the engine lock keeps runs, refits and serialization from starting while residency changes. */
    pthread_mutex_lock(&e->lock);
    if (e->executing > 0 || e->applying) {
        int executing = e->executing > 0;
        pthread_mutex_unlock(&e->lock);
        return set_error(TRTSHIM_ERR_STATE, "set_weight_streaming_budget: the engine is %s; the budget stays %llu bytes",
                         executing ? "running (a context is executing, or the engine is being serialized)" : "being refitted",
                         (unsigned long long)s->budget);
    }
    pthread_mutex_lock(&s->lock);
    plan_budget(e, s, bytes);
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock(&e->lock);
    return TRTSHIM_OK;
}

/* MemAvailable in bytes, 0 when unknown. */
static uint64_t memory_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

trtshim_status trtshim_engine_weight_streaming_automatic_budget(const trtshim_engine *e, uint64_t *bytes) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_automatic_budget: engine is null");
    if (!bytes) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_automatic_budget: bytes is null");
    const struct stream_state *s = e->stream;
    if (!s) {
        *bytes = 0;
        return TRTSHIM_OK;
    }
    uint64_t avail = memory_available();
    if (!avail) {
        *bytes = s->total;
        return TRTSHIM_OK;
    }
    uint64_t half = avail / 2, window = 2 * s->largest;
    uint64_t b = half > window ? half - window : 0;
    *bytes = b < s->total ? b : s->total;
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_weight_streaming_scratch_size(const trtshim_engine *e, uint64_t *bytes) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_scratch_size: engine is null");
    if (!bytes) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_scratch_size: bytes is null");
    pthread_mutex_lock((pthread_mutex_t *)&e->lock);
    *bytes = e->stream ? 2 * e->stream->slot_bytes : 0;
    pthread_mutex_unlock((pthread_mutex_t *)&e->lock);
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_weight_streaming_stats(const trtshim_engine *e, trtshim_weight_streaming_stats *out) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_stats: engine is null");
    if (!out) return set_error(TRTSHIM_ERR_ARGUMENT, "weight_streaming_stats: stats is null");
    memset(out, 0, sizeof(*out));
    struct stream_state *s = e->stream;
    if (!s) return TRTSHIM_OK;
    pthread_mutex_lock((pthread_mutex_t *)&e->lock);
    pthread_mutex_lock(&s->lock);
    out->streamable_bytes = s->total;
    out->budget_bytes = s->budget;
    out->resident_bytes = s->resident_bytes;
    out->streamed_bytes = s->streamed_bytes;
    out->window_bytes = 2 * s->slot_bytes;
    out->allocated_bytes = s->allocated;
    out->peak_bytes = s->peak;
    out->copied_bytes = s->copied;
    out->runs = s->runs;
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_unlock((pthread_mutex_t *)&e->lock);
    return TRTSHIM_OK;
}
