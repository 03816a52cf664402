/* builder.c: turns a network into compiled steps (fusion planning, tactic choice, buffer layout) and
   holds the one weight transform per unit that both build and refit call. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "gemm.h"
#include "threadpool.h"

void trtshim_build_config_default(trtshim_build_config *config) {
    if (!config) return;
    memset(config, 0, sizeof(*config));
    config->weight_precision = TRTSHIM_FLOAT32;
    config->refittable = 1;
    config->tactic_search = 0;
    config->num_threads = 0;
    config->gemm_weight_format = TRTSHIM_WEIGHT_FORMAT_AS_PRECISION;
    config->conv_weight_format = TRTSHIM_WEIGHT_FORMAT_AS_PRECISION;
    config->int4_group_size = 128;
}

size_t step_block_bytes(const trtshim_engine *e, const step *s) {
    if (s->quant.kind) return gemm_quant_packed_bytes(s->quant, s->K, s->N);
    return gemm_packed_bytes(s->tactic, s->K, s->N, e->precision);
}

/* The quantized format of a step that packs a GEMM (conv = 0) or convolution (conv = 1) kernel. */
static gemm_quant_format step_format(const trtshim_engine *e, int conv) {
    int32_t f = conv ? e->conv_format : e->gemm_format;
    gemm_quant_format q = {(gemm_quant_kind)f, f == TRTSHIM_WEIGHT_FORMAT_INT4 ? e->int4_group_size : 0};
    return q;
}

gemm_quant_format unit_quant_format(const trtshim_engine *e, const unit *u) {
    gemm_quant_format none = {(gemm_quant_kind)0, 0};
    if (u->kind != UNIT_PACK_GEMM && u->kind != UNIT_PACK_CONV && u->kind != UNIT_FOLD) return none;
    return e->steps[u->step].quant;
}

int32_t engine_find_weight(const trtshim_engine *e, const char *name, trtshim_role role) {
    for (int32_t i = 0; i < e->num_weights; i++)
        if (e->weights[i].role == role && strcmp(e->weights[i].name, name) == 0) return i;
    return -1;
}

static int64_t tensor_volume(const trtshim_network *net, int32_t t) {
    return shape_volume(net->tensors[t].desc.rank, net->tensors[t].desc.dims);
}

/* ---- engine object ------------------------------------------------------------------------------ */

trtshim_status engine_new(trtshim_network *net, trtshim_dtype precision, int32_t refittable, int32_t tactic_search,
                          int32_t config_threads, trtshim_engine **out) {
    trtshim_engine *e = calloc(1, sizeof(trtshim_engine));
    if (!e) return set_error(TRTSHIM_ERR_MEMORY, "build: out of memory");
    pthread_mutex_init(&e->lock, NULL);
    e->refcount = 1;
    e->net = net;
    e->precision = precision;
    e->refittable = refittable;
    e->tactic_search = tactic_search;
    e->config_threads = config_threads;
    e->num_threads = config_threads > 0 ? config_threads : cpu_count();
    if (e->num_threads < 1) e->num_threads = 1;
    int32_t nw = 0;
    for (int32_t l = 0; l < net->num_layers; l++)
        for (int s = 0; s < MAX_LAYER_WEIGHTS; s++) nw += net->layers[l].weights[s].present;
    e->weights = calloc((size_t)(nw ? nw : 1), sizeof(engine_weight));
    e->layer_weight_index = malloc(sizeof(int32_t) * (size_t)(net->num_layers * MAX_LAYER_WEIGHTS + 1));
    e->io = calloc((size_t)(net->num_inputs + net->num_outputs + 1), sizeof(engine_io));
    e->tensor_offset = malloc(sizeof(int64_t) * (size_t)(net->num_tensors + 1));
    e->tensor_const_weight = malloc(sizeof(int32_t) * (size_t)(net->num_tensors + 1));
    if (!e->weights || !e->layer_weight_index || !e->io || !e->tensor_offset || !e->tensor_const_weight) {
        e->net = NULL;
        engine_release(e);
        return set_error(TRTSHIM_ERR_MEMORY, "build: out of memory");
    }
    for (int32_t l = 0; l < net->num_layers; l++) {
        const layer *ly = &net->layers[l];
        for (int s = 0; s < MAX_LAYER_WEIGHTS; s++) {
            e->layer_weight_index[l * MAX_LAYER_WEIGHTS + s] = -1;
            if (!ly->weights[s].present) continue;
            engine_weight *w = &e->weights[e->num_weights];
            w->layer = l;
            w->slot = s;
            w->name = ly->name;
            w->role = ly->weights[s].role;
            w->dtype = ly->weights[s].dtype;
            w->rank = ly->weights[s].rank;
            memcpy(w->dims, ly->weights[s].dims, sizeof(w->dims));
            w->count = ly->weights[s].count;
            w->bytes = (uint64_t)w->count * (uint64_t)trtshim_dtype_size(w->dtype);
            w->plain_buffer = -1;
            e->layer_weight_index[l * MAX_LAYER_WEIGHTS + s] = e->num_weights++;
        }
    }
    for (int32_t i = 0; i < net->num_inputs; i++)
        e->io[e->num_io++] = (engine_io){net->inputs[i].name, net->inputs[i].tensor, 1};
    for (int32_t i = 0; i < net->num_outputs; i++)
        e->io[e->num_io++] = (engine_io){net->outputs[i].name, net->outputs[i].tensor, 0};
    for (int32_t t = 0; t < net->num_tensors; t++) {
        e->tensor_offset[t] = -1;
        e->tensor_const_weight[t] = -1;
    }
    *out = e;
    return TRTSHIM_OK;
}

