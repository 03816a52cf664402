/* network.c: the network definition: layers in order, copies of their weights, static shapes.
   Every add_* call is validated completely here; the builder trusts what this file accepted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "ops.h"

static const char *kind_names[LK_COUNT] = {
    "fully_connected", "matrix_multiply", "convolution", "elementwise", "unary", "softmax", "layer_norm",
    "rms_norm", "batch_norm", "reduce", "pooling", "reshape", "transpose", "concatenation", "slice",
    "gather", "constant"};

const char *layer_kind_name(layer_kind kind) { return (kind >= 0 && kind < LK_COUNT) ? kind_names[kind] : "?"; }

int32_t normalize_axis(int64_t axis, int32_t rank) {
    if (axis < 0) axis += rank;
    return (axis >= 0 && axis < rank) ? (int32_t)axis : -1;
}

trtshim_status trtshim_network_create(trtshim_network **out) {
    if (!out) return set_error(TRTSHIM_ERR_ARGUMENT, "network_create: out is null");
    *out = calloc(1, sizeof(trtshim_network));
    if (!*out) return set_error(TRTSHIM_ERR_MEMORY, "network_create: out of memory");
    return TRTSHIM_OK;
}

void trtshim_network_destroy(trtshim_network *net) {
    if (!net) return;
    for (int32_t i = 0; i < net->num_layers; i++) {
        layer *l = &net->layers[i];
        free(l->name);
        free(l->inputs);
        for (int w = 0; w < MAX_LAYER_WEIGHTS; w++) free(l->weights[w].data);
    }
    for (int32_t i = 0; i < net->num_inputs; i++) free(net->inputs[i].name);
    for (int32_t i = 0; i < net->num_outputs; i++) free(net->outputs[i].name);
    free(net->layers);
    free(net->tensors);
    free(net->inputs);
    free(net->outputs);
    free(net);
}

/* Makes room for one more element in a growing array. */
static int grow(void **items, int32_t *cap, int32_t count, size_t size) {
    if (count < *cap) return 1;
    int32_t next = *cap ? *cap * 2 : 16;
    void *p = realloc(*items, (size_t)next * size);
    if (!p) return 0;
    *items = p;
    *cap = next;
    return 1;
}

