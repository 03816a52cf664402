/*
 * trtshim.h: the C ABI of libtrtshim.
 *
 * Build a network, compile it into an engine, run it, serialize it, and change its weights in place
 * (refit) without building again. The semantics follow an engine builder such as NVIDIA TensorRT; the
 * style follows C libraries written for foreign callers:
 *   - every object is an opaque handle with a create/destroy pair;
 *   - every fallible call returns a trtshim_status; trtshim_last_error() gives the message;
 *   - no call aborts or crashes on a bad argument, a null handle or a damaged engine file;
 *   - the caller owns what it passes in; the library copies what it keeps, except where a function
 *     says otherwise (trtshim_refitter_set_weights).
 *
 * Conventions
 *   - Tensors are row-major (C order), at most TRTSHIM_MAX_RANK dimensions, static shapes.
 *   - Activations are float32; index tensors (gather) are int32 or int64.
 *   - Images are NCHW; convolution kernels are [out_channels, in_channels / groups, kh, kw].
 *   - Fully connected kernels are [out_features, in_features] (the layout of torch.nn.Linear).
 *   - Axes may be negative (counted from the end).
 *   - A weight is addressed by the name of the layer that owns it plus a role, as TensorRT does.
 */
#ifndef TRTSHIM_H
#define TRTSHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TRTSHIM_API __declspec(dllexport)
#else
#define TRTSHIM_API __attribute__((visibility("default")))
#endif

/* Bumped on any change of a signature, an enum value or a struct layout. */
#define TRTSHIM_ABI_VERSION 2
#define TRTSHIM_MAX_RANK 8

typedef enum {
    TRTSHIM_OK = 0,
    TRTSHIM_ERR_ARGUMENT = 1,    /* bad argument: null handle or pointer, value out of range, shape mismatch */
    TRTSHIM_ERR_MEMORY = 2,      /* an allocation failed */
    TRTSHIM_ERR_NOT_FOUND = 3,   /* no tensor, layer or weight of that name */
    TRTSHIM_ERR_STATE = 4,       /* not allowed now: running a stripped engine, refitting a fixed one, ... */
    TRTSHIM_ERR_CORRUPT = 5,     /* an engine file is damaged: bad magic, checksum, truncation, bad table */
    TRTSHIM_ERR_VERSION = 6,     /* an engine file of another format version */
    TRTSHIM_ERR_IO = 7,          /* the operating system refused a file operation */
    TRTSHIM_ERR_UNSUPPORTED = 8, /* valid, but this backend cannot do it */
    TRTSHIM_ERR_VALIDATION = 9   /* refit weights failed validation; nothing was changed */
} trtshim_status;

typedef enum {
    TRTSHIM_FLOAT32 = 0,
    TRTSHIM_FLOAT16 = 1,
    TRTSHIM_BFLOAT16 = 2,
    TRTSHIM_INT32 = 3,
    TRTSHIM_INT64 = 4,
    TRTSHIM_INT8 = 5,
    TRTSHIM_UINT8 = 6,
    TRTSHIM_BOOL = 7,
    TRTSHIM_FP8_E4M3 = 8,
    TRTSHIM_FP8_E5M2 = 9,
    TRTSHIM_FLOAT64 = 10
} trtshim_dtype;

/* The role of a weight within its layer. */
typedef enum {
    TRTSHIM_ROLE_KERNEL = 0,   /* fully connected and convolution kernels */
    TRTSHIM_ROLE_BIAS = 1,     /* fully connected and convolution biases */
    TRTSHIM_ROLE_SCALE = 2,    /* gamma of batch, layer and RMS norm */
    TRTSHIM_ROLE_SHIFT = 3,    /* beta of batch and layer norm */
    TRTSHIM_ROLE_CONSTANT = 4, /* the value of a constant layer */
    TRTSHIM_ROLE_MEAN = 5,     /* running mean of batch norm */
    TRTSHIM_ROLE_VARIANCE = 6  /* running variance of batch norm */
} trtshim_role;

/* Values to copy into the network: `count` elements of `dtype` at `values`. */
typedef struct {
    trtshim_dtype dtype;
    const void *values;
    int64_t count;
} trtshim_weights;

TRTSHIM_API int32_t trtshim_abi_version(void);
TRTSHIM_API const char *trtshim_version(void);
/* The message of the most recent failed call in this process (not per thread: calls made through a
   worker thread report here too). Valid until the next call into the library from this thread. */
TRTSHIM_API const char *trtshim_last_error(void);
/* Bytes of one element of a dtype; 0 for an invalid dtype. */
TRTSHIM_API int64_t trtshim_dtype_size(trtshim_dtype dtype);

/* ---------------------------------------------------------------------------------------------- */
/* Network definition                                                                              */
/* ---------------------------------------------------------------------------------------------- */

typedef struct trtshim_network trtshim_network;