static int32_t add_buffer(trtshim_engine *e, uint64_t bytes) {
    if (e->num_buffers == e->cap_buffers) {
        int32_t cap = e->cap_buffers ? e->cap_buffers * 2 : 16;
        void *p = realloc(e->buffers, sizeof(weight_buffer) * (size_t)cap);
        if (!p) return -1;
        e->buffers = p;
        e->cap_buffers = cap;
    }
    e->buffers[e->num_buffers] = (weight_buffer){NULL, bytes, 0};
    return e->num_buffers++;
}

static int add_unit(trtshim_engine *e, unit u) {
    if (e->num_units == e->cap_units) {
        int32_t cap = e->cap_units ? e->cap_units * 2 : 16;
        void *p = realloc(e->units, sizeof(unit) * (size_t)cap);
        if (!p) return 0;
        e->units = p;
        e->cap_units = cap;
    }
    e->units[e->num_units++] = u;
    return 1;
}

trtshim_status engine_alloc_buffers(trtshim_engine *e) {
    for (int32_t i = 0; i < e->num_buffers; i++) {
        if (e->buffers[i].data || e->buffers[i].external) continue; /* external: set from a mapped file */
        e->buffers[i].data = aligned_zalloc(e->buffers[i].bytes);
        if (!e->buffers[i].data)
            return set_error(TRTSHIM_ERR_MEMORY, "engine: out of memory for a weight buffer of %llu bytes",
                             (unsigned long long)e->buffers[i].bytes);
    }
    return TRTSHIM_OK;
}

/* ---- fusion planning ------------------------------------------------------------------------- */

typedef struct {
    const trtshim_network *net;
    int32_t *consumers;      /* uses per tensor */
    int32_t *consumer;       /* the last consuming layer per tensor */
    int32_t *is_output;
    int32_t *absorbed;       /* per layer */
    int32_t *activation_use; /* per tensor: read as an activation by some step */
    int32_t *materialized;   /* per tensor: written by a step */
} planner;

static int single_use(const planner *p, int32_t t) { return p->consumers[t] == 1 && !p->is_output[t]; }

static int32_t const_layer_of(const planner *p, int32_t t) {
    int32_t l = p->net->tensors[t].producer_layer;
    return (l >= 0 && p->net->layers[l].kind == LK_CONSTANT && p->net->tensors[t].desc.dtype == TRTSHIM_FLOAT32) ? l : -1;
}

/* If layer `add` adds a constant to `cur` that broadcasts only along the feature axis (a bias of n
   values), returns the constant layer; else -1. */
static int32_t bias_add_constant(const planner *p, int32_t add, int32_t cur, int32_t feature_axis, int64_t n) {
    const layer *l = &p->net->layers[add];
    if (l->kind != LK_ELEMENTWISE || l->params[0] != TRTSHIM_ELEMENTWISE_ADD) return -1;
    int32_t other = l->inputs[0] == cur ? l->inputs[1] : l->inputs[0];
    if (other == cur) return -1;
    int32_t c = const_layer_of(p, other);
    if (c < 0) return -1;
    const tensor_desc *cd = &p->net->tensors[other].desc, *od = &p->net->tensors[cur].desc;
    if (cd->rank > od->rank || od->rank - cd->rank > feature_axis) return -1;
    for (int32_t j = 0; j < cd->rank; j++) {
        int32_t i = od->rank - cd->rank + j;
        if (cd->dims[j] != (i == feature_axis ? n : 1)) return -1;
    }
    return c;
}

/* Follows the single-use chain after a GEMM or convolution: optional batch norm (convolution only),
   optional bias add (when there is no bias yet), optional activation. */
static void follow_chain(const planner *p, const trtshim_engine *e, step_member *m, trtshim_unary_op *act,
                         int is_conv, int64_t n) {
    const trtshim_network *net = p->net;
    int32_t cur = m->out_tensor;
    int32_t feature_axis = is_conv ? 1 : net->tensors[cur].desc.rank - 1;
    *act = TRTSHIM_UNARY_IDENTITY;
    if (is_conv && single_use(p, cur) && net->layers[p->consumer[cur]].kind == LK_BATCH_NORM &&
        !p->absorbed[p->consumer[cur]]) {
        int32_t bn = p->consumer[cur];
        m->bn_layer = bn;
        m->layers[m->num_layers++] = bn;
        cur = net->layers[bn].output;
    }
    if (m->bn_layer < 0 && m->bias_w < 0 && single_use(p, cur) && !p->absorbed[p->consumer[cur]]) {
        int32_t add = p->consumer[cur];
        int32_t c = bias_add_constant(p, add, cur, feature_axis, n);
        if (c >= 0) {
            m->bias_w = e->layer_weight_index[c * MAX_LAYER_WEIGHTS];
            m->layers[m->num_layers++] = add;
            cur = net->layers[add].output;
        }
    }
    if (single_use(p, cur) && net->layers[p->consumer[cur]].kind == LK_UNARY && !p->absorbed[p->consumer[cur]]) {
        int32_t u = p->consumer[cur];
        *act = (trtshim_unary_op)net->layers[u].params[0];
        m->layers[m->num_layers++] = u;
        cur = net->layers[u].output;
    }
    m->out_tensor = cur;
}

static step_member member_init(int32_t l, int32_t out) {
    step_member m;
    memset(&m, 0, sizeof(m));
    m.layers[0] = l;
    m.num_layers = 1;
    m.out_tensor = out;
    m.kernel_w = -1;
    m.bias_w = -1;
    m.bn_layer = -1;
    return m;
}

