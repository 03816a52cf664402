/* refit.c: the refitter. Stages network-level weights, validates all of them, then re-runs the same
   unit transforms the builder ran, so a refit equals a rebuild bit for bit. All or nothing: every check
   and every allocation happens before the first write into the engine. */
#include <math.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "threadpool.h"

struct trtshim_refitter {
    trtshim_engine *engine;
    const void **staged;  /* per weight: the caller's values, NULL when not staged */
    const float **scales; /* per weight: the scales of already-quantized values, NULL for float values */
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
    r->scales = calloc((size_t)engine->num_weights + 1, sizeof(float *));
    if (!r->staged || !r->missing || !r->scales) {
        free(r->staged), free(r->missing), free(r->scales), free(r);
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
    free(r->scales);
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
    r->scales[w] = NULL;
    return TRTSHIM_OK;
}

/* ---- already-quantized weights --------------------------------------------------------------- */

/* The weight a quantized pack unit packs, as a checkpoint holds it: `channels` output channels of K
   values, transposed = 1 for [channels, K] (torch's [out, in]), 0 for [K, channels]. */
static void quant_geometry(const trtshim_engine *e, const unit *u, int64_t *channels, int64_t *K, int *transposed) {
    const step *s = &e->steps[u->step];
    *K = s->K;
    if (u->kind == UNIT_PACK_GEMM) {
        *channels = s->members[u->member].n;
        *transposed = s->members[u->member].kernel_transposed;
    } else {
        *channels = s->N * e->net->layers[s->layer].params[11];
        *transposed = 1;
    }
}

static const char *quant_name(gemm_quant_kind kind) {
    return kind == GEMM_QUANT_INT8 ? "int8" : kind == GEMM_QUANT_FP8_E4M3 ? "fp8 e4m3" : kind == GEMM_QUANT_INT4 ? "int4" : "?";
}

static trtshim_dtype quant_values_dtype(gemm_quant_kind kind) {
    return kind == GEMM_QUANT_INT8 ? TRTSHIM_INT8 : kind == GEMM_QUANT_FP8_E4M3 ? TRTSHIM_FP8_E4M3 : TRTSHIM_UINT8;
}

/* Bytes of the checkpoint's values: one per element, INT4 two per byte along K. */
static int64_t quant_values_count(gemm_quant_kind kind, int64_t channels, int64_t K) {
    return kind == GEMM_QUANT_INT4 ? channels * ((K + 1) / 2) : channels * K;
}

static int zero_point_nonzero(const trtshim_weights *z, int64_t *at) {
    for (int64_t i = 0; i < z->count; i++) {
        int64_t v = z->dtype == TRTSHIM_INT8 ? ((const int8_t *)z->values)[i] : ((const int32_t *)z->values)[i];
        if (v != 0) {
            *at = i;
            return 1;
        }
    }
    return 0;
}

trtshim_status trtshim_refitter_set_quantized_weights(trtshim_refitter *r, const char *name, trtshim_role role,
                                                      int32_t group_size, const trtshim_weights *values,
                                                      const trtshim_weights *scales, const trtshim_weights *zero_points) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "set_quantized_weights: refitter is null");
    if (!name) return set_error(TRTSHIM_ERR_ARGUMENT, "set_quantized_weights: name is null");
    if (!values || !scales)
        return set_error(TRTSHIM_ERR_ARGUMENT, "set_quantized_weights '%s': values or scales are null", name);
    if (!role_valid((int)role))
        return set_error(TRTSHIM_ERR_ARGUMENT, "set_quantized_weights '%s': unknown role %d", name, (int)role);
    const trtshim_engine *e = r->engine;
    int32_t w = engine_find_weight(e, name, role);
    if (w < 0)
        return set_error(TRTSHIM_ERR_NOT_FOUND, "set_quantized_weights: the engine has no weight '%s' %s", name,
                         role_name(role));
    const char *rn = role_name(role);
    /* Every unit that reads the weight must be a quantized pack of one format and geometry. */
    gemm_quant_format f = {(gemm_quant_kind)0, 0};
    int64_t channels = 0, K = 0;
    int transposed = 0, units = 0, fold = 0, float_pack = 0, other = 0, layouts_differ = 0;
    for (int32_t i = 0; i < e->num_units; i++) {
        const unit *u = &e->units[i];
        int reads = 0;
        for (int32_t k = 0; k < u->num_sources; k++) reads |= u->sources[k] == w;
        if (!reads) continue;
        gemm_quant_format uf = unit_quant_format(e, u);
        if (u->kind == UNIT_FOLD) {
            fold = 1;
            f = uf;
            continue;
        }
        if (u->kind != UNIT_PACK_GEMM && u->kind != UNIT_PACK_CONV) {
            other = 1;
            continue;
        }
        if (!uf.kind) {
            float_pack = 1;
            continue;
        }
        int64_t uc, uk;
        int ut;
        quant_geometry(e, u, &uc, &uk, &ut);
        if (units > 0 && (uf.kind != f.kind || uf.group_size != f.group_size || uc != channels || uk != K || ut != transposed))
            layouts_differ = 1;
        f = uf, channels = uc, K = uk, transposed = ut;
        units++;
    }
    if (float_pack || (fold && !f.kind))
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: the engine holds it as %s, not quantized; give float "
                         "values (set_weights), a quantized checkpoint dequantized", name, rn, dtype_name(e->precision));
    if (fold)
        return set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: a batch norm is folded into this convolution, so its "
                         "%s kernel is quantized after the fold; give float values (set_weights)", name, rn,
                         quant_name(f.kind));
    if (units == 0)
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: not a GEMM or convolution kernel; only kernels are held "
                         "quantized, give float values (set_weights)", name, rn);
    if (other)
        return set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: the engine also keeps it unquantized (a constant read "
                         "as a tensor); give float values (set_weights)", name, rn);
    if (layouts_differ)
        return set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: packed by several GEMMs in different layouts; give "
                         "float values (set_weights)", name, rn);
    char format[64];
    if (f.kind == GEMM_QUANT_INT4) snprintf(format, sizeof(format), "int4 kernels in groups of %d", (int)f.group_size);
    else snprintf(format, sizeof(format), "%s kernels, one scale per output channel", quant_name(f.kind));
    trtshim_dtype want = quant_values_dtype(f.kind);
    if (values->dtype != want)
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: the engine holds %s, so the values must be %s%s; got %s",
                         name, rn, format, dtype_name(want), f.kind == GEMM_QUANT_INT4 ? " (two per byte along K)" : "",
                         dtype_name(values->dtype));
    int32_t want_group = f.kind == GEMM_QUANT_INT4 ? f.group_size : 0;
    if (group_size != want_group && !(f.kind != GEMM_QUANT_INT4 && group_size == 0))
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: the engine holds %s; the checkpoint's group size is %d",
                         name, rn, format, (int)group_size);
    int64_t groups = gemm_quant_groups(f, K), want_values = quant_values_count(f.kind, channels, K);
    char shape[96], scale_shape[96];
    int64_t kk = f.kind == GEMM_QUANT_INT4 ? (K + 1) / 2 : K;
    snprintf(shape, sizeof(shape), transposed ? "[%lld, %lld]" : "[%lld, %lld]", (long long)(transposed ? channels : kk),
             (long long)(transposed ? kk : channels));
    snprintf(scale_shape, sizeof(scale_shape), "[%lld, %lld]", (long long)(transposed ? channels : groups),
             (long long)(transposed ? groups : channels));
    if (values->count != want_values)
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: expected %s values %s (%lld), got %lld", name, rn,
                         dtype_name(want), shape, (long long)want_values, (long long)values->count);
    if (scales->dtype != TRTSHIM_FLOAT32 || scales->count != channels * groups)
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: expected float32 scales %s (%lld) for %s, got %s with "
                         "%lld elements", name, rn, scale_shape, (long long)(channels * groups), format,
                         dtype_name(scales->dtype), (long long)scales->count);
    if ((!values->values && want_values > 0) || (!scales->values && scales->count > 0))
        return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: values or scales are null", name, rn);
    if (zero_points && (zero_points->values || zero_points->count)) {
        if ((zero_points->dtype != TRTSHIM_INT8 && zero_points->dtype != TRTSHIM_INT32) ||
            zero_points->count != scales->count || !zero_points->values)
            return set_error(TRTSHIM_ERR_ARGUMENT, "weight '%s' %s: expected int8 or int32 zero points, one per scale "
                             "(%lld), got %s with %lld elements", name, rn, (long long)scales->count,
                             dtype_name(zero_points->dtype), (long long)zero_points->count);
        int64_t at;
        if (zero_point_nonzero(zero_points, &at))
            return set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: zero point %lld is not 0: asymmetric quantization "
                             "is not supported by quantized kernels (a float engine takes it dequantized)", name, rn,
                             (long long)at);
    }
    r->staged[w] = values->values ? values->values : (const void *)"";
    r->scales[w] = scales->values ? scales->values : (const float *)"";
    return TRTSHIM_OK;
}

