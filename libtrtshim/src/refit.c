/* refit.c: the refitter. Stages network-level weights, validates all of them, then re-runs the same
   unit transforms the builder ran, so a refit equals a rebuild bit for bit. All or nothing: every check
   and every allocation happens before the first write into the engine. */
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "threadpool.h"

struct trtshim_refitter {
    trtshim_engine *engine;
    const void **staged;  /* per weight: the caller's values, NULL when not staged */
    int32_t check_finite;
    int32_t *missing;     /* weight indices of the last missing computation */
    int32_t num_missing;
};

trtshim_status trtshim_refitter_create(trtshim_engine *engine, trtshim_refitter **out) {
    if (!engine) return set_error(TRTSHIM_ERR_ARGUMENT, "refitter_create: engine is null");
    if (!out) return set_error(TRTSHIM_ERR_ARGUMENT, "refitter_create: out is null");
    if (!engine->refittable)
        return set_error(TRTSHIM_ERR_STATE, "refitter_create: the engine was built with refittable = 0");
    trtshim_refitter *r = calloc(1, sizeof(trtshim_refitter));
    if (!r) return set_error(TRTSHIM_ERR_MEMORY, "refitter_create: out of memory");
    r->staged = calloc((size_t)engine->num_weights + 1, sizeof(void *));
    r->missing = calloc((size_t)engine->num_weights + 1, sizeof(int32_t));
    if (!r->staged || !r->missing) {
        free(r->staged), free(r->missing), free(r);
        return set_error(TRTSHIM_ERR_MEMORY, "refitter_create: out of memory");
    }
    engine_retain(engine);
    r->engine = engine;
    *out = r;
    return TRTSHIM_OK;
}

void trtshim_refitter_destroy(trtshim_refitter *r) {
    if (!r) return;
    engine_release(r->engine);
    free(r->staged);
    free(r->missing);
    free(r);
}

static void format_shape(char *buf, size_t cap, const engine_weight *w) {
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int32_t i = 0; i < w->rank && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, i ? ", %lld" : "%lld", (long long)w->dims[i]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
}

trtshim_status trtshim_refitter_set_weights(trtshim_refitter *r, const char *name, trtshim_role role,
                                            const trtshim_weights *weights) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "set_weights: refitter is null");
    if (!name) return set_error(TRTSHIM_ERR_ARGUMENT, "set_weights: name is null");
    if (!weights) return set_error(TRTSHIM_ERR_ARGUMENT, "set_weights '%s': weights are null", name);
    if (!role_valid((int)role)) return set_error(TRTSHIM_ERR_ARGUMENT, "set_weights '%s': unknown role %d", name, (int)role);
    const trtshim_engine *e = r->engine;
    int32_t w = engine_find_weight(e, name, role);
    if (w < 0) return set_error(TRTSHIM_ERR_NOT_FOUND, "set_weights: the engine has no weight '%s' %s", name, role_name(role));
    const engine_weight *ew = &e->weights[w];
    char shape[200];
    format_shape(shape, sizeof(shape), ew);
    if (weights->dtype != ew->dtype || weights->count != ew->count)
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: expected %s %s (%lld elements), got %s with %lld elements",
                         name, role_name(role), dtype_name(ew->dtype), shape, (long long)ew->count,
                         dtype_name(weights->dtype), (long long)weights->count);
    if (!weights->values && ew->count > 0)
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: values are null", name, role_name(role));
    if (r->check_finite && !weights_all_finite(ew->dtype, weights->values, ew->count))
        return set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: contains NaN or infinite values", name, role_name(role));
    r->staged[w] = weights->values ? weights->values : (const void *)"";
    return TRTSHIM_OK;
}

trtshim_status trtshim_refitter_set_check_finite(trtshim_refitter *r, int32_t check) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "set_check_finite: refitter is null");
    r->check_finite = check ? 1 : 0;
    return TRTSHIM_OK;
}

/* Fills r->missing: every unstaged weight of a stripped engine; otherwise the unstaged members of each
   batch-norm fold that has a staged member and no retained copies. */