/* A matrix multiply whose B is a float constant of rank 2 (or with leading ones) and whose A is not
   transposed is a GEMM with a packed weight. */
static int32_t matmul_const_b(const planner *p, const layer *l) {
    if (l->params[0] != 0) return -1;
    int32_t c = const_layer_of(p, l->inputs[1]);
    if (c < 0) return -1;
    const tensor_desc *bd = &p->net->tensors[l->inputs[1]].desc;
    for (int32_t i = 0; i + 2 < bd->rank; i++)
        if (bd->dims[i] != 1) return -1;
    return c;
}

static void time_run(const trtshim_engine *e, gemm_quant_format quant, int t, int64_t M, int64_t N, int64_t K,
                     const float *a, const void *packed, float *c) {
    if (quant.kind) gemm_quant_run(t, quant, M, N, K, a, K, packed, NULL, TRTSHIM_UNARY_IDENTITY, c, N, e->num_threads);
    else gemm_run(t, M, N, K, a, K, packed, e->precision, NULL, TRTSHIM_UNARY_IDENTITY, c, N, e->num_threads);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Times every supported tactic on the real M and K with scratch data and keeps the fastest. N is cut to
   a few hundred columns (a multiple of 64) when the full product would take long: tactics differ in
   row blocking, vector width and threading, which the cut keeps, and a slow scalar tactic then costs
   milliseconds, not seconds. Each tactic runs once; those within 1.5x of the best run twice more. */
static trtshim_status search_tactic(trtshim_engine *e, gemm_quant_format quant, int64_t M, int64_t N, int64_t K,
                                    int32_t *tactic) {
    *tactic = 0;
    int count = gemm_tactic_count();
    if (count <= 1 || M <= 0 || N <= 0 || K <= 0) return TRTSHIM_OK;
    int64_t budget = (int64_t)1 << 24, nt = N;
    if (M * N * K > budget) {
        nt = (budget / (M * K) + 63) / 64 * 64;
        if (nt < 64) nt = 64;
        if (nt > N) nt = N;
    }
    float *a = malloc(sizeof(float) * (size_t)(M * K));
    float *c = malloc(sizeof(float) * (size_t)(M * nt));
    float *b = malloc(sizeof(float) * (size_t)(K * nt));
    if (!a || !b || !c) {
        free(a), free(b), free(c);
        return set_error(TRTSHIM_ERR_MEMORY, "build: out of memory timing tactics for a %lldx%lldx%lld GEMM",
                         (long long)M, (long long)N, (long long)K);
    }
    for (int64_t i = 0; i < M * K; i++) a[i] = (float)((i * 7) % 13) * 0.1f - 0.6f;
    for (int64_t i = 0; i < K * nt; i++) b[i] = (float)((i * 5) % 11) * 0.1f - 0.5f;
    double first[64], best = 1e30;
    void *packed[64] = {0};
    int n = count < 64 ? count : 64;
    for (int t = 0; t < n; t++) {
        first[t] = 1e30;
        if (!gemm_tactic_supported(t)) continue;
        packed[t] = aligned_zalloc(quant.kind ? gemm_quant_packed_bytes(quant, K, nt) : gemm_packed_bytes(t, K, nt, e->precision));
        if (!packed[t]) continue;
        if (quant.kind) (void)gemm_quant_pack_columns(quant, b, 0, nt, K, nt, 0, nt, packed[t]);
        else gemm_pack_columns(t, b, 0, nt, K, nt, 0, nt, e->precision, packed[t]);
        double t0 = now_seconds();
        time_run(e, quant, t, M, nt, K, a, packed[t], c);
        first[t] = now_seconds() - t0;
        if (first[t] < best) best = first[t];
    }
    double fastest_all = 1e30;
    for (int t = 0; t < n; t++) {
        if (!packed[t]) continue;
        double fastest = first[t];
        for (int rep = 0; rep < 2 && first[t] <= 1.5 * best; rep++) {
            double t0 = now_seconds();
            time_run(e, quant, t, M, nt, K, a, packed[t], c);
            double dt = now_seconds() - t0;
            if (dt < fastest) fastest = dt;
        }
        if (fastest < fastest_all) {
            fastest_all = fastest;
            *tactic = t;
        }
        free(packed[t]);
    }
    free(a), free(b), free(c);
    return TRTSHIM_OK;
}

/* The default without search: the last supported tactic (the widest instruction set compiled in). */
static int32_t default_tactic(void) {
    for (int t = gemm_tactic_count() - 1; t > 0; t--)
        if (gemm_tactic_supported(t)) return t;
    return 0;
}

static trtshim_status pick_tactic(trtshim_engine *e, const int32_t *tactics, int32_t num_tactics, int32_t step_index,
                                  gemm_quant_format quant, int64_t M, int64_t N, int64_t K, int32_t *tactic) {
    if (tactics) {
        if (step_index >= num_tactics)
            return set_error(TRTSHIM_ERR_CORRUPT, "engine: tactic table has %d entries, step %d needs one", num_tactics,
                             step_index);
        int32_t t = tactics[step_index];
        if (t < 0 || t >= gemm_tactic_count())
            return set_error(TRTSHIM_ERR_CORRUPT, "engine: step %d has tactic %d, this library has %d", step_index, t,
                             gemm_tactic_count());
        if (!gemm_tactic_supported(t))
            return set_error(TRTSHIM_ERR_UNSUPPORTED, "engine: step %d uses tactic '%s', which this CPU cannot run",
                             step_index, gemm_tactic_name(t));
        *tactic = t;
        return TRTSHIM_OK;
    }
    if (e->tactic_search) return search_tactic(e, quant, M, N, K, tactic);
    *tactic = default_tactic();
    return TRTSHIM_OK;
}

static trtshim_status oom(void) { return set_error(TRTSHIM_ERR_MEMORY, "build: out of memory planning steps"); }

/* Plain float32 (or raw integer) copy of weight w, created once. */
static int ensure_plain(trtshim_engine *e, int32_t w, int32_t step_index) {
    engine_weight *ew = &e->weights[w];
    if (ew->plain_buffer >= 0) return 1;
    int is_int = ew->dtype == TRTSHIM_INT32 || ew->dtype == TRTSHIM_INT64;
    int32_t b = add_buffer(e, is_int ? ew->bytes : (uint64_t)ew->count * 4);
    if (b < 0) return 0;
    ew->plain_buffer = b;
    unit u = {UNIT_PLAIN, step_index, 0, b, -1, {w}, 1};
    return add_unit(e, u);
}

/* Activation arena: each tensor a step writes gets a 64-byte aligned region that lives from its step to
   its last reader (network outputs to the end); regions of dead tensors are reused, first fit by offset. */
typedef struct {
    uint64_t offset, size;
    int32_t tensor;
} region;

static int32_t step_reads(const trtshim_engine *e, const step *s, int32_t i) {
    if (s->kind == STEP_GEMM || s->kind == STEP_CONV) return i == 0 ? s->input : -1;
    const layer *l = &e->net->layers[s->layer];
    return i < l->num_inputs ? l->inputs[i] : -1;
}

static trtshim_status place_tensors(trtshim_engine *e, const int32_t *materialized) {
    const trtshim_network *net = e->net;
    int32_t nt = net->num_tensors;
    int32_t *last = malloc(sizeof(int32_t) * (size_t)(nt + 1));
    region *live = malloc(sizeof(region) * (size_t)(nt + 1));
    if (!last || !live) {
        free(last), free(live);
        return oom();
    }
    for (int32_t t = 0; t < nt; t++) last[t] = -1;
    for (int32_t i = 0; i < e->num_steps; i++)
        for (int32_t k = 0; step_reads(e, &e->steps[i], k) >= 0; k++) last[step_reads(e, &e->steps[i], k)] = i;
    for (int32_t i = 0; i < net->num_outputs; i++) last[net->outputs[i].tensor] = e->num_steps;
    int32_t num_live = 0;
    uint64_t high = 0;
    for (int32_t i = 0; i < e->num_steps; i++) {
        const step *s = &e->steps[i];
        for (int32_t m = 0; m < s->num_members; m++) {
            int32_t t = s->members[m].out_tensor;
            if (!materialized[t] || e->tensor_offset[t] >= 0) continue;
            uint64_t size = ((uint64_t)tensor_volume(net, t) + 15) / 16 * 16, at = 0;
            int32_t pos = 0; /* live is sorted by offset: take the first gap that fits */
            for (; pos < num_live; pos++) {
                if (live[pos].offset >= at + size) break;
                at = live[pos].offset + live[pos].size;
            }
            memmove(&live[pos + 1], &live[pos], sizeof(region) * (size_t)(num_live - pos));
            live[pos] = (region){at, size, t};
            num_live++;
            e->tensor_offset[t] = (int64_t)at;
            if (at + size > high) high = at + size;
        }
        /* Free what this step read or wrote for the last time (after its outputs were placed). */
        int32_t kept = 0;
        for (int32_t j = 0; j < num_live; j++)
            if (last[live[j].tensor] > i) live[kept++] = live[j];
        num_live = kept;
    }
    e->arena_floats = high;
    free(last);
    free(live);
    return TRTSHIM_OK;
}

trtshim_status engine_plan(trtshim_engine *e, const int32_t *tactics, int32_t num_tactics) {
    const trtshim_network *net = e->net;
    int32_t nt = net->num_tensors, nl = net->num_layers;
    planner p;
    p.net = net;
    p.consumers = calloc((size_t)nt + 1, sizeof(int32_t));
    p.consumer = calloc((size_t)nt + 1, sizeof(int32_t));
    p.is_output = calloc((size_t)nt + 1, sizeof(int32_t));
    p.activation_use = calloc((size_t)nt + 1, sizeof(int32_t));
    p.materialized = calloc((size_t)nt + 1, sizeof(int32_t));
    p.absorbed = calloc((size_t)nl + 1, sizeof(int32_t));
    e->steps = calloc((size_t)nl + 1, sizeof(step));
    trtshim_status st = TRTSHIM_OK;
    if (!p.consumers || !p.consumer || !p.is_output || !p.activation_use || !p.materialized || !p.absorbed || !e->steps) {
        st = oom();
        goto done;
    }
    for (int32_t l = 0; l < nl; l++)
        for (int32_t i = 0; i < net->layers[l].num_inputs; i++) {
            p.consumers[net->layers[l].inputs[i]]++;
            p.consumer[net->layers[l].inputs[i]] = l;
        }
    for (int32_t i = 0; i < net->num_outputs; i++) {
        p.is_output[net->outputs[i].tensor] = 1;
        p.activation_use[net->outputs[i].tensor] = 1;
    }

    for (int32_t l = 0; l < nl && !st; l++) {
        const layer *ly = &net->layers[l];
        if (p.absorbed[l] || ly->kind == LK_CONSTANT) continue;
        step *s = &e->steps[e->num_steps];
        memset(s, 0, sizeof(*s));
        s->layer = l;
        s->tactic = -1;
        s->packed_buffer = s->bias_buffer = -1;
        s->act = TRTSHIM_UNARY_IDENTITY;
        int32_t si = e->num_steps++; /* counted now, so a failure below frees its members */
        int32_t bconst = ly->kind == LK_MATRIX_MULTIPLY ? matmul_const_b(&p, ly) : -1;

        if (ly->kind == LK_FULLY_CONNECTED || bconst >= 0) {
            s->kind = STEP_GEMM;
            s->input = ly->inputs[0];
            const tensor_desc *in = &net->tensors[s->input].desc;
            int64_t K = in->dims[in->rank - 1];
            if (ly->kind == LK_MATRIX_MULTIPLY) {
                const tensor_desc *bd = &net->tensors[ly->inputs[1]].desc;
                K = bd->dims[bd->rank - 2 + (int)ly->params[1]];
            }
            s->K = K;
            s->M = K ? tensor_volume(net, s->input) / K : 0;
            /* Candidates: this layer and, for a fully connected layer, later ones on the same input. */
            s->members = calloc((size_t)nl, sizeof(step_member));
            if (!s->members) { st = oom(); break; }
            trtshim_unary_op act0 = TRTSHIM_UNARY_IDENTITY;
            for (int32_t c = l; c < nl; c++) {
                const layer *cl = &net->layers[c];
                if (c != l && (ly->kind != LK_FULLY_CONNECTED || cl->kind != LK_FULLY_CONNECTED ||
                               cl->inputs[0] != s->input || p.absorbed[c]))
                    continue;
                step_member m = member_init(c, cl->output);
                if (cl->kind == LK_FULLY_CONNECTED) {
                    m.n = cl->params[0];
                    m.kernel_w = e->layer_weight_index[c * MAX_LAYER_WEIGHTS];
                    m.kernel_transposed = 1;
                    m.bias_w = e->layer_weight_index[c * MAX_LAYER_WEIGHTS + 1];
                } else {
                    const tensor_desc *bd = &net->tensors[cl->inputs[1]].desc;
                    m.n = bd->dims[bd->rank - 1 - (int)cl->params[1]];
                    m.kernel_w = e->layer_weight_index[bconst * MAX_LAYER_WEIGHTS];
                    m.kernel_transposed = (int32_t)cl->params[1];
                }
                trtshim_unary_op act;
                step_member trial = m;
                follow_chain(&p, e, &trial, &act, 0, m.n);
                if (c != l && act != act0) continue;
                if (c == l) act0 = act;
                trial.col = s->N;
                s->N += trial.n;
                s->members[s->num_members++] = trial;
                for (int32_t i = 0; i < trial.num_layers; i++) p.absorbed[trial.layers[i]] = 1;
                if (ly->kind != LK_FULLY_CONNECTED) break;
            }
            s->act = act0;
            s->quant = step_format(e, 0);
            st = pick_tactic(e, tactics, num_tactics, si, s->quant, s->M, s->N, s->K, &s->tactic);
            if (st) break;
            s->packed_buffer = add_buffer(e, step_block_bytes(e, s));
            int any_bias = 0;
            for (int32_t i = 0; i < s->num_members; i++) any_bias |= s->members[i].bias_w >= 0;
            if (any_bias) s->bias_buffer = add_buffer(e, (uint64_t)s->N * 4);
            if (s->packed_buffer < 0 || (any_bias && s->bias_buffer < 0)) { st = oom(); break; }
            for (int32_t i = 0; i < s->num_members && !st; i++) {
                step_member *m = &s->members[i];
                unit pu = {UNIT_PACK_GEMM, si, i, s->packed_buffer, -1, {m->kernel_w}, 1};
                if (!add_unit(e, pu)) st = oom();
                if (m->bias_w >= 0) {
                    unit bu = {UNIT_BIAS, si, i, s->bias_buffer, -1, {m->bias_w}, 1};
                    if (!add_unit(e, bu)) st = oom();
                }
                p.materialized[m->out_tensor] = 1;
            }
            p.activation_use[s->input] = 1;
            s->temp_floats = s->num_members > 1 ? s->M * s->N : 0;
        } else if (ly->kind == LK_CONVOLUTION) {
            s->kind = STEP_CONV;
            s->input = ly->inputs[0];
            s->members = calloc(1, sizeof(step_member));
            if (!s->members) { st = oom(); break; }
            step_member m = member_init(l, ly->output);
            m.n = ly->params[0];
            m.kernel_w = e->layer_weight_index[l * MAX_LAYER_WEIGHTS];
            m.kernel_transposed = 1;
            m.bias_w = e->layer_weight_index[l * MAX_LAYER_WEIGHTS + 1];
            follow_chain(&p, e, &m, &s->act, 1, m.n);
            for (int32_t i = 0; i < m.num_layers; i++) p.absorbed[m.layers[i]] = 1;
            s->members[0] = m;
            s->num_members = 1;
            const tensor_desc *in = &net->tensors[s->input].desc, *out = &net->tensors[ly->output].desc;
            int64_t groups = ly->params[11];
            s->M = out->dims[2] * out->dims[3];
            s->N = ly->params[0] / groups;
            s->K = in->dims[1] / groups * ly->params[1] * ly->params[2];
            s->quant = step_format(e, 1);
            st = pick_tactic(e, tactics, num_tactics, si, s->quant, s->M, s->N, s->K, &s->tactic);
            if (st) break;
            s->packed_buffer = add_buffer(e, (uint64_t)groups * step_block_bytes(e, s));
            int has_bias = m.bias_w >= 0 || m.bn_layer >= 0;
            if (has_bias) s->bias_buffer = add_buffer(e, (uint64_t)ly->params[0] * 4);
            if (s->packed_buffer < 0 || (has_bias && s->bias_buffer < 0)) { st = oom(); break; }
            if (m.bn_layer >= 0) {
                const int32_t *bw = &e->layer_weight_index[m.bn_layer * MAX_LAYER_WEIGHTS];
                unit fu = {UNIT_FOLD, si, 0, s->packed_buffer, s->bias_buffer,
                           {m.kernel_w, m.bias_w, bw[0], bw[1], bw[2], bw[3]}, 6};
                if (!add_unit(e, fu)) st = oom();
            } else {
                unit ku = {UNIT_PACK_CONV, si, 0, s->packed_buffer, -1, {m.kernel_w}, 1};
                if (!add_unit(e, ku)) st = oom();
                if (m.bias_w >= 0) {
                    unit bu = {UNIT_BIAS, si, 0, s->bias_buffer, -1, {m.bias_w}, 1};
                    if (!add_unit(e, bu)) st = oom();
                }
            }
            p.materialized[m.out_tensor] = 1;
            p.activation_use[s->input] = 1;
            s->temp_floats = s->K * s->M + s->M * s->N;
        } else {
            s->kind = ly->kind == LK_MATRIX_MULTIPLY ? STEP_MATMUL : STEP_LAYER;
            s->members = calloc(1, sizeof(step_member));
            if (!s->members) { st = oom(); break; }
            s->members[0] = member_init(l, ly->output);
            s->num_members = 1;
            p.absorbed[l] = 1;
            for (int32_t i = 0; i < ly->num_inputs; i++) p.activation_use[ly->inputs[i]] = 1;
            p.materialized[ly->output] = 1;
            for (int sl = 0; sl < MAX_LAYER_WEIGHTS && !st; sl++) {
                int32_t w = e->layer_weight_index[l * MAX_LAYER_WEIGHTS + sl];
                if (w >= 0 && !ensure_plain(e, w, si)) st = oom();
            }
        }
    }
    if (st) goto done;

    /* Constants read as activations (or marked as outputs) keep a plain copy. */
    for (int32_t l = 0; l < nl && !st; l++) {
        const layer *ly = &net->layers[l];
        if (ly->kind != LK_CONSTANT) continue;
        int32_t w = e->layer_weight_index[l * MAX_LAYER_WEIGHTS];
        e->tensor_const_weight[ly->output] = w;
        if (p.activation_use[ly->output] && !ensure_plain(e, w, -1)) st = oom();
    }
    if (st) goto done;

    st = place_tensors(e, p.materialized);
    if (st) goto done;
    for (int32_t i = 0; i < e->num_steps; i++)
        if ((uint64_t)e->steps[i].temp_floats > e->temp_floats) e->temp_floats = (uint64_t)e->steps[i].temp_floats;
    if (tactics && num_tactics != e->num_steps)
        st = set_error(TRTSHIM_ERR_CORRUPT, "engine: tactic table has %d entries for %d steps", num_tactics, e->num_steps);
    for (int32_t i = 0; tactics && !st && i < e->num_steps; i++)
        if (e->steps[i].tactic != tactics[i])
            st = set_error(TRTSHIM_ERR_CORRUPT, "engine: step %d records tactic %d but has no GEMM", i, tactics[i]);
done:
    free(p.consumers);
    free(p.consumer);
    free(p.is_output);
    free(p.activation_use);
    free(p.materialized);
    free(p.absorbed);
    return st;
}

/* ---- the weight transform: network-level float32 values -> kernel format ---------------------- */

int64_t unit_scratch_floats(const trtshim_engine *e, const unit *u) {
    if (u->kind != UNIT_FOLD) return 0;
    const step *s = &e->steps[u->step];
    return s->members[0].n * s->K + s->members[0].n; /* folded kernel, then the per-channel factor */
}

/* Values were checked finite beforehand (unit_check), so quantizing cannot fail here. */
static void pack_conv(trtshim_engine *e, const step *s, const float *kernel, void *packed) {
    int64_t groups = e->net->layers[s->layer].params[11];
    size_t group_bytes = step_block_bytes(e, s);
    for (int64_t g = 0; g < groups; g++) {
        void *block = (char *)packed + (size_t)g * group_bytes;
        if (s->quant.kind) (void)gemm_quant_pack_columns(s->quant, kernel + g * s->N * s->K, 1, s->K, s->K, s->N, 0, s->N, block);
        else gemm_pack_columns(s->tactic, kernel + g * s->N * s->K, 1, s->K, s->K, s->N, 0, s->N, e->precision, block);
    }
}

/* W' = W * factor per output channel, factor = scale / sqrt(var + eps): the fold, float32, this order. */
static void fold_kernel(const trtshim_engine *e, const unit *u, const float *const *src, float *scratch) {
    const step *s = &e->steps[u->step];
    const step_member *m = &s->members[0];
    int64_t oc = m->n, per = s->K;
    float eps = e->net->layers[m->bn_layer].epsilon;
    const float *w = src[0], *scale = src[2], *var = src[5];
    float *folded = scratch, *factor = scratch + oc * per;
    for (int64_t c = 0; c < oc; c++) {
        factor[c] = scale[c] / sqrtf(var[c] + eps);
        for (int64_t i = 0; i < per; i++) folded[c * per + i] = w[c * per + i] * factor[c];
    }
}

static int64_t first_non_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

trtshim_status unit_check(trtshim_engine *e, const unit *u, const float *const *src, float *scratch) {
    gemm_quant_format f = unit_quant_format(e, u);
    if (!f.kind) return TRTSHIM_OK;
    const step *s = &e->steps[u->step];
    const engine_weight *w = &e->weights[u->sources[0]];
    const float *values = src[0];
    int64_t count = w->count;
    if (u->kind == UNIT_FOLD) {
        fold_kernel(e, u, src, scratch);
        values = scratch;
        count = s->members[0].n * s->K;
    }
    int64_t bad = first_non_finite(values, count);
    if (bad < 0) return TRTSHIM_OK;
    return set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: element %lld is %g%s; a quantized kernel needs finite values",
                     w->name, role_name(w->role), (long long)bad, (double)values[bad],
                     u->kind == UNIT_FOLD ? " after folding the batch norm" : "");
}