typedef enum {
    TRTSHIM_ELEMENTWISE_ADD = 0,
    TRTSHIM_ELEMENTWISE_SUB = 1,
    TRTSHIM_ELEMENTWISE_MUL = 2,
    TRTSHIM_ELEMENTWISE_DIV = 3,
    TRTSHIM_ELEMENTWISE_POW = 4,
    TRTSHIM_ELEMENTWISE_MIN = 5,
    TRTSHIM_ELEMENTWISE_MAX = 6
} trtshim_elementwise_op;

/* Activations and other one-input functions; also the activations a GEMM or convolution can fuse. */
typedef enum {
    TRTSHIM_UNARY_IDENTITY = 0,
    TRTSHIM_UNARY_RELU = 1,
    TRTSHIM_UNARY_GELU_ERF = 2,  /* x * 0.5 * (1 + erf(x / sqrt(2))) */
    TRTSHIM_UNARY_GELU_TANH = 3, /* x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) */
    TRTSHIM_UNARY_SILU = 4,
    TRTSHIM_UNARY_SIGMOID = 5,
    TRTSHIM_UNARY_TANH = 6,
    TRTSHIM_UNARY_HARDSWISH = 7,   /* x * min(max(x + 3, 0), 6) / 6 */
    TRTSHIM_UNARY_HARDSIGMOID = 8, /* max(0, min(1, x / 6 + 0.5)) (ONNX alpha 1/6, beta 0.5) */
    TRTSHIM_UNARY_EXP = 9,
    TRTSHIM_UNARY_SQRT = 10,
    TRTSHIM_UNARY_RECIPROCAL = 11,
    TRTSHIM_UNARY_NEG = 12,
    TRTSHIM_UNARY_ERF = 13,
    TRTSHIM_UNARY_ABS = 14,
    TRTSHIM_UNARY_LOG = 15
} trtshim_unary_op;

typedef enum {
    TRTSHIM_REDUCE_MEAN = 0,
    TRTSHIM_REDUCE_SUM = 1,
    TRTSHIM_REDUCE_MAX = 2
} trtshim_reduce_op;

typedef enum {
    TRTSHIM_POOL_AVERAGE = 0,
    TRTSHIM_POOL_MAX = 1,
    TRTSHIM_POOL_GLOBAL_AVERAGE = 2
} trtshim_pool_op;

typedef struct {
    int32_t out_channels;
    int32_t kernel_h, kernel_w;
    int32_t stride_h, stride_w;
    int32_t pad_top, pad_left, pad_bottom, pad_right;
    int32_t dilation_h, dilation_w;
    int32_t groups;
} trtshim_conv_params;

typedef struct {
    int32_t kernel_h, kernel_w;
    int32_t stride_h, stride_w;
    int32_t pad_top, pad_left, pad_bottom, pad_right;
    int32_t count_include_pad; /* average pooling: divide by the full window, padding included */
} trtshim_pool_params;

TRTSHIM_API trtshim_status trtshim_network_create(trtshim_network **out);
TRTSHIM_API void trtshim_network_destroy(trtshim_network *network);

/* Every add_* call takes a layer name, unique within the network (weights are addressed by it), and
   gives back the id of the layer's output tensor. Tensor ids are small non-negative integers. */
TRTSHIM_API trtshim_status trtshim_network_add_input(trtshim_network *network, const char *name, trtshim_dtype dtype,
                                                     int32_t rank, const int64_t *dims, int32_t *out_tensor);
/* Output names must be unique among inputs and outputs. A tensor may be marked more than once. */
TRTSHIM_API trtshim_status trtshim_network_mark_output(trtshim_network *network, int32_t tensor, const char *name);

/* [..., in_features] -> [..., out_features]; y = x W^T + b. bias may be null. */
TRTSHIM_API trtshim_status trtshim_network_add_fully_connected(trtshim_network *network, const char *name,
                                                               int32_t input, int64_t out_features,
                                                               const trtshim_weights *kernel,
                                                               const trtshim_weights *bias, int32_t *out_tensor);
/* Batched matrix product with numpy broadcasting of the leading dimensions; each operand may be
   transposed (its last two dimensions swapped). Rank 1 operands are not accepted. An operand that comes
   from a constant layer is packed by the builder as a GEMM weight. */
TRTSHIM_API trtshim_status trtshim_network_add_matrix_multiply(trtshim_network *network, const char *name,
                                                               int32_t a, int32_t transpose_a, int32_t b,
                                                               int32_t transpose_b, int32_t *out_tensor);
/* NCHW input; bias may be null. */
TRTSHIM_API trtshim_status trtshim_network_add_convolution(trtshim_network *network, const char *name, int32_t input,
                                                           const trtshim_conv_params *params,
                                                           const trtshim_weights *kernel,
                                                           const trtshim_weights *bias, int32_t *out_tensor);
/* Numpy broadcasting. */
TRTSHIM_API trtshim_status trtshim_network_add_elementwise(trtshim_network *network, const char *name, int32_t a,
                                                           int32_t b, trtshim_elementwise_op op,
                                                           int32_t *out_tensor);
