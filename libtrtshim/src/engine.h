/* engine.h: internal structures of the ref backend shared by network.c, builder.c, engine.c,
   serialize.c, refit.c and context.c. */
#ifndef TRTSHIM_ENGINE_H
#define TRTSHIM_ENGINE_H

#include <pthread.h>
#include <stdint.h>
#include "common.h"
#include "gemm.h"

#define MAX_RANK TRTSHIM_MAX_RANK
#define MAX_LAYER_WEIGHTS 4
#define MAX_PARAMS 24
#define MAX_NAME 4096
#define MAX_CHAIN 4

/* ---- network -------------------------------------------------------------------------------- */

typedef enum {
    LK_FULLY_CONNECTED, LK_MATRIX_MULTIPLY, LK_CONVOLUTION, LK_ELEMENTWISE, LK_UNARY, LK_SOFTMAX,
    LK_LAYER_NORM, LK_RMS_NORM, LK_BATCH_NORM, LK_REDUCE, LK_POOLING, LK_RESHAPE, LK_TRANSPOSE,
    LK_CONCATENATION, LK_SLICE, LK_GATHER, LK_CONSTANT, LK_COUNT
} layer_kind;

typedef struct {
    trtshim_dtype dtype;
    int32_t rank;
    int64_t dims[MAX_RANK];
} tensor_desc;

/* A weight as the network declared it. data is NULL in a structure-only network (inside an engine). */
typedef struct {
    int present;
    trtshim_role role;
    trtshim_dtype dtype;
    int32_t rank;
    int64_t dims[MAX_RANK];
    int64_t count;
    void *data;
} layer_weight;

/* Parameters by kind, in params[]:
   FC: out_features | MATMUL: transpose_a, transpose_b | CONV: the 12 fields of trtshim_conv_params |
   ELEMENTWISE, UNARY: op | SOFTMAX: axis | LAYER_NORM: axis | REDUCE: op, mask, keep_dims |
   POOLING: op, has_params, then the 9 fields of trtshim_pool_params | RESHAPE, CONSTANT: rank, dims... |
   TRANSPOSE: perm... | CONCATENATION, GATHER: axis | SLICE: start[8], size[8], stride[8].
   Axes are stored as given (possibly negative); epsilon in `epsilon`. */
typedef struct {
    layer_kind kind;
    char *name;
    int32_t num_inputs;
    int32_t *inputs;
    int32_t output;
    int64_t params[MAX_PARAMS];
    float epsilon;
    layer_weight weights[MAX_LAYER_WEIGHTS];
} layer;

typedef struct {
    tensor_desc desc;
    int32_t producer_layer; /* -1 for a network input */
    int32_t input_index;    /* index among inputs, or -1 */
} tensor_info;

typedef struct {
    char *name;
    int32_t tensor;
} io_binding;

struct trtshim_network {
    tensor_info *tensors;
    int32_t num_tensors, cap_tensors;
    layer *layers;
    int32_t num_layers, cap_layers;
    io_binding *inputs;
    int32_t num_inputs, cap_inputs;
    io_binding *outputs;
    int32_t num_outputs, cap_outputs;
};

/* A layer to add, before validation. weights[i] may be NULL (absent). */
typedef struct {
    layer_kind kind;
    const char *name;
    int32_t num_inputs;
    const int32_t *inputs;
    int64_t params[MAX_PARAMS];
    float epsilon;
    const trtshim_weights *weights[MAX_LAYER_WEIGHTS];
} layer_request;

/* Validates and appends a layer. With copy_values = 0 the weights' values are not read or kept (they
   may be NULL): a structure-only network, as an engine file describes it. */
trtshim_status network_add_layer(trtshim_network *net, const layer_request *req, int copy_values, int32_t *out_tensor);
trtshim_status network_add_input_impl(trtshim_network *net, const char *name, trtshim_dtype dtype, int32_t rank,
                                      const int64_t *dims, int32_t *out_tensor);
trtshim_status network_mark_output_impl(trtshim_network *net, int32_t tensor, const char *name);
/* A structure-only copy (no weight values). */
trtshim_status network_clone_structure(const trtshim_network *net, trtshim_network **out);
const char *layer_kind_name(layer_kind kind);
int32_t normalize_axis(int64_t axis, int32_t rank); /* -1 when out of range */

/* ---- engine --------------------------------------------------------------------------------- */

typedef enum { STEP_GEMM, STEP_CONV, STEP_MATMUL, STEP_LAYER } step_kind;