/* The format of a weight staged already quantized (from its first pack unit). */
static gemm_quant_format staged_format(const trtshim_engine *e, int32_t w, const unit **first) {
    gemm_quant_format none = {(gemm_quant_kind)0, 0};
    for (int32_t i = 0; i < e->num_units; i++)
        if (e->units[i].sources[0] == w && (e->units[i].kind == UNIT_PACK_GEMM || e->units[i].kind == UNIT_PACK_CONV)) {
            if (first) *first = &e->units[i];
            return unit_quant_format(e, &e->units[i]);
        }
    return none;
}

/* Scales finite and >= 0, fp8 codes not NaN: the checks gemm_quant_pack_quantized would fail on. */
static trtshim_status check_quantized(const trtshim_refitter *r, int32_t w) {
    const trtshim_engine *e = r->engine;
    const unit *u = NULL;
    gemm_quant_format f = staged_format(e, w, &u);
    int64_t channels, K;
    int transposed;
    quant_geometry(e, u, &channels, &K, &transposed);
    const engine_weight *ew = &e->weights[w];
    int64_t n = channels * gemm_quant_groups(f, K);
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(r->scales[w][i]) || r->scales[w][i] < 0.0f)
            return set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: scale %lld is %g, expected a finite number >= 0",
                             ew->name, role_name(ew->role), (long long)i, (double)r->scales[w][i]);
    if (f.kind == GEMM_QUANT_FP8_E4M3) {
        const uint8_t *q = r->staged[w];
        for (int64_t i = 0; i < channels * K; i++)
            if ((q[i] & 0x7f) == 0x7f)
                return set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: value %lld is the e4m3 NaN code 0x%02x",
                                 ew->name, role_name(ew->role), (long long)i, q[i]);
    }
    return TRTSHIM_OK;
}