TRTSHIM_API trtshim_status trtshim_network_add_unary(trtshim_network *network, const char *name, int32_t input,
                                                     trtshim_unary_op op, int32_t *out_tensor);
TRTSHIM_API trtshim_status trtshim_network_add_softmax(trtshim_network *network, const char *name, int32_t input,
                                                       int32_t axis, int32_t *out_tensor);
/* Normalizes over the dimensions from `axis` to the last; scale and shift have as many elements as those
   dimensions hold (either may be null: 1 and 0). */
TRTSHIM_API trtshim_status trtshim_network_add_layer_norm(trtshim_network *network, const char *name, int32_t input,
                                                          int32_t axis, float epsilon, const trtshim_weights *scale,
                                                          const trtshim_weights *shift, int32_t *out_tensor);
/* y = x / sqrt(mean(x^2 over the last dimension) + epsilon) * scale; scale may be null. */
TRTSHIM_API trtshim_status trtshim_network_add_rms_norm(trtshim_network *network, const char *name, int32_t input,
                                                        float epsilon, const trtshim_weights *scale,
                                                        int32_t *out_tensor);
/* Inference batch norm over dimension 1 (channels): (x - mean) / sqrt(variance + epsilon) * scale + shift. */
TRTSHIM_API trtshim_status trtshim_network_add_batch_norm(trtshim_network *network, const char *name, int32_t input,
                                                          float epsilon, const trtshim_weights *scale,
                                                          const trtshim_weights *shift, const trtshim_weights *mean,
                                                          const trtshim_weights *variance, int32_t *out_tensor);
/* axes_mask: bit i set reduces dimension i. */
TRTSHIM_API trtshim_status trtshim_network_add_reduce(trtshim_network *network, const char *name, int32_t input,
                                                      trtshim_reduce_op op, uint32_t axes_mask, int32_t keep_dims,
                                                      int32_t *out_tensor);
/* NCHW; params may be null for TRTSHIM_POOL_GLOBAL_AVERAGE (output [N, C, 1, 1]). */
TRTSHIM_API trtshim_status trtshim_network_add_pooling(trtshim_network *network, const char *name, int32_t input,
                                                       trtshim_pool_op op, const trtshim_pool_params *params,
                                                       int32_t *out_tensor);
/* Same element count; one dimension may be -1 (inferred). */
TRTSHIM_API trtshim_status trtshim_network_add_reshape(trtshim_network *network, const char *name, int32_t input,
                                                       int32_t rank, const int64_t *dims, int32_t *out_tensor);
/* Output dimension i is input dimension perm[i]. */
TRTSHIM_API trtshim_status trtshim_network_add_transpose(trtshim_network *network, const char *name, int32_t input,
                                                         const int32_t *perm, int32_t *out_tensor);
TRTSHIM_API trtshim_status trtshim_network_add_concatenation(trtshim_network *network, const char *name,
                                                             int32_t count, const int32_t *inputs, int32_t axis,
                                                             int32_t *out_tensor);
/* Per dimension: start (non-negative, in range), size (>= 0) and stride (>= 1). */
TRTSHIM_API trtshim_status trtshim_network_add_slice(trtshim_network *network, const char *name, int32_t input,
                                                     const int64_t *start, const int64_t *size, const int64_t *stride,
                                                     int32_t *out_tensor);
/* ONNX Gather: output shape = data.shape[:axis] + indices.shape + data.shape[axis+1:]. Negative indices
   count from the end; an index out of range is an error at run time. */
TRTSHIM_API trtshim_status trtshim_network_add_gather(trtshim_network *network, const char *name, int32_t data,
                                                      int32_t indices, int32_t axis, int32_t *out_tensor);
/* A weight of role TRTSHIM_ROLE_CONSTANT. Its dtype may be a float type (float32, float16, bfloat16; the
   tensor is float32) or int32 / int64 (an index tensor). */
TRTSHIM_API trtshim_status trtshim_network_add_constant(trtshim_network *network, const char *name, int32_t rank,
                                                        const int64_t *dims, const trtshim_weights *weights,
                                                        int32_t *out_tensor);

TRTSHIM_API trtshim_status trtshim_network_tensor_shape(const trtshim_network *network, int32_t tensor,
                                                        trtshim_dtype *dtype, int32_t *rank,
                                                        int64_t *dims /* TRTSHIM_MAX_RANK */);

/* ---------------------------------------------------------------------------------------------- */
/* Builder                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

typedef struct {
    trtshim_dtype weight_precision; /* FLOAT32, FLOAT16 or BFLOAT16; accumulation is always float32 */
    int32_t refittable;             /* weights may be changed after build */
    int32_t strip_weights;          /* build without weight values; the engine runs only after a refit */
    int32_t weight_streaming;       /* keep weights streamable under a budget (see Weight streaming) */
    int32_t tactic_search;          /* time candidate kernels per layer and keep the fastest */
    int32_t num_threads;            /* 0: one per core */
    /* (quantization section) kernel formats, a trtshim_weight_format each; 0 (AS_PRECISION) keeps
       weight_precision. Norms, embeddings and other constants are never quantized. */
    int32_t gemm_weight_format;     /* GEMM kernels: fully connected layers and matrix multiplies by a constant */
    int32_t conv_weight_format;     /* convolution kernels (after any batch norm fold) */
    int32_t int4_group_size;        /* rows of K per int4 scale: 32, 64 or 128 (0: 128) */
} trtshim_build_config;

