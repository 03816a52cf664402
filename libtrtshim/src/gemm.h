/* gemm.h: packed-weight GEMM with fused bias and activation, and the tactics the builder times.
 *
 *   C[M,N] = act(A[M,K] . B[K,N] + bias[N])
 *
 * A and C are float32 activations; B is a weight packed once (at build and at refit) into the layout of
 * the chosen tactic, stored in the engine's weight precision (float32, float16 or bfloat16) and widened to
 * float32 inside the kernel.
 *
 * Numerics: every tactic gives bit-identical results for the same inputs. Each output element accumulates
 * its K products in increasing k order with fused multiply-add, starting from 0, and adds the bias and
 * applies the activation afterwards; tactics differ only in blocking, vector width and threading. So a
 * tactic chosen by timing never changes an output, and a refit equals a rebuild bit for bit.
 */
#ifndef TRTSHIM_GEMM_H
#define TRTSHIM_GEMM_H

#include <stddef.h>
#include <stdint.h>
#include "trtshim.h"

/* Number of tactics compiled in; ids are 0 .. count-1. Tactic 0 is always supported everywhere. */
int gemm_tactic_count(void);
const char *gemm_tactic_name(int tactic);
/* 1 when this CPU can run the tactic (instruction-set checks). */
int gemm_tactic_supported(int tactic);

/* Bytes of the packed form of a K x N weight for a tactic, in weight_dtype (FLOAT32, FLOAT16, BFLOAT16). */
size_t gemm_packed_bytes(int tactic, int64_t K, int64_t N, trtshim_dtype weight_dtype);
/* Packs columns [n_begin, n_begin + n_count) of B into a packed buffer holding all N columns; the other
   columns are left as they are. Packing every column range once gives the same bytes as packing all N at
   once. This is what lets a refit repack one member of a concatenated GEMM (q, k and v side by side)
   without touching the others. b holds only the given columns: b_transposed = 0: b is row-major
   [K, n_count] with row stride ldb; 1: b is row-major [n_count, K] (a torch Linear weight) with row stride
   ldb. Values are rounded to weight_dtype (round to nearest even). */
void gemm_pack_columns(int tactic, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                       int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed);
/* The same, with the columns split over up to num_threads threads (parallel_for); writes exactly the bytes
   gemm_pack_columns writes. num_threads <= 1 runs on the calling thread. */
void gemm_pack_columns_mt(int tactic, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                          int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed, int num_threads);

/* Packing implementations, for tests and benchmarks: every supported path writes the same bytes as the
   scalar one (which converts with hand-written code), and gemm_pack_columns uses the fastest supported.
   An unsupported path (or GEMM_PACK_AUTO) runs as the fastest supported. */
enum { GEMM_PACK_AUTO = -1, GEMM_PACK_SCALAR = 0, GEMM_PACK_AVX2 = 1, GEMM_PACK_AVX512 = 2, GEMM_PACK_PATH_COUNT = 3 };
const char *gemm_pack_path_name(int path);
int gemm_pack_path_supported(int path);
void gemm_pack_columns_path(int path, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                            int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed);

/* act is a trtshim_unary_op applied elementwise after the bias (TRTSHIM_UNARY_IDENTITY for none); bias may
   be null. lda and ldc are row strides in elements. num_threads <= 1 runs on the calling thread. */
void gemm_run(int tactic, int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, const void *packed,
              trtshim_dtype weight_dtype, const float *bias, trtshim_unary_op act, float *c, int64_t ldc,
              int num_threads);

/* Plain GEMM between two activations (attention scores, batched matmul of non-constant operands), with
   the same accumulation order: C[M,N] = op(A) . op(B), row-major, op = transpose when the flag is set. */
void matmul_f32(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, int transpose_a, const float *b,
                int64_t ldb, int transpose_b, float *c, int64_t ldc, int num_threads);