void unit_materialize_quantized(trtshim_engine *e, const unit *u, const void *q, const float *scales) {
    const step *s = &e->steps[u->step];
    void *packed = e->buffers[u->buffer].data;
    if (u->kind == UNIT_PACK_GEMM) {
        const step_member *m = &s->members[u->member];
        (void)gemm_quant_pack_quantized(s->quant, q, scales, m->kernel_transposed, m->kernel_transposed ? s->K : m->n, s->K,
                                        s->N, m->col, m->n, packed);
        return;
    }
    int64_t groups = e->net->layers[s->layer].params[11], per = gemm_quant_groups(s->quant, s->K);
    size_t group_bytes = step_block_bytes(e, s);
    for (int64_t g = 0; g < groups; g++)
        (void)gemm_quant_pack_quantized(s->quant, (const int8_t *)q + g * s->N * s->K, scales + g * s->N * per, 1, s->K,
                                        s->K, s->N, 0, s->N, (char *)packed + (size_t)g * group_bytes);
}

void unit_materialize_scratch(trtshim_engine *e, const unit *u, const float *const *src, float *scratch) {
    switch (u->kind) {
    case UNIT_PLAIN: {
        engine_weight *w = &e->weights[u->sources[0]];
        weight_buffer *b = &e->buffers[u->buffer];
        memcpy(b->data, src[0], b->bytes); /* float32 values, or raw integers */
        (void)w;
        return;
    }
    case UNIT_PACK_GEMM: {
        const step *s = &e->steps[u->step];
        const step_member *m = &s->members[u->member];
        int64_t ldb = m->kernel_transposed ? s->K : m->n;
        if (s->quant.kind)
            (void)gemm_quant_pack_columns(s->quant, src[0], m->kernel_transposed, ldb, s->K, s->N, m->col, m->n,
                                          e->buffers[u->buffer].data);
        else
            gemm_pack_columns(s->tactic, src[0], m->kernel_transposed, ldb, s->K, s->N, m->col, m->n, e->precision,
                              e->buffers[u->buffer].data);
        return;
    }
    case UNIT_PACK_CONV:
        pack_conv(e, &e->steps[u->step], src[0], e->buffers[u->buffer].data);
        return;
    case UNIT_BIAS: {
        const step *s = &e->steps[u->step];
        const step_member *m = &s->members[u->member];
        int64_t col = s->kind == STEP_GEMM ? m->col : 0;
        memcpy((float *)e->buffers[u->buffer].data + col, src[0], sizeof(float) * (size_t)m->n);
        return;
    }
    case UNIT_FOLD:
        unit_fold_into(e, u, src, scratch, e->buffers[u->buffer].data, e->buffers[u->buffer2].data);
        return;
    }
}