typedef struct trtshim_engine trtshim_engine;

TRTSHIM_API void trtshim_build_config_default(trtshim_build_config *config);
/* Optimizes and compiles the network: folds batch norm into the preceding convolution, fuses bias and
   activation into GEMM and convolution, concatenates GEMMs that share an input, packs weights for the
   chosen kernels and converts their precision. A refittable engine keeps every fusion. The network is
   not changed and may be destroyed afterwards. */
TRTSHIM_API trtshim_status trtshim_build(const trtshim_network *network, const trtshim_build_config *config,
                                         trtshim_engine **out);

/* ---------------------------------------------------------------------------------------------- */
/* Engine                                                                                          */
/* ---------------------------------------------------------------------------------------------- */

/* An engine is reference counted: contexts and refitters hold it, so destroying the caller's handle while
   they live is safe. */
TRTSHIM_API void trtshim_engine_destroy(trtshim_engine *engine);

/* Engine files: a versioned header, the network description, the chosen tactics, a table of weights and
   the aligned weight blobs, all checksummed. Without weights the file is a stripped engine: it loads, lists
   its weights and refits, but refuses to run until every weight has been set by a refit. */
TRTSHIM_API trtshim_status trtshim_engine_serialized_size(const trtshim_engine *engine, int32_t include_weights,
                                                          uint64_t *size);
TRTSHIM_API trtshim_status trtshim_engine_serialize(const trtshim_engine *engine, int32_t include_weights,
                                                    void *buffer, uint64_t capacity, uint64_t *written);
TRTSHIM_API trtshim_status trtshim_engine_deserialize(const void *data, uint64_t size, trtshim_engine **out);
/* Writes to a temporary name beside `path`, fsyncs and renames, so `path` is never half-written. */
TRTSHIM_API trtshim_status trtshim_engine_save(const trtshim_engine *engine, const char *path,
                                               int32_t include_weights);
TRTSHIM_API trtshim_status trtshim_engine_load(const char *path, trtshim_engine **out);

typedef struct {
    int32_t num_io;            /* inputs first, then outputs */
    int32_t num_inputs;
    int32_t num_layers;        /* layers of the network */
    int32_t num_kernels;       /* compiled steps after fusion */
    int32_t num_weights;       /* refittable weights (network level) */
    int32_t refittable;
    int32_t has_weights;       /* 0 for a stripped engine not yet refitted */
    trtshim_dtype weight_precision;
    uint64_t weight_bytes;     /* bytes of weights in kernel format held by the engine */
    uint64_t scratch_bytes;    /* activation memory a context allocates */
} trtshim_engine_info;

TRTSHIM_API trtshim_status trtshim_engine_get_info(const trtshim_engine *engine, trtshim_engine_info *info);
/* Inputs and outputs by index. The name pointer lives as long as the engine. */
TRTSHIM_API trtshim_status trtshim_engine_io(const trtshim_engine *engine, int32_t index, const char **name,
                                             int32_t *is_input, trtshim_dtype *dtype, int32_t *rank,
                                             int64_t *dims /* TRTSHIM_MAX_RANK */);
/* Refittable weights by index, at network level (before fusion): the owning layer's name and the role,
   the dtype and shape the network declared, and the byte size a refit must supply. */
TRTSHIM_API trtshim_status trtshim_engine_weight(const trtshim_engine *engine, int32_t index, const char **name,
                                                 trtshim_role *role, trtshim_dtype *dtype, int32_t *rank,
                                                 int64_t *dims /* TRTSHIM_MAX_RANK */, uint64_t *bytes);
/* A JSON description of the compiled steps (kind, fused layers, tactic, weights), for inspection.
   Fills up to `capacity` bytes (NUL-terminated when it fits) and reports the full length in `length`. */
TRTSHIM_API trtshim_status trtshim_engine_describe(const trtshim_engine *engine, char *buffer, uint64_t capacity,
                                                   uint64_t *length);

/* ---------------------------------------------------------------------------------------------- */
/* Execution context                                                                               */
/* ---------------------------------------------------------------------------------------------- */

typedef struct trtshim_context trtshim_context;

TRTSHIM_API trtshim_status trtshim_context_create(trtshim_engine *engine, trtshim_context **out);
TRTSHIM_API void trtshim_context_destroy(trtshim_context *context);
/* Binds a caller-owned buffer to an input or output by name; `bytes` must equal the tensor's size. The
   buffer must stay valid until the next execute returns. */