static void compute_missing(trtshim_refitter *r) {
    const trtshim_engine *e = r->engine;
    r->num_missing = 0;
    if (!e->has_weights) {
        for (int32_t w = 0; w < e->num_weights; w++)
            if (!r->staged[w]) r->missing[r->num_missing++] = w;
        return;
    }
    if (e->retained_valid) return;
    for (int32_t i = 0; i < e->num_units; i++) {
        const unit *u = &e->units[i];
        if (u->kind != UNIT_FOLD) continue;
        int any = 0;
        for (int32_t k = 0; k < u->num_sources; k++) any |= u->sources[k] >= 0 && r->staged[u->sources[k]] != NULL;
        if (!any) continue;
        for (int32_t k = 0; k < u->num_sources; k++) {
            int32_t w = u->sources[k];
            if (w < 0 || r->staged[w]) continue;
            int dup = 0;
            for (int32_t j = 0; j < r->num_missing; j++) dup |= r->missing[j] == w;
            if (!dup) r->missing[r->num_missing++] = w;
        }
    }
}

trtshim_status trtshim_refitter_missing_count(trtshim_refitter *r, int32_t *count) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "missing_count: refitter is null");
    if (!count) return set_error(TRTSHIM_ERR_ARGUMENT, "missing_count: count is null");
    compute_missing(r);
    *count = r->num_missing;
    return TRTSHIM_OK;
}

trtshim_status trtshim_refitter_missing(trtshim_refitter *r, int32_t index, const char **name, trtshim_role *role) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "missing: refitter is null");
    compute_missing(r);
    if (index < 0 || index >= r->num_missing)
        return set_error(TRTSHIM_ERR_ARGUMENT, "missing: index %d out of range (%d missing)", index, r->num_missing);
    const engine_weight *w = &r->engine->weights[r->missing[index]];
    if (name) *name = w->name;
    if (role) *role = w->role;
    return TRTSHIM_OK;
}

static void clear_staged(trtshim_refitter *r) { memset(r->staged, 0, sizeof(void *) * (size_t)r->engine->num_weights); }

static int unit_touched(const trtshim_refitter *r, const unit *u) {
    for (int32_t k = 0; k < u->num_sources; k++)
        if (u->sources[k] >= 0 && r->staged[u->sources[k]]) return 1;
    return 0;
}

static int is_float_dtype(trtshim_dtype d) { return d == TRTSHIM_FLOAT16 || d == TRTSHIM_BFLOAT16; }

/* Every check apply runs before it writes: missing weights and finiteness (name, role, dtype and count
   were checked when staged). */
static trtshim_status validate_staged(trtshim_refitter *r) {
    const trtshim_engine *e = r->engine;
    compute_missing(r);
    if (r->num_missing > 0) {
        const engine_weight *w = &e->weights[r->missing[0]];
        return set_error(TRTSHIM_ERR_VALIDATION, "refit: weight '%s' %s must be set too (%d missing)%s", w->name,
                         role_name(w->role), r->num_missing,
                         e->has_weights ? ": it is folded with a staged weight and the engine keeps no copy of it"
                                        : ": the engine is stripped and every weight must be set");
    }
    if (r->check_finite)
        for (int32_t w = 0; w < e->num_weights; w++)
            if (r->staged[w] && !weights_all_finite(e->weights[w].dtype, r->staged[w], e->weights[w].count))
                return set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: contains NaN or infinite values",
                                 e->weights[w].name, role_name(e->weights[w].role));
    return TRTSHIM_OK;
}

trtshim_status trtshim_refitter_validate(trtshim_refitter *r) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "refitter_validate: refitter is null");
    return validate_staged(r);
}

/* The write phase runs the touched units on the engine's threads, each thread taking the next unit from
   a shared counter and using its own slot of scratch (float16/bfloat16 sources widened to float32, then
   the unit's own scratch), so extra memory is bounded by threads x the largest unit, not by the model. */
typedef struct {
    trtshim_refitter *r;
    const int32_t *touched;
    int32_t num_touched;
    atomic_int next;
    float *scratch;
    int64_t slot_floats;
} apply_job;

static int64_t unit_need_floats(const trtshim_refitter *r, const unit *u) {
    const trtshim_engine *e = r->engine;
    int64_t need = unit_scratch_floats(e, u);
    for (int32_t k = 0; k < u->num_sources; k++) {
        int32_t w = u->sources[k];
        if (w >= 0 && r->staged[w] && is_float_dtype(e->weights[w].dtype)) need += e->weights[w].count;
    }
    return need;
}