/* One GEMM (or convolution) output: a layer and the layers fused after it. */
typedef struct {
    int32_t layers[MAX_CHAIN]; /* the primary layer, then fused ones (bias add, batch norm, activation) */
    int32_t num_layers;
    int32_t out_tensor;        /* the tensor the member writes */
    int64_t col, n;            /* its column range in the step's GEMM */
    int32_t kernel_w;          /* network weight packed as B */
    int32_t kernel_transposed; /* B given as [N, K] */
    int32_t bias_w;            /* network weight added as bias, -1 none */
    int32_t bn_layer;          /* folded batch norm layer, -1 none */
} step_member;

typedef struct {
    step_kind kind;
    int32_t layer;          /* the primary layer (of member 0) */
    int32_t input;          /* the activation input of GEMM and CONV steps */
    trtshim_unary_op act;
    int32_t tactic;         /* GEMM and CONV steps; -1 otherwise */
    int64_t M, N, K;        /* GEMM: rows, total columns, depth; CONV: per image and group */
    int32_t num_members;
    step_member *members;
    int32_t packed_buffer;  /* engine buffer with B packed (CONV: one block per group) */
    int32_t bias_buffer;    /* float32 [N] (CONV: [out_channels]), -1 none */
    int64_t temp_floats;    /* arena temp this step needs */
    gemm_quant_format quant; /* GEMM and CONV steps: kind 0 keeps the engine's precision */
} step;

typedef enum { UNIT_PACK_GEMM, UNIT_PACK_CONV, UNIT_BIAS, UNIT_FOLD, UNIT_PLAIN } unit_kind;

/* A unit materializes part of one engine buffer (or two, for a fold) from network-level weights. It is
   the one transform used by both build and refit. */
typedef struct {
    unit_kind kind;
    int32_t step, member;
    int32_t buffer;        /* PLAIN: the copy; PACK_*: packed buffer; BIAS: bias buffer; FOLD: packed */
    int32_t buffer2;       /* FOLD: bias buffer */
    int32_t sources[6];    /* network weight indices; FOLD: conv kernel, conv bias (-1), scale, shift, mean, variance */
    int32_t num_sources;
} unit;

typedef struct {
    void *data;            /* 64-byte aligned */
    uint64_t bytes;
    int32_t external;      /* data points into the engine's file mapping (not freed) */
} weight_buffer;

/* A refittable weight at network level. */
typedef struct {
    int32_t layer, slot;
    const char *name;      /* the layer's name, owned by the network */
    trtshim_role role;
    trtshim_dtype dtype;
    int32_t rank;
    int64_t dims[MAX_RANK];
    int64_t count;
    uint64_t bytes;
    int32_t plain_buffer;  /* buffer holding it as float32 (or raw for ints), -1 none */
    float *retained;       /* float32 copy kept for a batch-norm-fold group, NULL none */
} engine_weight;

typedef struct {
    const char *name;
    int32_t tensor;
    int32_t is_input;
} engine_io;

struct trtshim_engine {
    int refcount;                  /* guarded by lock */
    pthread_mutex_t lock;
    int executing;                 /* contexts inside execute */
    int applying;                  /* a refit is writing */
    trtshim_network *net;          /* structure only */
    trtshim_dtype precision;
    int32_t refittable, tactic_search, num_threads, config_threads;
    int32_t has_weights;
    int32_t retained_valid;        /* retained copies hold the current network-level values */
    step *steps;
    int32_t num_steps;
    unit *units;
    int32_t num_units, cap_units;
    weight_buffer *buffers;
    int32_t num_buffers, cap_buffers;
    engine_weight *weights;
    int32_t num_weights;
    int32_t *layer_weight_index;   /* [layer * MAX_LAYER_WEIGHTS + slot] -> weight index, -1 none */
    engine_io *io;
    int32_t num_io;
    int64_t *tensor_offset;        /* arena offset in floats per tensor; -1 not in the arena */
    int32_t *tensor_const_weight;  /* weight index of a constant tensor, -1 otherwise */
    uint64_t arena_floats, temp_floats;
    /* weight streaming (streaming.c) */
    int32_t weight_streaming;      /* built with weight_streaming = 1 */
    struct stream_state *stream;   /* budget, residency and accounting; NULL when not streaming */
    void *file_map;                /* a loaded streaming engine keeps its file mapped as host storage */
    uint64_t file_map_bytes;
    /* quantized kernels (trtshim_weight_format values; 0 keeps the precision) */
    int32_t gemm_format, conv_format, int4_group_size;
};

/* builder.c */
/* Plans steps, units and buffers for `net` (structure only is enough). tactics: NULL to choose (search
   or default), else one per step (-1 for non-GEMM steps) as an engine file recorded them. */
trtshim_status engine_plan(trtshim_engine *e, const int32_t *tactics, int32_t num_tactics);
/* Scratch floats a unit needs beyond its sources. */
int64_t unit_scratch_floats(const trtshim_engine *e, const unit *u);
/* Runs one unit with its sources as float32 arrays (src[i] for unit.sources[i]; NULL where absent; raw
   integers for an integer constant) and `scratch` of unit_scratch_floats floats. Cannot fail. */
