/* engine.c: engine lifetime (reference counted) and queries: info, io, weights, describe. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "engine.h"
#include "gemm.h"

void engine_retain(trtshim_engine *e) {
    pthread_mutex_lock(&e->lock);
    e->refcount++;
    pthread_mutex_unlock(&e->lock);
}

void engine_release(trtshim_engine *e) {
    if (!e) return;
    pthread_mutex_lock(&e->lock);
    int left = --e->refcount;
    pthread_mutex_unlock(&e->lock);
    if (left > 0) return;
    for (int32_t i = 0; i < e->num_steps; i++) free(e->steps[i].members);
    free(e->steps);
    free(e->units);
    stream_free(e);
    for (int32_t i = 0; i < e->num_buffers; i++)
        if (!e->buffers[i].external) free(e->buffers[i].data);
    if (e->file_map) munmap(e->file_map, (size_t)e->file_map_bytes);
    free(e->buffers);
    for (int32_t i = 0; i < e->num_weights; i++) free(e->weights[i].retained);
    free(e->weights);
    free(e->layer_weight_index);
    free(e->io);
    free(e->tensor_offset);
    free(e->tensor_const_weight);
    trtshim_network_destroy(e->net);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

void trtshim_engine_destroy(trtshim_engine *engine) { engine_release(engine); }

trtshim_status engine_begin_read(trtshim_engine *e, const char *what) {
    pthread_mutex_lock(&e->lock);
    if (e->applying) {
        pthread_mutex_unlock(&e->lock);
        return set_error(TRTSHIM_ERR_STATE, "%s: a refit of this engine is being applied", what);
    }
    e->executing++;
    pthread_mutex_unlock(&e->lock);
    return TRTSHIM_OK;
}

void engine_end_read(trtshim_engine *e) {
    pthread_mutex_lock(&e->lock);
    e->executing--;
    pthread_mutex_unlock(&e->lock);
}

trtshim_status trtshim_engine_get_info(const trtshim_engine *e, trtshim_engine_info *info) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_get_info: engine is null");
    if (!info) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_get_info: info is null");
    memset(info, 0, sizeof(*info));
    info->num_io = e->num_io;
    info->num_inputs = e->net->num_inputs;
    info->num_layers = e->net->num_layers;
    info->num_kernels = e->num_steps;
    info->num_weights = e->refittable ? e->num_weights : 0;
    info->refittable = e->refittable;
    info->has_weights = e->has_weights;
    info->weight_precision = e->precision;
    for (int32_t i = 0; i < e->num_buffers; i++) info->weight_bytes += e->buffers[i].bytes;
    info->scratch_bytes = (e->arena_floats + e->temp_floats) * 4;
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_io(const trtshim_engine *e, int32_t index, const char **name, int32_t *is_input,
                                 trtshim_dtype *dtype, int32_t *rank, int64_t *dims) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_io: engine is null");
    if (index < 0 || index >= e->num_io)
        return set_error(TRTSHIM_ERR_ARGUMENT, "engine_io: index %d out of range (the engine has %d inputs and outputs)",
                         index, e->num_io);
    const engine_io *io = &e->io[index];
    const tensor_desc *d = &e->net->tensors[io->tensor].desc;
    if (name) *name = io->name;
    if (is_input) *is_input = io->is_input;
    if (dtype) *dtype = d->dtype;
    if (rank) *rank = d->rank;
    if (dims)
        for (int32_t i = 0; i < d->rank; i++) dims[i] = d->dims[i];
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_weight(const trtshim_engine *e, int32_t index, const char **name, trtshim_role *role,
                                     trtshim_dtype *dtype, int32_t *rank, int64_t *dims, uint64_t *bytes) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight: engine is null");
    int32_t n = e->refittable ? e->num_weights : 0;
    if (index < 0 || index >= n)
        return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight: index %d out of range (the engine has %d refittable weights)",
                         index, n);
    const engine_weight *w = &e->weights[index];
    if (name) *name = w->name;
    if (role) *role = w->role;
    if (dtype) *dtype = w->dtype;
    if (rank) *rank = w->rank;
    if (dims)
        for (int32_t i = 0; i < w->rank; i++) dims[i] = w->dims[i];
    if (bytes) *bytes = w->bytes;
    return TRTSHIM_OK;
}

/* ---- quantized kernel formats -------------------------------------------------------------- */

static const char *format_name(const trtshim_engine *e, int32_t format) {
    switch (format) {
    case TRTSHIM_WEIGHT_FORMAT_INT8: return "int8";
    case TRTSHIM_WEIGHT_FORMAT_FP8_E4M3: return "fp8_e4m3";
    case TRTSHIM_WEIGHT_FORMAT_INT4: return "int4";
    default: return dtype_name(e->precision);
    }
}