void unit_fold_into(trtshim_engine *e, const unit *u, const float *const *src, float *scratch, void *packed, float *bias) {
    /* s = scale / sqrt(var + eps); W' = W * s; b' = (b - mean) * s + shift. Float32, this order. */
    const step *s = &e->steps[u->step];
    int64_t oc = s->members[0].n, per = s->K; /* kernel elements per output channel */
    const float *b = src[1], *shift = src[3], *mean = src[4];
    float *folded = scratch, *factor = scratch + oc * per;
    fold_kernel(e, u, src, scratch);
    pack_conv(e, s, folded, packed);
    for (int64_t c = 0; c < oc; c++) bias[c] = ((b ? b[c] : 0.0f) - mean[c]) * factor[c] + shift[c];
}

/* ---- build ---------------------------------------------------------------------------------- */

/* Float32 views of a unit's sources from the network's own values; `tmp` receives conversions. */
static trtshim_status materialize_from_network(trtshim_engine *e, const trtshim_network *src_net, const unit *u) {
    const float *src[6] = {0};
    float *owned[6] = {0};
    trtshim_status st = TRTSHIM_OK;
    for (int32_t i = 0; i < u->num_sources; i++) {
        int32_t w = u->sources[i];
        if (w < 0) continue;
        const engine_weight *ew = &e->weights[w];
        const layer_weight *lw = &src_net->layers[ew->layer].weights[ew->slot];
        if (ew->dtype == TRTSHIM_INT32 || ew->dtype == TRTSHIM_INT64 || ew->dtype == TRTSHIM_FLOAT32) {
            src[i] = lw->data;
            continue;
        }
        owned[i] = malloc(sizeof(float) * (size_t)(ew->count ? ew->count : 1));
        if (!owned[i]) {
            st = set_error(TRTSHIM_ERR_MEMORY, "build: out of memory converting weight '%s' %s", ew->name,
                           role_name(ew->role));
            goto done;
        }
        weights_to_f32(ew->dtype, lw->data, owned[i], ew->count);
        src[i] = owned[i];
    }
    int64_t n = unit_scratch_floats(e, u);
    float *scratch = n ? malloc(sizeof(float) * (size_t)n) : NULL;
    if (n && !scratch) {
        st = set_error(TRTSHIM_ERR_MEMORY, "build: out of memory folding batch norm into a convolution");
        goto done;
    }
    st = unit_check(e, u, src, scratch);
    if (st) {
        free(scratch);
        goto done;
    }
    unit_materialize_scratch(e, u, src, scratch);
    /* Keep float32 copies of batch-norm-fold members so a refit of some of them can redo the fold. */
    if (u->kind == UNIT_FOLD && e->refittable) {
        for (int32_t i = 0; i < u->num_sources; i++) {
            if (u->sources[i] < 0) continue;
            engine_weight *ew = &e->weights[u->sources[i]];
            if (ew->retained) memcpy(ew->retained, src[i], sizeof(float) * (size_t)ew->count);
        }
    }
    free(scratch);
done:
    for (int i = 0; i < 6; i++) free(owned[i]);
    return st;
}