static void apply_slots(void *context, int64_t begin, int64_t end) {
    apply_job *job = context;
    trtshim_refitter *r = job->r;
    trtshim_engine *e = r->engine;
    for (int64_t slot = begin; slot < end; slot++) {
        float *scratch = job->scratch + slot * job->slot_floats;
        for (int i = atomic_fetch_add(&job->next, 1); i < job->num_touched; i = atomic_fetch_add(&job->next, 1)) {
            const unit *u = &e->units[job->touched[i]];
            const float *src[6] = {0};
            float *next = scratch;
            for (int32_t k = 0; k < u->num_sources; k++) {
                int32_t w = u->sources[k];
                if (w < 0) continue;
                if (!r->staged[w]) {
                    src[k] = e->weights[w].retained; /* an unstaged fold member (missing() made sure it exists) */
                } else if (is_float_dtype(e->weights[w].dtype)) {
                    weights_to_f32(e->weights[w].dtype, r->staged[w], next, e->weights[w].count);
                    src[k] = next;
                    next += e->weights[w].count;
                } else {
                    src[k] = r->staged[w]; /* float32 as is; integers raw */
                }
            }
            unit_materialize_scratch(e, u, src, next);
            /* Fold members live in this unit only: keep their new values for later partial refits. */
            for (int32_t k = 0; k < u->num_sources; k++) {
                int32_t w = u->sources[k];
                if (w >= 0 && r->staged[w] && e->weights[w].retained)
                    memcpy(e->weights[w].retained, src[k], sizeof(float) * (size_t)e->weights[w].count);
            }
        }
    }
}

static trtshim_status validate_and_apply(trtshim_refitter *r) {
    trtshim_engine *e = r->engine;
    trtshim_status st = validate_staged(r);
    if (st) return st;

    int32_t *touched = malloc(sizeof(int32_t) * (size_t)(e->num_units + 1));
    if (!touched) return set_error(TRTSHIM_ERR_MEMORY, "refit: out of memory; nothing was changed");
    int32_t num_touched = 0;
    int64_t slot_floats = 1;
    for (int32_t i = 0; i < e->num_units; i++) {
        if (!unit_touched(r, &e->units[i])) continue;
        touched[num_touched++] = i;
        int64_t need = unit_need_floats(r, &e->units[i]);
        if (need > slot_floats) slot_floats = need;
    }
    int slots = e->num_threads < num_touched ? e->num_threads : num_touched;
    if (slots < 1) slots = 1;
    float *scratch = malloc(sizeof(float) * (size_t)(slot_floats * slots));
    if (!scratch && slots > 1) { /* fewer threads rather than failing */
        slots = 1;
        scratch = malloc(sizeof(float) * (size_t)slot_floats);
    }
    if (!scratch) {
        free(touched);
        return set_error(TRTSHIM_ERR_MEMORY, "refit: out of memory for %lld bytes of scratch; nothing was changed",
                         (long long)(slot_floats * 4));
    }

    /* From here on nothing can fail. */
    apply_job job = {r, touched, num_touched, 0, scratch, slot_floats};
    atomic_init(&job.next, 0);
    parallel_for(slots, slots, apply_slots, &job);
    /* Weights were written in host storage; resident copies of streamable ones follow. */
    for (int32_t i = 0; e->stream && i < num_touched; i++) stream_buffer_changed(e, e->units[touched[i]].buffer);
    if (!e->has_weights) e->retained_valid = 1; /* a full refit filled every copy */
    e->has_weights = 1;
    free(scratch);
    free(touched);
    return TRTSHIM_OK;
}

trtshim_status trtshim_refitter_apply(trtshim_refitter *r) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "refitter_apply: refitter is null");
    trtshim_engine *e = r->engine;
    pthread_mutex_lock(&e->lock);
    if (e->executing > 0 || e->applying) {
        int executing = e->executing > 0;
        pthread_mutex_unlock(&e->lock);
        clear_staged(r);
        return set_error(TRTSHIM_ERR_STATE, "refitter_apply: the engine is %s; nothing was changed",
                         executing ? "in use (executing in a context, or being serialized)"
                                   : "being refitted by another refitter");
    }
    e->applying = 1;
    pthread_mutex_unlock(&e->lock);
    trtshim_status st = validate_and_apply(r);
    pthread_mutex_lock(&e->lock);
    e->applying = 0;
    pthread_mutex_unlock(&e->lock);
    clear_staged(r);
    return st;
}