TRTSHIM_API trtshim_status trtshim_context_set_tensor(trtshim_context *context, const char *name, void *data,
                                                      uint64_t bytes);
/* Runs the engine on the bound buffers. Fails with TRTSHIM_ERR_STATE on a stripped engine that has not been
   refitted, or while a refit of the engine is being applied. */
TRTSHIM_API trtshim_status trtshim_context_execute(trtshim_context *context);

/* ---------------------------------------------------------------------------------------------- */
/* Refitter                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

typedef struct trtshim_refitter trtshim_refitter;

/* Fails with TRTSHIM_ERR_STATE on an engine built with refittable = 0. */
TRTSHIM_API trtshim_status trtshim_refitter_create(trtshim_engine *engine, trtshim_refitter **out);
TRTSHIM_API void trtshim_refitter_destroy(trtshim_refitter *refitter);
/* Stages new values for one weight. Checks name, role, dtype and element count now (and finiteness if
   asked). The values are NOT copied: they must stay valid until apply returns or the refitter is destroyed.
   Setting the same weight again replaces the staged values. */
TRTSHIM_API trtshim_status trtshim_refitter_set_weights(trtshim_refitter *refitter, const char *name,
                                                        trtshim_role role, const trtshim_weights *weights);
/* Refuse NaN and infinite values in staged weights (off by default). */
TRTSHIM_API trtshim_status trtshim_refitter_set_check_finite(trtshim_refitter *refitter, int32_t check);
/* Weights that must still be staged before apply can succeed: all of them for a stripped engine; for a
   weight fused with others (a convolution kernel and the batch norm folded into it) whose engine keeps no
   copy of the others, the others. */
TRTSHIM_API trtshim_status trtshim_refitter_missing_count(trtshim_refitter *refitter, int32_t *count);
TRTSHIM_API trtshim_status trtshim_refitter_missing(trtshim_refitter *refitter, int32_t index, const char **name,
                                                    trtshim_role *role);
/* Validates everything staged, then re-applies the engine's own transforms (batch norm fold, GEMM
   concatenation, packing, precision conversion) and changes the engine's weights. All or nothing: on any
   failure the engine is exactly as before and the message names the weight. Staged weights are cleared
   afterwards, whether it succeeded or not. Fails with TRTSHIM_ERR_STATE while a context is executing. */
TRTSHIM_API trtshim_status trtshim_refitter_apply(trtshim_refitter *refitter);
/* Runs every check apply would run on the staged weights (missing weights, finiteness where asked),
   changes nothing and keeps the staged weights. Lets a caller validate the refits of several engines
   before applying any. apply validates again itself. */
TRTSHIM_API trtshim_status trtshim_refitter_validate(trtshim_refitter *refitter);

/* ---------------------------------------------------------------------------------------------- */
/* Files and dtype conversion (used by the safetensors reader)                                     */
/* ---------------------------------------------------------------------------------------------- */

typedef struct trtshim_mapping trtshim_mapping;

/* Memory-maps a whole file read-only. Files over 4 GiB work. */
TRTSHIM_API trtshim_status trtshim_mapping_open(const char *path, trtshim_mapping **out);
TRTSHIM_API void trtshim_mapping_close(trtshim_mapping *mapping);
TRTSHIM_API trtshim_status trtshim_mapping_data(const trtshim_mapping *mapping, const void **data, uint64_t *size);
/* Converts `count` elements to float32 (from FLOAT32, FLOAT16, BFLOAT16, FP8_E4M3, FP8_E5M2, FLOAT64, INT8,
   UINT8, INT32, INT64, BOOL). */
TRTSHIM_API trtshim_status trtshim_convert_to_f32(trtshim_dtype src_dtype, const void *src, float *dst,
                                                  uint64_t count);
/* Converts float32 to FLOAT16 or BFLOAT16 (round to nearest even) or FLOAT32 (copy). */
TRTSHIM_API trtshim_status trtshim_convert_from_f32(const float *src, trtshim_dtype dst_dtype, void *dst,
                                                    uint64_t count);

/* ---------------------------------------------------------------------------------------------- */
/* Weight streaming                                                                                */
/* ---------------------------------------------------------------------------------------------- */

/* (streaming section) */

/* An engine built with weight_streaming = 1 keeps its streamable weights (the packed kernels of its GEMMs
   and convolutions) in host storage: its own host copy, or the mapped engine file when it was loaded
   with trtshim_engine_load. A resident arena of at most the budget (in the ref backend it stands for
   device memory) holds as many of them as fit, chosen first-fit in step order; a run brings the others,
   ahead of the step that needs them, into a double-buffered window (two slots of the largest streamed
   weight) filled by a prefetching worker thread while earlier steps compute. Outputs do not depend on
   the budget. Other weights (biases, norms, constants) are always resident and outside the budget.
   The arena is filled at the first run after a budget change; a window lives from a run's start to
   the next budget change. A new or loaded engine's budget is its streamable total (nothing streamed).
   An engine built without streaming has 0 streamable bytes and refuses budget changes (ERR_STATE). */