void unit_materialize_scratch(trtshim_engine *e, const unit *u, const float *const *src, float *scratch);
trtshim_status engine_alloc_retained(trtshim_engine *e);
/* Builds an engine object around a structure-only network (used by build and deserialize). */
trtshim_status engine_new(trtshim_network *net, trtshim_dtype precision, int32_t refittable, int32_t tactic_search,
                          int32_t config_threads, trtshim_engine **out);
trtshim_status engine_alloc_buffers(trtshim_engine *e);
/* Bytes of one packed block of a GEMM or CONV step's weights (a CONV step holds one per group). */
size_t step_block_bytes(const trtshim_engine *e, const step *s);
/* The format a unit packs into: kind 0 when the unit is not a pack into a quantized step. */
gemm_quant_format unit_quant_format(const trtshim_engine *e, const unit *u);
/* The checks a unit's write would fail on, run before anything is written: for a quantized pack every
   value it would quantize (after a batch norm fold) must be finite. src and scratch as for
   unit_materialize_scratch. */
trtshim_status unit_check(trtshim_engine *e, const unit *u, const float *const *src, float *scratch);
/* A pack unit of a quantized step from already-quantized values (INT4: one int8 value per byte, unpacked)
   and scales in gemm_quant_quantize's layouts for the weight's declared layout. Checked beforehand. */
void unit_materialize_quantized(trtshim_engine *e, const unit *u, const void *q, const float *scales);
/* The fold of a UNIT_FOLD unit written to `packed` (the packed buffer's bytes) and `bias` (out_channels
   floats) instead of the engine's buffers: what unit_materialize_scratch writes there (readback.c). */
void unit_fold_into(trtshim_engine *e, const unit *u, const float *const *src, float *scratch, void *packed, float *bias);
/* Weight index by name and role, -1 if none. */
int32_t engine_find_weight(const trtshim_engine *e, const char *name, trtshim_role role);

/* engine.c */
void engine_retain(trtshim_engine *e);
void engine_release(trtshim_engine *e);
/* Readers of the weight buffers (execute, serialize) hold the engine against a refit's writes; either
   side is refused with ERR_STATE while the other is under way. */
trtshim_status engine_begin_read(trtshim_engine *e, const char *what);
void engine_end_read(trtshim_engine *e);

/* context.c: runs one step; tensors[t] points at tensor t's data. step_run_packed takes the step's packed
   weights from `packed` instead of its engine buffer (a resident or streamed copy); NULL: the buffer. */
trtshim_status step_run(const trtshim_engine *e, const step *s, void *const *tensors, float *temp);
trtshim_status step_run_packed(const trtshim_engine *e, const step *s, void *const *tensors, float *temp,
                               const void *packed);

/* streaming.c */
typedef struct stream_run stream_run;
/* Sets up streaming state for an engine built (or loaded) with weight_streaming; budget = the total. */
trtshim_status stream_init(trtshim_engine *e);
void stream_free(trtshim_engine *e);
/* Inside execute (the engine held for reading): fills the arena if needed, takes a window and starts the
   prefetching worker. *out is NULL when the engine does not stream. */
trtshim_status stream_run_begin(trtshim_engine *e, stream_run **out);
/* The packed weights of step i for this run (waits for the prefetch of a streamed one); NULL: use the
   engine buffer. Then stream_step_done releases a window slot. */
const void *stream_step_weights(stream_run *r, int32_t step_index);
void stream_step_done(stream_run *r, int32_t step_index);
/* Stops the worker and returns the window to the engine. */
void stream_run_end(stream_run *r, int ok);
/* After a refit wrote engine buffer b (host storage): refresh its resident copy. */
void stream_buffer_changed(trtshim_engine *e, int32_t buffer);

/* Where execute reads engine buffer b from (the engine held for reading): the resident arena copy of a
   streamable buffer once the arena is filled, else host storage. */
const void *stream_buffer_source(trtshim_engine *e, int32_t b);

/* digest.c: trtshim_digest's pieces, for a caller that produces the bytes chunk by chunk (readback.c). */
uint64_t digest_chunk_bytes(void);
void digest_chunk(const void *data, uint64_t n, uint64_t index, uint64_t out[2]);
void digest_combine(const uint64_t *chunk_digests, uint64_t chunks, uint64_t out[2]);

/* kernels.c */
void weights_to_f32(trtshim_dtype dtype, const void *src, float *dst, int64_t count);
int weights_all_finite(trtshim_dtype dtype, const void *src, int64_t count);
void *aligned_zalloc(uint64_t bytes);

#endif