trtshim_status trtshim_engine_weight_format(const trtshim_engine *e, int32_t index, trtshim_weight_format *format,
                                            int32_t *group_size) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_format: engine is null");
    int32_t n = e->refittable ? e->num_weights : 0;
    if (index < 0 || index >= n)
        return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_format: index %d out of range (the engine has %d refittable "
                         "weights)", index, n);
    gemm_quant_format f = {(gemm_quant_kind)0, 0};
    for (int32_t i = 0; i < e->num_units && !f.kind; i++)
        if (e->units[i].sources[0] == index && e->units[i].kind != UNIT_PLAIN && e->units[i].kind != UNIT_BIAS)
            f = unit_quant_format(e, &e->units[i]);
    if (format) *format = (trtshim_weight_format)f.kind;
    if (group_size) *group_size = f.kind == GEMM_QUANT_INT4 ? f.group_size : 0;
    return TRTSHIM_OK;
}

/* ---- describe ------------------------------------------------------------------------------- */

typedef struct {
    char *buf;
    uint64_t cap, len;
} text;

static void put(text *t, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *format, ...) {
    char tmp[512];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(tmp, sizeof(tmp), format, args);
    va_end(args);
    if (n < 0) return;
    for (int i = 0; i < n && i < (int)sizeof(tmp) - 1; i++) {
        if (t->len + 1 < t->cap) t->buf[t->len] = tmp[i];
        t->len++;
    }
}

static void put_json_string(text *t, const char *s) {
    put(t, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') put(t, "\\%c", ch);
        else if (ch < 0x20) put(t, "\\u%04x", ch);
        else put(t, "%c", ch);
    }
    put(t, "\"");
}

static const char *step_kind_name(const trtshim_engine *e, const step *s) {
    switch (s->kind) {
    case STEP_GEMM: return "gemm";
    case STEP_CONV: return "conv";
    case STEP_MATMUL: return "matmul";
    default: return layer_kind_name(e->net->layers[s->layer].kind);
    }
}

trtshim_status trtshim_engine_describe(const trtshim_engine *e, char *buffer, uint64_t capacity, uint64_t *length) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_describe: engine is null");
    if (!buffer && capacity) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_describe: buffer is null");
    text t = {buffer, capacity, 0};
    put(&t, "{\"refittable\":%s,\"has_weights\":%s,\"precision\":\"%s\",", e->refittable ? "true" : "false",
        e->has_weights ? "true" : "false", dtype_name(e->precision));
    put(&t, "\"gemm_weight_format\":\"%s\",\"conv_weight_format\":\"%s\",\"int4_group_size\":%d,\"steps\":[",
        format_name(e, e->gemm_format), format_name(e, e->conv_format), (int)e->int4_group_size);
    for (int32_t i = 0; i < e->num_steps; i++) {
        const step *s = &e->steps[i];
        put(&t, "%s{\"kind\":\"%s\",\"layers\":[", i ? "," : "", step_kind_name(e, s));
        int first = 1;
        for (int32_t m = 0; m < s->num_members; m++)
            for (int32_t k = 0; k < s->members[m].num_layers; k++) {
                put(&t, first ? "" : ",");
                put_json_string(&t, e->net->layers[s->members[m].layers[k]].name);
                first = 0;
            }
        put(&t, "],\"tactic\":");
        if (s->tactic >= 0) put_json_string(&t, gemm_tactic_name(s->tactic));
        else put(&t, "null");
        if (s->kind == STEP_GEMM || s->kind == STEP_CONV) put(&t, ",\"m\":%lld,\"n\":%lld,\"k\":%lld", (long long)s->M,
                                                              (long long)s->N, (long long)s->K);
        if (s->kind == STEP_GEMM || s->kind == STEP_CONV) {
            put(&t, ",\"weight_format\":\"%s\"", format_name(e, (int32_t)s->quant.kind));
            if (s->quant.kind == GEMM_QUANT_INT4) put(&t, ",\"group_size\":%d", (int)s->quant.group_size);
        }
        put(&t, ",\"activation\":%d,\"weights\":[", (int)s->act);
        first = 1;
        for (int32_t u = 0; u < e->num_units; u++) {
            if (e->units[u].step != i) continue;
            for (int32_t k = 0; k < e->units[u].num_sources; k++) {
                int32_t w = e->units[u].sources[k];
                if (w < 0) continue;
                put(&t, "%s{\"name\":", first ? "" : ",");
                put_json_string(&t, e->weights[w].name);
                put(&t, ",\"role\":\"%s\"}", role_name(e->weights[w].role));
                first = 0;
            }
        }
        put(&t, "]}");
    }
    put(&t, "]}");
    if (capacity) buffer[t.len < capacity ? t.len : capacity - 1] = 0;
    if (length) *length = t.len;
    return TRTSHIM_OK;
}