/* ---- quantized weights (issue 8) ---------------------------------------------------------------------
 * A quantized weight keeps the panel layout (32 columns, K rows each) with narrow values, followed by its
 * float32 scales, all in one buffer of gemm_quant_packed_bytes:
 *   INT8      q in [-128, 127], w = q * scale[n]. From float32: scale[n] = max_k |w[k, n]| / 127 and
 *             q = w / scale rounded to nearest even (0 where the scale is 0).
 *   FP8_E4M3  q an e4m3 code (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities; 0x7f and
 *             0xff are NaN and refused), w = e4m3(q) * scale[n]. From float32: scale[n] = max_k |w| / 448,
 *             q = w / scale rounded to nearest even in e4m3, saturated at +-448.
 *   INT4      q in [-8, 7], w = q * scale[g, n] for the group g = k / group_size along K (group_size 32, 64
 *             or 128; the last group may be shorter). From float32: scale = max |w| over the group / 7,
 *             q = w / scale rounded to nearest even. Two values to a byte in the packed form.
 * Numerics: the run widens each weight to w = (float)q * scale (one float32 multiply), then follows the
 * contract of gemm_run (fma in increasing k order from 0, then bias, then activation). So every tactic and
 * thread count gives the same bits, and packing from float32 gives the bytes of packing the values and
 * scales that gemm_quant_quantize returns for it. */
typedef enum { GEMM_QUANT_INT8 = 1, GEMM_QUANT_FP8_E4M3 = 2, GEMM_QUANT_INT4 = 3 } gemm_quant_kind;
typedef struct {
    gemm_quant_kind kind;
    int32_t group_size; /* INT4: 32, 64 or 128 rows of K per scale; ignored otherwise */
} gemm_quant_format;

int gemm_quant_format_valid(gemm_quant_format format);
/* Scales per column: 1, or for INT4 ceil(K / group_size). */
int64_t gemm_quant_groups(gemm_quant_format format, int64_t K);
/* Bytes of the packed form (values, then scales at a 64-byte offset); 0 for an invalid format. */
size_t gemm_quant_packed_bytes(gemm_quant_format format, int64_t K, int64_t N);

/* Quantizes a float32 weight without packing it. b and ldb as for gemm_pack_columns (n_count columns);
   q gets one byte per value (int8_t for INT8 and INT4, the e4m3 code for FP8) in b's layout with row
   stride ldq; scales gets n_count floats, for INT4 n_count x groups: [n_count, groups] when b_transposed
   (the shape of a torch weight_scale beside an [N, K] weight), [groups, n_count] otherwise. Every value
   must be finite: TRTSHIM_ERR_VALIDATION names the first that is not (nothing is then written). */
trtshim_status gemm_quant_quantize(gemm_quant_format format, const float *b, int b_transposed, int64_t ldb, int64_t K,
                                   int64_t n_count, void *q, int64_t ldq, float *scales);
/* Quantizes columns [n_begin, n_begin + n_count) of a float32 weight straight into the packed buffer (no
   copy of the weight is made), with the guarantees of gemm_pack_columns: range by range gives the bytes of
   the whole, and the call that packs the last column zeroes the padding. Checks that every value is finite
   before it writes anything. */
trtshim_status gemm_quant_pack_columns(gemm_quant_format format, const float *b, int b_transposed, int64_t ldb,
                                       int64_t K, int64_t N, int64_t n_begin, int64_t n_count, void *packed);
/* The same from values and scales already quantized (a quantized checkpoint), in gemm_quant_quantize's
   layouts: copied without re-quantizing, after checking every value's range and that every scale is finite
   and >= 0 (TRTSHIM_ERR_VALIDATION names the first bad one; nothing is then written). */
trtshim_status gemm_quant_pack_quantized(gemm_quant_format format, const void *q, const float *scales, int b_transposed,
                                         int64_t ldq, int64_t K, int64_t N, int64_t n_begin, int64_t n_count,
                                         void *packed);
/* The widened weight w[k, n] the run multiplies by. */
float gemm_quant_weight(gemm_quant_format format, const void *packed, int64_t K, int64_t N, int64_t k, int64_t n);
/* gemm_run for a quantized packed weight. */
void gemm_quant_run(int tactic, gemm_quant_format format, int64_t M, int64_t N, int64_t K, const float *a,
                    int64_t lda, const void *packed, const float *bias, trtshim_unary_op act, float *c, int64_t ldc,
                    int num_threads);

#endif