static char *copy_string(const char *s) {
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

static trtshim_status check_name(const char *what, const char *name) {
    if (!name) return set_error(TRTSHIM_ERR_ARGUMENT, "%s: name is null", what);
    size_t n = strnlen(name, MAX_NAME);
    if (n == 0) return set_error(TRTSHIM_ERR_ARGUMENT, "%s: name is empty", what);
    if (n >= MAX_NAME) return set_error(TRTSHIM_ERR_ARGUMENT, "%s: name longer than %d bytes", what, MAX_NAME - 1);
    return TRTSHIM_OK;
}

static int io_name_taken(const trtshim_network *net, const char *name) {
    for (int32_t i = 0; i < net->num_inputs; i++)
        if (strcmp(net->inputs[i].name, name) == 0) return 1;
    for (int32_t i = 0; i < net->num_outputs; i++)
        if (strcmp(net->outputs[i].name, name) == 0) return 1;
    return 0;
}

static trtshim_status add_tensor(trtshim_network *net, const tensor_desc *desc, int32_t producer, int32_t input_index,
                                 int32_t *id) {
    if (!grow((void **)&net->tensors, &net->cap_tensors, net->num_tensors, sizeof(tensor_info)))
        return set_error(TRTSHIM_ERR_MEMORY, "network: out of memory adding a tensor");
    tensor_info *t = &net->tensors[net->num_tensors];
    t->desc = *desc;
    t->producer_layer = producer;
    t->input_index = input_index;
    *id = net->num_tensors++;
    return TRTSHIM_OK;
}

static void format_dims(char *buf, size_t cap, int32_t rank, const int64_t *dims) {
    size_t used = 0;
    used += (size_t)snprintf(buf, cap, "[");
    for (int32_t i = 0; i < rank && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
}

trtshim_status network_add_input_impl(trtshim_network *net, const char *name, trtshim_dtype dtype, int32_t rank,
                                      const int64_t *dims, int32_t *out_tensor) {
    if (!net) return set_error(TRTSHIM_ERR_ARGUMENT, "add_input: network is null");
    if (!out_tensor) return set_error(TRTSHIM_ERR_ARGUMENT, "add_input: out_tensor is null");
    trtshim_status st = check_name("add_input", name);
    if (st) return st;
    if (io_name_taken(net, name))
        return set_error(TRTSHIM_ERR_ARGUMENT, "input '%s': the name is already used by an input or output", name);
    if (dtype != TRTSHIM_FLOAT32 && dtype != TRTSHIM_INT32 && dtype != TRTSHIM_INT64)
        return set_error(TRTSHIM_ERR_ARGUMENT, "input '%s': dtype must be float32, int32 or int64, got %s (%d)", name,
                         dtype_name(dtype), (int)dtype);
    if (rank < 0 || rank > MAX_RANK)
        return set_error(TRTSHIM_ERR_ARGUMENT, "input '%s': rank must be 0..%d, got %d", name, MAX_RANK, rank);
    if (rank > 0 && !dims) return set_error(TRTSHIM_ERR_ARGUMENT, "input '%s': dims is null", name);
    tensor_desc d = {dtype, rank, {0}};
    for (int32_t i = 0; i < rank; i++) {
        if (dims[i] < 1)
            return set_error(TRTSHIM_ERR_ARGUMENT, "input '%s': dimension %d must be >= 1, got %lld", name, i,
                             (long long)dims[i]);
        d.dims[i] = dims[i];
    }
    if (shape_volume(rank, d.dims) < 0 || shape_volume(rank, d.dims) > ((int64_t)1 << 40))
        return set_error(TRTSHIM_ERR_ARGUMENT, "input '%s': shape too large", name);
    if (!grow((void **)&net->inputs, &net->cap_inputs, net->num_inputs, sizeof(io_binding)))
        return set_error(TRTSHIM_ERR_MEMORY, "input '%s': out of memory", name);
    char *copy = copy_string(name);
    if (!copy) return set_error(TRTSHIM_ERR_MEMORY, "input '%s': out of memory", name);
    int32_t id;
    st = add_tensor(net, &d, -1, net->num_inputs, &id);
    if (st) {
        free(copy);
        return st;
    }
    net->inputs[net->num_inputs].name = copy;
    net->inputs[net->num_inputs].tensor = id;
    net->num_inputs++;
    *out_tensor = id;
    return TRTSHIM_OK;
}

trtshim_status trtshim_network_add_input(trtshim_network *net, const char *name, trtshim_dtype dtype, int32_t rank,
                                         const int64_t *dims, int32_t *out_tensor) {
    return network_add_input_impl(net, name, dtype, rank, dims, out_tensor);
}

trtshim_status network_mark_output_impl(trtshim_network *net, int32_t tensor, const char *name) {
    if (!net) return set_error(TRTSHIM_ERR_ARGUMENT, "mark_output: network is null");
    trtshim_status st = check_name("mark_output", name);
    if (st) return st;
    if (tensor < 0 || tensor >= net->num_tensors)
        return set_error(TRTSHIM_ERR_ARGUMENT, "output '%s': no tensor with id %d (the network has %d)", name, tensor,
                         net->num_tensors);
    if (net->tensors[tensor].desc.dtype != TRTSHIM_FLOAT32)
        return set_error(TRTSHIM_ERR_ARGUMENT, "output '%s': outputs must be float32, tensor %d is %s", name, tensor,
                         dtype_name(net->tensors[tensor].desc.dtype));
    if (io_name_taken(net, name))
        return set_error(TRTSHIM_ERR_ARGUMENT, "output '%s': the name is already used by an input or output", name);
    if (!grow((void **)&net->outputs, &net->cap_outputs, net->num_outputs, sizeof(io_binding)))
        return set_error(TRTSHIM_ERR_MEMORY, "output '%s': out of memory", name);
    char *copy = copy_string(name);
    if (!copy) return set_error(TRTSHIM_ERR_MEMORY, "output '%s': out of memory", name);
    net->outputs[net->num_outputs].name = copy;
    net->outputs[net->num_outputs].tensor = tensor;
    net->num_outputs++;
    return TRTSHIM_OK;
}

trtshim_status trtshim_network_mark_output(trtshim_network *net, int32_t tensor, const char *name) {
    return network_mark_output_impl(net, tensor, name);
}

/* ---- layer validation ------------------------------------------------------------------------- */

typedef struct {
    const trtshim_network *net;
    const layer_request *req;
    int copy_values;
    tensor_desc in[2];       /* the first two inputs */
    tensor_desc out;
    layer_weight w[MAX_LAYER_WEIGHTS];
} check_state;

static int is_float_weight(trtshim_dtype d) {
    return d == TRTSHIM_FLOAT32 || d == TRTSHIM_FLOAT16 || d == TRTSHIM_BFLOAT16;
}

/* Checks weight `slot` against its declared shape. required = 0 allows it to be absent. */
static trtshim_status check_weight(check_state *s, int slot, trtshim_role role, int required, int allow_int,
                                   int32_t rank, const int64_t *dims) {
    const char *name = s->req->name;
    const trtshim_weights *w = s->req->weights[slot];
    char shape[160];
    format_dims(shape, sizeof(shape), rank, dims);
    int64_t volume = shape_volume(rank, dims);
    if (!w) {
        if (required) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': %s weights are null", name, role_name(role));
        return TRTSHIM_OK;
    }
    int dtype_ok = is_float_weight(w->dtype) || (allow_int && (w->dtype == TRTSHIM_INT32 || w->dtype == TRTSHIM_INT64));
    if (!dtype_ok)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': %s weights must be %s, got %s (%d)", name, role_name(role),
                         allow_int ? "float32, float16, bfloat16, int32 or int64" : "float32, float16 or bfloat16",
                         dtype_name(w->dtype), (int)w->dtype);
    if (volume < 0 || volume > ((int64_t)1 << 40))
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': %s shape %s is too large", name, role_name(role), shape);
    if (w->count != volume)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': %s expected %s %s (%lld elements), got %lld elements", name,
                         role_name(role), dtype_name(w->dtype), shape, (long long)volume, (long long)w->count);
    if (s->copy_values && !w->values && volume > 0)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': %s values are null", name, role_name(role));
    layer_weight *lw = &s->w[slot];
    lw->present = 1;
    lw->role = role;
    lw->dtype = w->dtype;
    lw->rank = rank;
    for (int32_t i = 0; i < rank; i++) lw->dims[i] = dims[i];
    lw->count = volume;
    return TRTSHIM_OK;
}