TRTSHIM_API trtshim_status trtshim_engine_streamable_weights_size(const trtshim_engine *engine, uint64_t *bytes);
TRTSHIM_API trtshim_status trtshim_engine_weight_streaming_budget(const trtshim_engine *engine, uint64_t *bytes);
/* 0 (stream everything streamable) .. the streamable total (stream nothing). Refused with ERR_STATE
   while a context executes, a refit is applied or the engine is serialized; nothing changes then. */
TRTSHIM_API trtshim_status trtshim_engine_set_weight_streaming_budget(trtshim_engine *engine, uint64_t bytes);
/* The engine's own choice: half of the memory the system reports available (MemAvailable in
   /proc/meminfo) less the window a run would need if everything streamed, clamped to 0 .. the
   streamable total; the streamable total when the estimate cannot be read. */
TRTSHIM_API trtshim_status trtshim_engine_weight_streaming_automatic_budget(const trtshim_engine *engine,
                                                                            uint64_t *bytes);
/* Memory a run needs beyond the budget at the current budget: the window (0 when nothing is streamed). */
TRTSHIM_API trtshim_status trtshim_engine_weight_streaming_scratch_size(const trtshim_engine *engine, uint64_t *bytes);

typedef struct {
    uint64_t streamable_bytes; /* streamable weights in all */
    uint64_t budget_bytes;     /* the current budget */
    uint64_t resident_bytes;   /* streamable weights placed in the resident arena (<= budget) */
    uint64_t streamed_bytes;   /* streamable weights copied into the window on every run */
    uint64_t window_bytes;     /* one run's window (two slots) */
    uint64_t allocated_bytes;  /* arena and windows allocated now */
    uint64_t peak_bytes;       /* the most allocated_bytes has been since the budget was last set */
    uint64_t copied_bytes;     /* bytes copied into windows since the budget was last set */
    uint64_t runs;             /* runs since the budget was last set */
} trtshim_weight_streaming_stats;

/* The engine's own accounting of weight memory that stands for device memory. */
TRTSHIM_API trtshim_status trtshim_engine_weight_streaming_stats(const trtshim_engine *engine,
                                                                 trtshim_weight_streaming_stats *stats);

/* ---------------------------------------------------------------------------------------------- */
/* Quantized weights                                                                               */
/* ---------------------------------------------------------------------------------------------- */

/* (quantization section) */

/* Kernel formats of GEMM and convolution weights (trtshim_build_config's gemm_weight_format and
   conv_weight_format). The kernel widens each weight to w = q * scale in float32 and accumulates in
   float32 as the float formats do; every tactic gives the same bits.
     INT8       per output channel, symmetric: scale = max |w| / 127, q = round_even(w / scale) in [-127, 127].
     FP8_E4M3   per output channel: scale = max |w| / 448, q = w / scale rounded to nearest even in e4m3.
     INT4       per output channel and group of int4_group_size rows of K (the last group may be shorter):
                scale = max |w| over the group / 7, q = round_even(w / scale) in [-7, 7]; stored two per byte.
   A refit from float weights quantizes them into the engine's own buffers (same addresses) with the
   transform a build uses, after folding any batch norm, so refit == rebuild bit for bit. Non-finite
   values are refused (TRTSHIM_ERR_VALIDATION, nothing changed). */
typedef enum {
    TRTSHIM_WEIGHT_FORMAT_AS_PRECISION = 0, /* float32, float16 or bfloat16 as weight_precision says */
    TRTSHIM_WEIGHT_FORMAT_INT8 = 1,
    TRTSHIM_WEIGHT_FORMAT_FP8_E4M3 = 2,
    TRTSHIM_WEIGHT_FORMAT_INT4 = 3
} trtshim_weight_format;

/* The kernel format of refittable weight `index` (as trtshim_engine_weight counts them): a quantized
   format for the kernel of a quantized GEMM or convolution, AS_PRECISION for every other weight.
   group_size: the int4 group size, 0 otherwise. */
TRTSHIM_API trtshim_status trtshim_engine_weight_format(const trtshim_engine *engine, int32_t index,
                                                        trtshim_weight_format *format, int32_t *group_size);