/* Allocates retained float32 copies for the members of every batch-norm fold (refittable engines). */
trtshim_status engine_alloc_retained(trtshim_engine *e) {
    if (!e->refittable) return TRTSHIM_OK;
    for (int32_t i = 0; i < e->num_units; i++) {
        const unit *u = &e->units[i];
        if (u->kind != UNIT_FOLD) continue;
        for (int32_t j = 0; j < u->num_sources; j++) {
            if (u->sources[j] < 0) continue;
            engine_weight *ew = &e->weights[u->sources[j]];
            if (ew->retained) continue;
            ew->retained = aligned_zalloc((uint64_t)ew->count * 4);
            if (!ew->retained)
                return set_error(TRTSHIM_ERR_MEMORY, "engine: out of memory keeping a copy of '%s' %s", ew->name,
                                 role_name(ew->role));
        }
    }
    return TRTSHIM_OK;
}

trtshim_status trtshim_build(const trtshim_network *network, const trtshim_build_config *config,
                             trtshim_engine **out) {
    if (!network) return set_error(TRTSHIM_ERR_ARGUMENT, "build: network is null");
    if (!config) return set_error(TRTSHIM_ERR_ARGUMENT, "build: config is null");
    if (!out) return set_error(TRTSHIM_ERR_ARGUMENT, "build: out is null");
    *out = NULL;
    trtshim_dtype prec = config->weight_precision;
    if (prec != TRTSHIM_FLOAT32 && prec != TRTSHIM_FLOAT16 && prec != TRTSHIM_BFLOAT16)
        return set_error(TRTSHIM_ERR_ARGUMENT, "build: weight_precision must be float32, float16 or bfloat16, got %s (%d)",
                         dtype_name(prec), (int)prec);
    if (config->num_threads < 0 || config->num_threads > 1024)
        return set_error(TRTSHIM_ERR_ARGUMENT, "build: num_threads must be 0..1024, got %d", config->num_threads);
    if (config->strip_weights && !config->refittable)
        return set_error(TRTSHIM_ERR_ARGUMENT, "build: strip_weights needs refittable = 1 (a stripped engine is filled by a refit)");
    if (network->num_outputs == 0) return set_error(TRTSHIM_ERR_ARGUMENT, "build: the network has no outputs");
    int32_t group = config->int4_group_size ? config->int4_group_size : 128;
    const int32_t formats[2] = {config->gemm_weight_format, config->conv_weight_format};
    for (int i = 0; i < 2; i++)
        if (formats[i] < TRTSHIM_WEIGHT_FORMAT_AS_PRECISION || formats[i] > TRTSHIM_WEIGHT_FORMAT_INT4)
            return set_error(TRTSHIM_ERR_ARGUMENT, "build: %s must be a trtshim_weight_format (0 as precision, 1 int8, "
                             "2 fp8 e4m3, 3 int4), got %d", i ? "conv_weight_format" : "gemm_weight_format", formats[i]);
    if (group != 32 && group != 64 && group != 128)
        return set_error(TRTSHIM_ERR_ARGUMENT, "build: int4_group_size must be 32, 64 or 128, got %d", group);
    trtshim_network *structure;
    trtshim_status st = network_clone_structure(network, &structure);
    if (st) return st;
    trtshim_engine *e;
    st = engine_new(structure, prec, config->refittable ? 1 : 0, config->tactic_search ? 1 : 0, config->num_threads, &e);
    if (st) {
        trtshim_network_destroy(structure);
        return st;
    }
    e->weight_streaming = config->weight_streaming ? 1 : 0;
    e->gemm_format = config->gemm_weight_format;
    e->conv_format = config->conv_weight_format;
    e->int4_group_size = group;
    if (!st) st = engine_plan(e, NULL, 0);
    if (!st) st = engine_alloc_buffers(e);
    if (!st) st = engine_alloc_retained(e);
    if (!st) st = stream_init(e);
    if (!st && !config->strip_weights) {
        for (int32_t i = 0; i < e->num_units && !st; i++) st = materialize_from_network(e, network, &e->units[i]);
        e->has_weights = 1;
        e->retained_valid = e->refittable;
    }
    if (st) {
        engine_release(e);
        return st;
    }
    *out = e;
    return TRTSHIM_OK;
}