static trtshim_status check_float_input(check_state *s, int index) {
    if (s->in[index].dtype != TRTSHIM_FLOAT32)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input %d must be float32, got %s (tensor %d)", s->req->name,
                         index, dtype_name(s->in[index].dtype), s->req->inputs[index]);
    return TRTSHIM_OK;
}

/* Numpy broadcasting of two shapes into out. */
static trtshim_status broadcast_shapes(const char *name, const tensor_desc *a, const tensor_desc *b, int32_t skip_last,
                                       tensor_desc *out) {
    int32_t ra = a->rank - skip_last, rb = b->rank - skip_last;
    int32_t r = ra > rb ? ra : rb;
    for (int32_t i = 0; i < r; i++) {
        int64_t da = i < r - ra ? 1 : a->dims[i - (r - ra)];
        int64_t db = i < r - rb ? 1 : b->dims[i - (r - rb)];
        if (da != db && da != 1 && db != 1) {
            char sa[160], sb[160];
            format_dims(sa, sizeof(sa), a->rank, a->dims);
            format_dims(sb, sizeof(sb), b->rank, b->dims);
            return set_error(TRTSHIM_ERR_ARGUMENT,
                             "layer '%s': shapes %s and %s do not broadcast (dimension %d: %lld vs %lld)", name, sa, sb,
                             i, (long long)da, (long long)db);
        }
        out->dims[i] = da == 1 ? db : da;
    }
    out->rank = r;
    return TRTSHIM_OK;
}