/* Stages an already-quantized kernel (a compressed-tensors / vLLM checkpoint: weight + weight_scale),
   packed later by apply without re-quantizing. The weight must be held in a quantized format; the
   values must match it:
     INT8       values INT8, one per element, in the weight's declared layout (a fully connected or
                convolution kernel: [out, in...]; a constant matrix-multiply operand: as declared).
     FP8_E4M3   values FP8_E4M3 codes, likewise (0x7f and 0xff, NaN, are refused).
     INT4       values UINT8, two per byte along K (the input dimension): byte (j, k / 2) holds element
                (j, k) in its low nibble for even k, its high nibble for odd k, each nibble q + 8
                (offset binary, as compressed-tensors packs); rows of odd K end with a zero high nibble.
   scales: FLOAT32, >= 0 and finite, one per output channel, for INT4 [out, groups] (for a constant
   operand declared [K, N]: [groups, N]); group_size: the checkpoint's int4 group size (0 otherwise),
   which must equal the engine's. zero_points: NULL, or INT8 / INT32 with one per scale; asymmetric
   weights are not supported by the quantized kernels, so any non-zero zero point is refused with
   TRTSHIM_ERR_UNSUPPORTED (a float engine takes such a checkpoint dequantized instead). Refused with
   TRTSHIM_ERR_UNSUPPORTED too: a weight whose engine keeps it in another form as well (a batch-norm-
   folded convolution kernel, a constant also read as a tensor). Every mismatch names the weight. As for
   set_weights, nothing is copied: values and scales must stay valid until apply returns. Setting a
   weight again (either way) replaces what was staged. */
TRTSHIM_API trtshim_status trtshim_refitter_set_quantized_weights(trtshim_refitter *refitter, const char *name,
                                                                  trtshim_role role, int32_t group_size,
                                                                  const trtshim_weights *values,
                                                                  const trtshim_weights *scales,
                                                                  const trtshim_weights *zero_points);

/* ---------------------------------------------------------------------------------------------- */
/* Weight transforms (checkpoint tensors -> network weights, for the refit effect layer)           */
/* ---------------------------------------------------------------------------------------------- */

/* (transforms section) */

/* Kernels the refit effect layer runs to turn checkpoint tensors into network weights, one call per tensor.
   float32 in and out, row-major. Every result is bit-identical to the TypeScript reference
   (src/weightmap/evaluate.ts, src/lora/lora.ts) for any thread count; NaN payloads may differ.
   num_threads: 0 one per core, 1 the calling thread only. */

/* dst = src with its dimensions permuted: output dimension i is input dimension perm[i]. dims are the
   input's (rank 0 .. TRTSHIM_MAX_RANK). src and dst must not overlap. */
TRTSHIM_API trtshim_status trtshim_transform_permute(const float *src, int32_t rank, const int64_t *dims,
                                                     const int32_t *perm, float *dst, int32_t num_threads);
/* Rounds `count` values to `to` (FLOAT16 or BFLOAT16, round to nearest even, overflow to infinity; FLOAT32
   copies) and widens them back to float32, as a cast there and back would. dst may equal src. */
TRTSHIM_API trtshim_status trtshim_transform_cast_round(const float *src, trtshim_dtype to, float *dst,
                                                        uint64_t count, int32_t num_threads);
/* A BatchNorm folded into the preceding weight, per output channel (axis 0), every step in float32:
     scale[c] = gamma[c] / sqrt(variance[c] + (float)epsilon)
     dst[c * inner + i] = weight[c * inner + i] * scale[c]
   `inner` is the number of elements per channel. dst may equal weight. */
TRTSHIM_API trtshim_status trtshim_transform_bn_fold_weight(const float *weight, int64_t channels, int64_t inner,
                                                            const float *gamma, const float *variance,
                                                            double epsilon, float *dst, int32_t num_threads);
/* dst[c] = ((bias[c] - mean[c]) * scale[c]) + beta[c], each step in float32, scale as above; a null bias is
   0 (a convolution without bias). */
TRTSHIM_API trtshim_status trtshim_transform_bn_fold_bias(const float *bias, const float *gamma, const float *beta,
                                                          const float *mean, const float *variance, int64_t channels,
                                                          double epsilon, float *dst);
/* Adds a LoRA delta to a weight in place: delta = scale * (up @ down), up [out_features, rank] and down
   [rank, in_features] (in_features counts every element of a row: in * kh * kw for a convolution).
   Each delta element sums its rank products in float64, in increasing rank order, skipping zero entries
   of up, and is multiplied by scale (float64) and rounded to float32 once; the weight then gets
   weight + delta in float32. fan_in_fan_out = 0: weight is [out_features, in_features]; 1: weight is
   [in_features, out_features] (GPT-2's Conv1D) and takes the delta transposed. */
TRTSHIM_API trtshim_status trtshim_transform_lora_add(float *weight, int64_t out_features, int64_t in_features,
                                                      int32_t fan_in_fan_out, const float *up, const float *down,
                                                      int64_t rank, double scale, int32_t num_threads);

/* ---------------------------------------------------------------------------------------------- */
/* Content digests and read-ahead (for refit plans over mapped checkpoints)                         */
/* ---------------------------------------------------------------------------------------------- */

/* (digest section) */

/* A 128-bit content digest of `size` bytes (digest[0], digest[1]) and, in the same pass, the number of
   NaN and infinite elements when dtype is FLOAT32, FLOAT16, BFLOAT16 or FLOAT64 (size must then be a
   whole number of elements; other dtypes count none). Not cryptographic: it tells changed tensors from
   unchanged ones, it does not resist a crafted collision. The result is independent of num_threads
   (0: one per core). digest or nonfinite may be null to skip that half. */