/* INT4 values two per byte along K (offset binary) -> one int8 per value in the same layout. */
static void unpack_int4(const uint8_t *packed, int64_t channels, int64_t K, int transposed, int8_t *out) {
    int64_t half = (K + 1) / 2;
    for (int64_t j = 0; j < channels; j++)
        for (int64_t k = 0; k < K; k++) {
            uint8_t byte = transposed ? packed[j * half + k / 2] : packed[(k / 2) * channels + j];
            int8_t q = (int8_t)(((byte >> (4 * (k & 1))) & 15) - 8);
            if (transposed) out[j * K + k] = q;
            else out[k * channels + j] = q;
        }
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

static void clear_staged(trtshim_refitter *r) {
    memset(r->staged, 0, sizeof(void *) * (size_t)r->engine->num_weights);
    memset(r->scales, 0, sizeof(float *) * (size_t)r->engine->num_weights);
}

static int unit_touched(const trtshim_refitter *r, const unit *u) {
    for (int32_t k = 0; k < u->num_sources; k++)
        if (u->sources[k] >= 0 && r->staged[u->sources[k]]) return 1;
    return 0;
}

static int is_float_dtype(trtshim_dtype d) { return d == TRTSHIM_FLOAT16 || d == TRTSHIM_BFLOAT16; }

/* The units run in two passes over the engine's threads, each thread taking the next unit from a shared
   counter and using its own slot of scratch (float16/bfloat16 sources widened to float32, unpacked int4
   values, then the unit's own scratch), so extra memory is bounded by threads x the largest unit, not by
   the model. CHECK runs unit_check on the units that will quantize float values (changing nothing);
   WRITE writes the engine. */
enum { PASS_CHECK, PASS_WRITE };

typedef struct {
    trtshim_refitter *r;
    int pass;
    const int32_t *touched;
    int32_t num_touched;
    atomic_int next;
    atomic_int failed; /* CHECK: the lowest index into touched whose check failed, num_touched when none */
    float *scratch;
    int64_t slot_floats;
} apply_job;

static int quant_staged_unit(const trtshim_refitter *r, const unit *u) {
    return (u->kind == UNIT_PACK_GEMM || u->kind == UNIT_PACK_CONV) && r->scales[u->sources[0]] != NULL;
}

static int unit_in_pass(const trtshim_refitter *r, const unit *u, int pass) {
    if (pass == PASS_WRITE) return 1;
    return unit_quant_format(r->engine, u).kind != 0 && !quant_staged_unit(r, u);
}

static int64_t unit_need_floats(const trtshim_refitter *r, const unit *u) {
    const trtshim_engine *e = r->engine;
    if (quant_staged_unit(r, u)) {
        int64_t channels, K;
        int transposed;
        quant_geometry(e, u, &channels, &K, &transposed);
        return unit_quant_format(e, u).kind == GEMM_QUANT_INT4 ? (channels * K + 3) / 4 : 0;
    }
    int64_t need = unit_scratch_floats(e, u);
    for (int32_t k = 0; k < u->num_sources; k++) {
        int32_t w = u->sources[k];
        if (w >= 0 && r->staged[w] && is_float_dtype(e->weights[w].dtype)) need += e->weights[w].count;
    }
    return need;
}

/* Runs (or checks) one unit with `scratch` of unit_need_floats floats. */
static trtshim_status run_unit(trtshim_refitter *r, int pass, const unit *u, float *scratch) {
    trtshim_engine *e = r->engine;
    if (quant_staged_unit(r, u)) {
        int32_t w = u->sources[0];
        const void *q = r->staged[w];
        if (unit_quant_format(e, u).kind == GEMM_QUANT_INT4) {
            int64_t channels, K;
            int transposed;
            quant_geometry(e, u, &channels, &K, &transposed);
            unpack_int4(q, channels, K, transposed, (int8_t *)scratch);
            q = scratch;
        }
        unit_materialize_quantized(e, u, q, r->scales[w]);
        return TRTSHIM_OK;
    }
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
    if (pass == PASS_CHECK) return unit_check(e, u, src, next);
    unit_materialize_scratch(e, u, src, next);
    /* Fold members live in this unit only: keep their new values for later partial refits. */
    for (int32_t k = 0; k < u->num_sources; k++) {
        int32_t w = u->sources[k];
        if (w >= 0 && r->staged[w] && e->weights[w].retained)
            memcpy(e->weights[w].retained, src[k], sizeof(float) * (size_t)e->weights[w].count);
    }
    return TRTSHIM_OK;
}

static void apply_slots(void *context, int64_t begin, int64_t end) {
    apply_job *job = context;
    trtshim_engine *e = job->r->engine;
    for (int64_t slot = begin; slot < end; slot++) {
        float *scratch = job->scratch + slot * job->slot_floats;
        for (int i = atomic_fetch_add(&job->next, 1); i < job->num_touched; i = atomic_fetch_add(&job->next, 1)) {
            if (run_unit(job->r, job->pass, &e->units[job->touched[i]], scratch) == TRTSHIM_OK) continue;
            int seen = atomic_load(&job->failed);
            while (i < seen && !atomic_compare_exchange_weak(&job->failed, &seen, i)) {}
        }
    }
}

/* One pass over the staged units. CHECK returns the failure of the first unit (in unit order) that fails,
   with its message; WRITE cannot fail once its scratch is allocated. */
static trtshim_status run_pass(trtshim_refitter *r, int pass) {
    trtshim_engine *e = r->engine;
    int32_t *touched = malloc(sizeof(int32_t) * (size_t)(e->num_units + 1));
    if (!touched) return set_error(TRTSHIM_ERR_MEMORY, "refit: out of memory; nothing was changed");
    int32_t num_touched = 0;
    int64_t slot_floats = 1;
    for (int32_t i = 0; i < e->num_units; i++) {
        if (!unit_touched(r, &e->units[i]) || !unit_in_pass(r, &e->units[i], pass)) continue;
        touched[num_touched++] = i;
        int64_t need = unit_need_floats(r, &e->units[i]);
        if (need > slot_floats) slot_floats = need;
    }
    if (num_touched == 0) {
        free(touched);
        return TRTSHIM_OK;
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
    apply_job job = {r, pass, touched, num_touched, 0, 0, scratch, slot_floats};
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, num_touched);
    parallel_for(slots, slots, apply_slots, &job);
    trtshim_status st = TRTSHIM_OK;
    int failed = atomic_load(&job.failed);
    if (failed < num_touched) st = run_unit(r, pass, &e->units[touched[failed]], scratch); /* its message, again */
    if (pass == PASS_WRITE)
        /* Weights were written in host storage; resident copies of streamable ones follow. */
        for (int32_t i = 0; e->stream && i < num_touched; i++) stream_buffer_changed(e, e->units[touched[i]].buffer);
    free(scratch);
    free(touched);
    return st;
}

/* Every check apply runs before it writes: missing weights, finiteness where asked, the ranges of already
   quantized values and scales, and finiteness of every value a quantized kernel would quantize (name,
   role, dtype and count were checked when staged). */
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
    for (int32_t w = 0; w < e->num_weights; w++) {
        if (!r->staged[w]) continue;
        if (r->scales[w]) {
            trtshim_status st = check_quantized(r, w);
            if (st) return st;
        } else if (r->check_finite && !weights_all_finite(e->weights[w].dtype, r->staged[w], e->weights[w].count)) {
            return set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: contains NaN or infinite values",
                             e->weights[w].name, role_name(e->weights[w].role));
        }
    }
    return run_pass(r, PASS_CHECK);
}

trtshim_status trtshim_refitter_validate(trtshim_refitter *r) {
    if (!r) return set_error(TRTSHIM_ERR_ARGUMENT, "refitter_validate: refitter is null");
    return validate_staged(r);
}

static trtshim_status validate_and_apply(trtshim_refitter *r) {
    trtshim_engine *e = r->engine;
    trtshim_status st = validate_staged(r);
    if (st) return st;
    /* Past its scratch allocation the write pass cannot fail. */
    st = run_pass(r, PASS_WRITE);
    if (st) return st;
    if (!e->has_weights) e->retained_valid = 1; /* a full refit filled every copy */
    e->has_weights = 1;
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