static trtshim_status infer(check_state *s) {
    const layer_request *q = s->req;
    const char *name = q->name;
    const int64_t *p = q->params;
    tensor_desc *in = &s->in[0], *out = &s->out;
    trtshim_status st;
    out->dtype = TRTSHIM_FLOAT32;
    switch (q->kind) {
    case LK_FULLY_CONNECTED: {
        if ((st = check_float_input(s, 0))) return st;
        if (in->rank < 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input must have rank >= 1", name);
        int64_t k = in->dims[in->rank - 1], n = p[0];
        if (k < 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': in_features (the input's last dimension) is 0", name);
        if (n < 1 || n > ((int64_t)1 << 31))
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': out_features must be >= 1, got %lld", name, (long long)n);
        int64_t kd[2] = {n, k};
        if ((st = check_weight(s, 0, TRTSHIM_ROLE_KERNEL, 1, 0, 2, kd))) {
            if (q->weights[0] && q->weights[0]->count != n * k && q->weights[0]->count % n == 0)
                return set_error(TRTSHIM_ERR_ARGUMENT,
                                 "layer '%s': kernel expected [%lld, %lld] (in_features %lld from the input), got %lld "
                                 "elements (in_features %lld)",
                                 name, (long long)n, (long long)k, (long long)k, (long long)q->weights[0]->count,
                                 (long long)(q->weights[0]->count / n));
            return st;
        }
        if ((st = check_weight(s, 1, TRTSHIM_ROLE_BIAS, 0, 0, 1, &n))) return st;
        *out = *in;
        out->dims[in->rank - 1] = n;
        return TRTSHIM_OK;
    }
    case LK_MATRIX_MULTIPLY: {
        if ((st = check_float_input(s, 0)) || (st = check_float_input(s, 1))) return st;
        const tensor_desc *a = &s->in[0], *b = &s->in[1];
        if (p[0] != 0 && p[0] != 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': transpose_a must be 0 or 1", name);
        if (p[1] != 0 && p[1] != 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': transpose_b must be 0 or 1", name);
        if (a->rank < 2 || b->rank < 2)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': operands must have rank >= 2, got %d and %d", name,
                             a->rank, b->rank);
        int64_t m = a->dims[a->rank - 2 + (int)p[0]], ka = a->dims[a->rank - 1 - (int)p[0]];
        int64_t kb = b->dims[b->rank - 2 + (int)p[1]], n = b->dims[b->rank - 1 - (int)p[1]];
        if (ka < 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': the inner dimension K is 0", name);
        if (ka != kb)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': inner dimensions differ: A gives K = %lld, B gives K = %lld",
                             name, (long long)ka, (long long)kb);
        if ((st = broadcast_shapes(name, a, b, 2, out))) return st;
        out->dims[out->rank] = m;
        out->dims[out->rank + 1] = n;
        out->rank += 2;
        return TRTSHIM_OK;
    }
    case LK_CONVOLUTION: {
        if ((st = check_float_input(s, 0))) return st;
        if (in->rank != 4) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input must be NCHW (rank 4), got rank %d", name, in->rank);
        if (in->dims[1] < 1 || in->dims[2] < 1 || in->dims[3] < 1)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input channels, height and width must be >= 1", name);
        for (int i = 0; i < 12; i++)
            if (p[i] < (i >= 5 && i <= 8 ? 0 : 1) || p[i] > (1 << 24))
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': convolution parameter %d out of range: %lld", name, i,
                                 (long long)p[i]);
        int64_t oc = p[0], kh = p[1], kw = p[2], sh = p[3], sw = p[4], pt = p[5], pl = p[6], pb = p[7], pr = p[8];
        int64_t dh = p[9], dw = p[10], g = p[11], c = in->dims[1];
        if (c % g || oc % g)
            return set_error(TRTSHIM_ERR_ARGUMENT,
                             "layer '%s': groups %lld must divide in_channels %lld and out_channels %lld", name,
                             (long long)g, (long long)c, (long long)oc);
        int64_t oh = (in->dims[2] + pt + pb - dh * (kh - 1) - 1) / sh + 1;
        int64_t ow = (in->dims[3] + pl + pr - dw * (kw - 1) - 1) / sw + 1;
        if (in->dims[2] + pt + pb - dh * (kh - 1) - 1 < 0 || in->dims[3] + pl + pr - dw * (kw - 1) - 1 < 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': kernel %lldx%lld (dilated) larger than padded input %lldx%lld",
                             name, (long long)kh, (long long)kw, (long long)(in->dims[2] + pt + pb),
                             (long long)(in->dims[3] + pl + pr));
        int64_t kd[4] = {oc, c / g, kh, kw};
        if ((st = check_weight(s, 0, TRTSHIM_ROLE_KERNEL, 1, 0, 4, kd))) return st;
        if ((st = check_weight(s, 1, TRTSHIM_ROLE_BIAS, 0, 0, 1, &oc))) return st;
        *out = *in;
        out->dims[1] = oc;
        out->dims[2] = oh;
        out->dims[3] = ow;
        return TRTSHIM_OK;
    }
    case LK_ELEMENTWISE:
        if ((st = check_float_input(s, 0)) || (st = check_float_input(s, 1))) return st;
        if (!elementwise_op_valid((int)p[0]))
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': unknown elementwise op %lld", name, (long long)p[0]);
        return broadcast_shapes(name, &s->in[0], &s->in[1], 0, out);
    case LK_UNARY:
        if ((st = check_float_input(s, 0))) return st;
        if (!unary_op_valid((int)p[0]) || p[0] != (int)p[0])
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': unknown unary op %lld", name, (long long)p[0]);
        *out = *in;
        return TRTSHIM_OK;
    case LK_SOFTMAX:
        if ((st = check_float_input(s, 0))) return st;
        if (normalize_axis(p[0], in->rank) < 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': axis %lld out of range for rank %d", name, (long long)p[0], in->rank);
        *out = *in;
        return TRTSHIM_OK;
    case LK_LAYER_NORM: {
        if ((st = check_float_input(s, 0))) return st;
        int32_t axis = normalize_axis(p[0], in->rank);
        if (axis < 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': axis %lld out of range for rank %d", name, (long long)p[0], in->rank);
        if (!(q->epsilon >= 0.0f)) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': epsilon must be >= 0", name);
        if ((st = check_weight(s, 0, TRTSHIM_ROLE_SCALE, 0, 0, in->rank - axis, in->dims + axis))) return st;
        if ((st = check_weight(s, 1, TRTSHIM_ROLE_SHIFT, 0, 0, in->rank - axis, in->dims + axis))) return st;
        *out = *in;
        return TRTSHIM_OK;
    }
    case LK_RMS_NORM:
        if ((st = check_float_input(s, 0))) return st;
        if (in->rank < 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input must have rank >= 1", name);
        if (!(q->epsilon >= 0.0f)) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': epsilon must be >= 0", name);
        if ((st = check_weight(s, 0, TRTSHIM_ROLE_SCALE, 0, 0, 1, in->dims + in->rank - 1))) return st;
        *out = *in;
        return TRTSHIM_OK;
    case LK_BATCH_NORM: {
        if ((st = check_float_input(s, 0))) return st;
        if (in->rank < 2) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input must have rank >= 2 (N, C, ...)", name);
        if (!(q->epsilon >= 0.0f)) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': epsilon must be >= 0", name);
        const trtshim_role roles[4] = {TRTSHIM_ROLE_SCALE, TRTSHIM_ROLE_SHIFT, TRTSHIM_ROLE_MEAN, TRTSHIM_ROLE_VARIANCE};
        for (int i = 0; i < 4; i++)
            if ((st = check_weight(s, i, roles[i], 1, 0, 1, in->dims + 1))) return st;
        *out = *in;
        return TRTSHIM_OK;
    }
    case LK_REDUCE: {
        if ((st = check_float_input(s, 0))) return st;
        if (p[0] < 0 || p[0] > TRTSHIM_REDUCE_MAX)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': unknown reduce op %lld", name, (long long)p[0]);
        uint64_t mask = (uint64_t)p[1];
        if (mask == 0 || (in->rank < 32 && (mask >> in->rank) != 0) || mask > 0xffffffffu)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': axes_mask 0x%llx must be non-zero with bits below rank %d",
                             name, (unsigned long long)mask, in->rank);
        if (p[2] != 0 && p[2] != 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': keep_dims must be 0 or 1", name);
        out->rank = 0;
        for (int32_t i = 0; i < in->rank; i++) {
            if (mask & (1u << i)) {
                if (p[2]) out->dims[out->rank++] = 1;
            } else {
                out->dims[out->rank++] = in->dims[i];
            }
        }
        return TRTSHIM_OK;
    }
    case LK_POOLING: {
        if ((st = check_float_input(s, 0))) return st;
        if (in->rank != 4) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input must be NCHW (rank 4), got rank %d", name, in->rank);
        if (p[0] < 0 || p[0] > TRTSHIM_POOL_GLOBAL_AVERAGE)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': unknown pooling op %lld", name, (long long)p[0]);
        *out = *in;
        if (p[0] == TRTSHIM_POOL_GLOBAL_AVERAGE) {
            if (p[1] != 0 && p[1] != 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': bad params flag", name);
            out->dims[2] = out->dims[3] = 1;
            return TRTSHIM_OK;
        }
        if (p[1] != 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': pooling params are null", name);
        const int64_t *pp = p + 2;
        for (int i = 0; i < 8; i++)
            if (pp[i] < (i < 4 ? 1 : 0) || pp[i] > (1 << 24))
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': pooling parameter %d out of range: %lld", name, i,
                                 (long long)pp[i]);
        if (pp[8] != 0 && pp[8] != 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': count_include_pad must be 0 or 1", name);
        if (pp[4] >= pp[0] || pp[6] >= pp[0] || pp[5] >= pp[1] || pp[7] >= pp[1])
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': padding must be smaller than the window", name);
        int64_t hh = in->dims[2] + pp[4] + pp[6] - pp[0], ww = in->dims[3] + pp[5] + pp[7] - pp[1];
        if (hh < 0 || ww < 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': window %lldx%lld larger than padded input", name,
                             (long long)pp[0], (long long)pp[1]);
        out->dims[2] = hh / pp[2] + 1;
        out->dims[3] = ww / pp[3] + 1;
        return TRTSHIM_OK;
    }
    case LK_RESHAPE: {
        if ((st = check_float_input(s, 0))) return st;
        int64_t r = p[0];
        if (r < 0 || r > MAX_RANK) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': rank must be 0..%d, got %lld", name, MAX_RANK, (long long)r);
        int64_t known = 1, vin = shape_volume(in->rank, in->dims);
        int inferred = -1;
        for (int32_t i = 0; i < r; i++) {
            int64_t d = p[1 + i];
            if (d == -1) {
                if (inferred >= 0) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': more than one -1 dimension", name);
                inferred = i;
            } else if (d < 0 || d > ((int64_t)1 << 40)) {
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': dimension %d is %lld", name, i, (long long)d);
            } else {
                known *= d;
                if (known > ((int64_t)1 << 40)) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': shape too large", name);
            }
            out->dims[i] = d;
        }
        out->rank = (int32_t)r;
        if (inferred >= 0) {
            if (known == 0 || vin % known)
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': cannot infer the -1 dimension: %lld elements over %lld",
                                 name, (long long)vin, (long long)known);
            out->dims[inferred] = vin / known;
            known = vin;
        }
        if (known != vin)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': reshape of %lld elements into %lld elements", name,
                             (long long)vin, (long long)known);
        return TRTSHIM_OK;
    }
    case LK_TRANSPOSE: {
        if ((st = check_float_input(s, 0))) return st;
        int seen[MAX_RANK] = {0};
        for (int32_t i = 0; i < in->rank; i++) {
            int64_t a = p[i];
            if (a < 0 || a >= in->rank || seen[a])
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': perm is not a permutation of 0..%d (entry %d is %lld)",
                                 name, in->rank - 1, i, (long long)a);
            seen[a] = 1;
            out->dims[i] = in->dims[a];
        }
        out->rank = in->rank;
        return TRTSHIM_OK;
    }
    case LK_CONCATENATION: {
        if (q->num_inputs < 1) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': needs at least one input", name);
        int32_t axis = normalize_axis(p[0], in->rank);
        if (axis < 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': axis %lld out of range for rank %d", name, (long long)p[0], in->rank);
        *out = *in;
        out->dims[axis] = 0;
        for (int32_t i = 0; i < q->num_inputs; i++) {
            const tensor_desc *t = &s->net->tensors[q->inputs[i]].desc;
            if (t->dtype != TRTSHIM_FLOAT32)
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input %d must be float32, got %s", name, i, dtype_name(t->dtype));
            if (t->rank != in->rank)
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input %d has rank %d, input 0 has rank %d", name, i, t->rank, in->rank);
            for (int32_t d = 0; d < in->rank; d++)
                if (d != axis && t->dims[d] != in->dims[d])
                    return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input %d dimension %d is %lld, expected %lld", name,
                                     i, d, (long long)t->dims[d], (long long)in->dims[d]);
            out->dims[axis] += t->dims[axis];
        }
        return TRTSHIM_OK;
    }
    case LK_SLICE: {
        if ((st = check_float_input(s, 0))) return st;
        for (int32_t i = 0; i < in->rank; i++) {
            int64_t start = p[i], size = p[8 + i], stride = p[16 + i], dim = in->dims[i];
            if (start < 0 || size < 0 || stride < 1 || start > dim || (size > 0 && start >= dim) ||
                (size > 0 && (size - 1) > (dim - 1 - start) / stride))
                return set_error(TRTSHIM_ERR_ARGUMENT,
                                 "layer '%s': dimension %d (size %lld): start %lld, size %lld, stride %lld out of range",
                                 name, i, (long long)dim, (long long)start, (long long)size, (long long)stride);
            out->dims[i] = size;
        }
        out->rank = in->rank;
        return TRTSHIM_OK;
    }
    case LK_GATHER: {
        if ((st = check_float_input(s, 0))) return st;
        const tensor_desc *ix = &s->in[1];
        if (ix->dtype != TRTSHIM_INT32 && ix->dtype != TRTSHIM_INT64)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': indices must be int32 or int64, got %s", name, dtype_name(ix->dtype));
        int32_t axis = normalize_axis(p[0], in->rank);
        if (axis < 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': axis %lld out of range for rank %d", name, (long long)p[0], in->rank);
        if (in->rank - 1 + ix->rank > MAX_RANK)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': output rank %d exceeds %d", name, in->rank - 1 + ix->rank, MAX_RANK);
        out->rank = 0;
        for (int32_t i = 0; i < axis; i++) out->dims[out->rank++] = in->dims[i];
        for (int32_t i = 0; i < ix->rank; i++) out->dims[out->rank++] = ix->dims[i];
        for (int32_t i = axis + 1; i < in->rank; i++) out->dims[out->rank++] = in->dims[i];
        return TRTSHIM_OK;
    }
    case LK_CONSTANT: {
        int64_t r = p[0];
        if (r < 0 || r > MAX_RANK) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': rank must be 0..%d, got %lld", name, MAX_RANK, (long long)r);
        for (int32_t i = 0; i < r; i++)
            if (p[1 + i] < 1 || p[1 + i] > ((int64_t)1 << 40))
                return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': dimension %d must be >= 1, got %lld", name, i, (long long)p[1 + i]);
        if ((st = check_weight(s, 0, TRTSHIM_ROLE_CONSTANT, 1, 1, (int32_t)r, p + 1))) return st;
        out->rank = (int32_t)r;
        for (int32_t i = 0; i < r; i++) out->dims[i] = p[1 + i];
        trtshim_dtype wd = q->weights[0]->dtype;
        out->dtype = (wd == TRTSHIM_INT32 || wd == TRTSHIM_INT64) ? wd : TRTSHIM_FLOAT32;
        return TRTSHIM_OK;
    }
    default:
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': unknown layer kind %d", name, (int)q->kind);
    }
}

static int expected_inputs(layer_kind k) {
    switch (k) {
    case LK_MATRIX_MULTIPLY: case LK_ELEMENTWISE: case LK_GATHER: return 2;
    case LK_CONSTANT: return 0;
    case LK_CONCATENATION: return -1;
    default: return 1;
    }
}

trtshim_status network_add_layer(trtshim_network *net, const layer_request *req, int copy_values, int32_t *out_tensor) {
    if (!net) return set_error(TRTSHIM_ERR_ARGUMENT, "add %s: network is null", layer_kind_name(req->kind));
    if (!out_tensor) return set_error(TRTSHIM_ERR_ARGUMENT, "add %s: out_tensor is null", layer_kind_name(req->kind));
    trtshim_status st = check_name(layer_kind_name(req->kind), req->name);
    if (st) return st;
    for (int32_t i = 0; i < net->num_layers; i++)
        if (strcmp(net->layers[i].name, req->name) == 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': a layer of that name already exists", req->name);
    int want = expected_inputs(req->kind);
    if (want >= 0 && req->num_inputs != want)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': expected %d inputs, got %d", req->name, want, req->num_inputs);
    if (req->num_inputs < 0 || req->num_inputs > 65536)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input count %d out of range", req->name, req->num_inputs);
    if (req->num_inputs > 0 && !req->inputs) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': inputs is null", req->name);
    check_state s;
    memset(&s, 0, sizeof(s));
    s.net = net;
    s.req = req;
    s.copy_values = copy_values;
    for (int32_t i = 0; i < req->num_inputs; i++) {
        int32_t t = req->inputs[i];
        if (t < 0 || t >= net->num_tensors)
            return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': input %d: no tensor with id %d (the network has %d)",
                             req->name, i, t, net->num_tensors);
        if (i < 2) s.in[i] = net->tensors[t].desc;
    }
    if ((st = infer(&s))) return st;
    if (shape_volume(s.out.rank, s.out.dims) < 0 || shape_volume(s.out.rank, s.out.dims) > ((int64_t)1 << 40))
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': output shape too large", req->name);

    /* Commit: copy name, inputs and weights, then append. */
    layer l;
    memset(&l, 0, sizeof(l));
    l.kind = req->kind;
    l.epsilon = req->epsilon;
    memcpy(l.params, req->params, sizeof(l.params));
    l.num_inputs = req->num_inputs;
    l.name = copy_string(req->name);
    l.inputs = malloc(sizeof(int32_t) * (size_t)(req->num_inputs ? req->num_inputs : 1));
    int ok = l.name && l.inputs;
    if (ok && req->num_inputs) memcpy(l.inputs, req->inputs, sizeof(int32_t) * (size_t)req->num_inputs);
    for (int i = 0; i < MAX_LAYER_WEIGHTS && ok; i++) {
        l.weights[i] = s.w[i];
        if (s.w[i].present && copy_values) {
            size_t bytes = (size_t)(s.w[i].count * trtshim_dtype_size(s.w[i].dtype));
            l.weights[i].data = malloc(bytes ? bytes : 1);
            if (!l.weights[i].data) ok = 0;
            else if (bytes) memcpy(l.weights[i].data, req->weights[i]->values, bytes);
        }
    }
    if (ok) ok = grow((void **)&net->layers, &net->cap_layers, net->num_layers, sizeof(layer));
    int32_t id = -1;
    if (ok) ok = add_tensor(net, &s.out, net->num_layers, -1, &id) == TRTSHIM_OK;
    if (!ok) {
        free(l.name);
        free(l.inputs);
        for (int i = 0; i < MAX_LAYER_WEIGHTS; i++) free(l.weights[i].data);
        return set_error(TRTSHIM_ERR_MEMORY, "layer '%s': out of memory", req->name);
    }
    l.output = id;
    net->layers[net->num_layers++] = l;
    *out_tensor = id;
    return TRTSHIM_OK;
}

/* ---- public add_* wrappers: pack arguments into a layer_request ---------------------------------- */

static layer_request request(layer_kind kind, const char *name, int32_t num_inputs, const int32_t *inputs) {
    layer_request q;
    memset(&q, 0, sizeof(q));
    q.kind = kind;
    q.name = name;
    q.num_inputs = num_inputs;
    q.inputs = inputs;
    return q;
}

trtshim_status trtshim_network_add_fully_connected(trtshim_network *net, const char *name, int32_t input,
                                                   int64_t out_features, const trtshim_weights *kernel,
                                                   const trtshim_weights *bias, int32_t *out_tensor) {
    layer_request q = request(LK_FULLY_CONNECTED, name, 1, &input);
    q.params[0] = out_features;
    q.weights[0] = kernel;
    q.weights[1] = bias;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_matrix_multiply(trtshim_network *net, const char *name, int32_t a, int32_t transpose_a,
                                                   int32_t b, int32_t transpose_b, int32_t *out_tensor) {
    int32_t in[2] = {a, b};
    layer_request q = request(LK_MATRIX_MULTIPLY, name, 2, in);
    q.params[0] = transpose_a;
    q.params[1] = transpose_b;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_convolution(trtshim_network *net, const char *name, int32_t input,
                                               const trtshim_conv_params *params, const trtshim_weights *kernel,
                                               const trtshim_weights *bias, int32_t *out_tensor) {
    if (!params) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': convolution params are null", name ? name : "?");
    layer_request q = request(LK_CONVOLUTION, name, 1, &input);
    const int32_t f[12] = {params->out_channels, params->kernel_h, params->kernel_w, params->stride_h,
                           params->stride_w, params->pad_top, params->pad_left, params->pad_bottom,
                           params->pad_right, params->dilation_h, params->dilation_w, params->groups};
    for (int i = 0; i < 12; i++) q.params[i] = f[i];
    q.weights[0] = kernel;
    q.weights[1] = bias;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_elementwise(trtshim_network *net, const char *name, int32_t a, int32_t b,
                                               trtshim_elementwise_op op, int32_t *out_tensor) {
    int32_t in[2] = {a, b};
    layer_request q = request(LK_ELEMENTWISE, name, 2, in);
    q.params[0] = (int64_t)op;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_unary(trtshim_network *net, const char *name, int32_t input, trtshim_unary_op op,
                                         int32_t *out_tensor) {
    layer_request q = request(LK_UNARY, name, 1, &input);
    q.params[0] = (int64_t)op;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_softmax(trtshim_network *net, const char *name, int32_t input, int32_t axis,
                                           int32_t *out_tensor) {
    layer_request q = request(LK_SOFTMAX, name, 1, &input);
    q.params[0] = axis;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_layer_norm(trtshim_network *net, const char *name, int32_t input, int32_t axis,
                                              float epsilon, const trtshim_weights *scale, const trtshim_weights *shift,
                                              int32_t *out_tensor) {
    layer_request q = request(LK_LAYER_NORM, name, 1, &input);
    q.params[0] = axis;
    q.epsilon = epsilon;
    q.weights[0] = scale;
    q.weights[1] = shift;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_rms_norm(trtshim_network *net, const char *name, int32_t input, float epsilon,
                                            const trtshim_weights *scale, int32_t *out_tensor) {
    layer_request q = request(LK_RMS_NORM, name, 1, &input);
    q.epsilon = epsilon;
    q.weights[0] = scale;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_batch_norm(trtshim_network *net, const char *name, int32_t input, float epsilon,
                                              const trtshim_weights *scale, const trtshim_weights *shift,
                                              const trtshim_weights *mean, const trtshim_weights *variance,
                                              int32_t *out_tensor) {
    layer_request q = request(LK_BATCH_NORM, name, 1, &input);
    q.epsilon = epsilon;
    q.weights[0] = scale;
    q.weights[1] = shift;
    q.weights[2] = mean;
    q.weights[3] = variance;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_reduce(trtshim_network *net, const char *name, int32_t input, trtshim_reduce_op op,
                                          uint32_t axes_mask, int32_t keep_dims, int32_t *out_tensor) {
    layer_request q = request(LK_REDUCE, name, 1, &input);
    q.params[0] = (int64_t)op;
    q.params[1] = axes_mask;
    q.params[2] = keep_dims;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_pooling(trtshim_network *net, const char *name, int32_t input, trtshim_pool_op op,
                                           const trtshim_pool_params *params, int32_t *out_tensor) {
    layer_request q = request(LK_POOLING, name, 1, &input);
    q.params[0] = (int64_t)op;
    q.params[1] = params != NULL;
    if (params) {
        const int32_t f[9] = {params->kernel_h, params->kernel_w, params->stride_h, params->stride_w, params->pad_top,
                              params->pad_left, params->pad_bottom, params->pad_right, params->count_include_pad};
        for (int i = 0; i < 9; i++) q.params[2 + i] = f[i];
    }
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_reshape(trtshim_network *net, const char *name, int32_t input, int32_t rank,
                                           const int64_t *dims, int32_t *out_tensor) {
    if (rank < 0 || rank > MAX_RANK)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': rank must be 0..%d, got %d", name ? name : "?", MAX_RANK, rank);
    if (rank > 0 && !dims) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': dims is null", name ? name : "?");
    layer_request q = request(LK_RESHAPE, name, 1, &input);
    q.params[0] = rank;
    for (int32_t i = 0; i < rank; i++) q.params[1 + i] = dims[i];
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_transpose(trtshim_network *net, const char *name, int32_t input, const int32_t *perm,
                                             int32_t *out_tensor) {
    if (!net) return set_error(TRTSHIM_ERR_ARGUMENT, "add transpose: network is null");
    if (input < 0 || input >= net->num_tensors)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': no tensor with id %d", name ? name : "?", input);
    int32_t rank = net->tensors[input].desc.rank;
    if (rank > 0 && !perm) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': perm is null", name ? name : "?");
    layer_request q = request(LK_TRANSPOSE, name, 1, &input);
    for (int32_t i = 0; i < rank; i++) q.params[i] = perm[i];
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_concatenation(trtshim_network *net, const char *name, int32_t count,
                                                 const int32_t *inputs, int32_t axis, int32_t *out_tensor) {
    layer_request q = request(LK_CONCATENATION, name, count, inputs);
    q.params[0] = axis;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_slice(trtshim_network *net, const char *name, int32_t input, const int64_t *start,
                                         const int64_t *size, const int64_t *stride, int32_t *out_tensor) {
    if (!net) return set_error(TRTSHIM_ERR_ARGUMENT, "add slice: network is null");
    if (input < 0 || input >= net->num_tensors)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': no tensor with id %d", name ? name : "?", input);
    int32_t rank = net->tensors[input].desc.rank;
    if (rank > 0 && (!start || !size || !stride))
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': start, size or stride is null", name ? name : "?");
    layer_request q = request(LK_SLICE, name, 1, &input);
    for (int32_t i = 0; i < rank; i++) {
        q.params[i] = start[i];
        q.params[8 + i] = size[i];
        q.params[16 + i] = stride[i];
    }
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_gather(trtshim_network *net, const char *name, int32_t data, int32_t indices,
                                          int32_t axis, int32_t *out_tensor) {
    int32_t in[2] = {data, indices};
    layer_request q = request(LK_GATHER, name, 2, in);
    q.params[0] = axis;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_add_constant(trtshim_network *net, const char *name, int32_t rank, const int64_t *dims,
                                            const trtshim_weights *weights, int32_t *out_tensor) {
    if (rank < 0 || rank > MAX_RANK)
        return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': rank must be 0..%d, got %d", name ? name : "?", MAX_RANK, rank);
    if (rank > 0 && !dims) return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': dims is null", name ? name : "?");
    layer_request q = request(LK_CONSTANT, name, 0, NULL);
    q.params[0] = rank;
    for (int32_t i = 0; i < rank; i++) q.params[1 + i] = dims[i];
    q.weights[0] = weights;
    return network_add_layer(net, &q, 1, out_tensor);
}

trtshim_status trtshim_network_tensor_shape(const trtshim_network *net, int32_t tensor, trtshim_dtype *dtype,
                                            int32_t *rank, int64_t *dims) {
    if (!net) return set_error(TRTSHIM_ERR_ARGUMENT, "tensor_shape: network is null");
    if (tensor < 0 || tensor >= net->num_tensors)
        return set_error(TRTSHIM_ERR_ARGUMENT, "tensor_shape: no tensor with id %d (the network has %d)", tensor,
                         net->num_tensors);
    const tensor_desc *d = &net->tensors[tensor].desc;
    if (dtype) *dtype = d->dtype;
    if (rank) *rank = d->rank;
    if (dims)
        for (int32_t i = 0; i < d->rank; i++) dims[i] = d->dims[i];
    return TRTSHIM_OK;
}

/* Replays the network into a new one without weight values: the engine's own description. */
trtshim_status network_clone_structure(const trtshim_network *net, trtshim_network **out) {
    trtshim_network *c;
    trtshim_status st = trtshim_network_create(&c);
    if (st) return st;
    int32_t next_layer = 0, next_input = 0;
    for (int32_t t = 0; t < net->num_tensors && !st; t++) {
        const tensor_info *ti = &net->tensors[t];
        int32_t id = -1;
        if (ti->producer_layer < 0) {
            const io_binding *b = &net->inputs[next_input++];
            st = network_add_input_impl(c, b->name, ti->desc.dtype, ti->desc.rank, ti->desc.dims, &id);
        } else {
            const layer *l = &net->layers[next_layer++];
            layer_request q = request(l->kind, l->name, l->num_inputs, l->inputs);
            memcpy(q.params, l->params, sizeof(q.params));
            q.epsilon = l->epsilon;
            trtshim_weights w[MAX_LAYER_WEIGHTS];
            for (int i = 0; i < MAX_LAYER_WEIGHTS; i++) {
                if (!l->weights[i].present) continue;
                w[i].dtype = l->weights[i].dtype;
                w[i].values = NULL;
                w[i].count = l->weights[i].count;
                q.weights[i] = &w[i];
            }
            st = network_add_layer(c, &q, 0, &id);
        }
    }
    for (int32_t i = 0; i < net->num_outputs && !st; i++)
        st = network_mark_output_impl(c, net->outputs[i].tensor, net->outputs[i].name);
    if (st) {
        trtshim_network_destroy(c);
        return st;
    }
    *out = c;
    return TRTSHIM_OK;
}