TRTSHIM_API trtshim_status trtshim_digest(const void *data, uint64_t size, trtshim_dtype dtype, int32_t num_threads,
                                          uint64_t *digest, uint64_t *nonfinite);
/* The identity of a mapped file as it was when mapped (fstat): identity[0..4] = device, inode, size,
   modification time and status-change time in nanoseconds. A key for caches of digests. */
TRTSHIM_API trtshim_status trtshim_mapping_identity(const trtshim_mapping *mapping, uint64_t *identity);
typedef enum {
    TRTSHIM_ADVISE_WILLNEED = 0,   /* start reading the range into the page cache */
    TRTSHIM_ADVISE_SEQUENTIAL = 1, /* the range will be read once, in order */
    TRTSHIM_ADVISE_POPULATE = 2    /* map the range's pages now (one call instead of a page fault per few pages) */
} trtshim_advice;
/* Advice on a range of a mapping about to be read; changes nothing any reader sees. */
TRTSHIM_API trtshim_status trtshim_mapping_advise(const trtshim_mapping *mapping, uint64_t offset, uint64_t length,
                                                  int32_t advice);

/* ---------------------------------------------------------------------------------------------- */
/* Read-back verification                                                                          */
/* ---------------------------------------------------------------------------------------------- */

/* (readback section) */

/* Digests of the network-level values the engine's kernels hold, one per refittable weight, so a caller
   can check a compile, a refit or a cache hit against the digests it expects before it reports success.
   digests gets 2 * num_weights values (trtshim_engine_info), weight i at digests[2 * i], in the order of
   trtshim_engine_weight. Each is trtshim_digest (dtype UINT8) of:
     - a float weight: its values as float32, in the layout the network declared, as the kernels hold
       them. A GEMM or convolution kernel is read back from its packed buffer: in a float16 or bfloat16
       engine the rounded values widened to float32, in an int8, fp8 or int4 kernel the dequantized
       values q * scale. Biases fused into a GEMM or convolution, norms and constants are held in float32
       and read back as they are. A constant packed as a GEMM operand and also read as a tensor reports
       its packed values, after checking that packing its float32 copy gives them.
     - the members of a batch norm folded into a convolution (kernel, bias, scale, shift, mean, variance):
       the kernels hold only the fold, so the fold is run again from the engine's float32 copies of the
       members and compared with the packed kernel and bias the convolution reads; on a difference the call
       fails with TRTSHIM_ERR_VALIDATION naming the layers, else each member reports its copy.
     - an integer constant: its raw bytes.
   Buffers are read where a run reads them (a streaming engine's resident arena once a run has filled it,
   else host storage: its own copy or the mapped engine file). The engine is held for reading meanwhile,
   so a refit apply is refused (TRTSHIM_ERR_STATE) until the call returns, and the call is refused while
   one is applied. A weight that cannot be read back fails the call, naming it, and nothing is written to
   digests: TRTSHIM_ERR_STATE for a stripped engine not yet filled by a refit, or for a batch norm fold
   whose float32 copies the engine does not hold (an engine file saved without them);
   TRTSHIM_ERR_UNSUPPORTED for a weight no kernel reads, or one quantized by two GEMMs in different
   layouts. A non-refittable engine has no weights to report (success, nothing written). num_threads: 0
   the engine's own thread count. */
TRTSHIM_API trtshim_status trtshim_engine_weight_digests(const trtshim_engine *engine, uint64_t *digests,
                                                         int32_t num_threads);
/* The same for the weights whose flag in `select` (one uint8_t per weight, in trtshim_engine_weight order) is
   non-zero: a refit that changed a few weights reads back only those. Entries of other weights are left as
   they were. A selected member of a batch norm fold has the whole fold checked. */
TRTSHIM_API trtshim_status trtshim_engine_weight_digests_selected(const trtshim_engine *engine, const uint8_t *select,
                                                                  uint64_t *digests, int32_t num_threads);
/* How refittable weight `index` is held, which decides the digest trtshim_engine_weight_digests reports
   for given network-level values. packed = 1: read back from a packed GEMM or convolution operand, so its
   values are rounded to the engine's precision, or quantized and dequantized in the format
   trtshim_engine_weight_format gives, with one scale per channel (int4: per channel and group of depth);
   the weight is then `channels` x `depth`, declared [channels, depth] when transposed = 1 (a fully
   connected or convolution kernel, a transposed constant operand), else [depth, channels]. packed = 0:
   held as given (float32, or an integer constant's bytes), batch norm fold members included; the other
   outputs are then 0. Any output may be null. Works on a stripped engine too. */
TRTSHIM_API trtshim_status trtshim_engine_weight_held(const trtshim_engine *engine, int32_t index, int32_t *packed,
                                                      int32_t *transposed, int64_t *channels, int64_t *depth);

#ifdef __cplusplus
}
#endif

#endif /* TRTSHIM_H */
