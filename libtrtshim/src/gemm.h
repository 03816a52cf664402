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

/* act is a trtshim_unary_op applied elementwise after the bias (TRTSHIM_UNARY_IDENTITY for none); bias may
   be null. lda and ldc are row strides in elements. num_threads <= 1 runs on the calling thread. */
void gemm_run(int tactic, int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, const void *packed,
              trtshim_dtype weight_dtype, const float *bias, trtshim_unary_op act, float *c, int64_t ldc,
              int num_threads);

/* Plain GEMM between two activations (attention scores, batched matmul of non-constant operands), with
   the same accumulation order: C[M,N] = op(A) . op(B), row-major, op = transpose when the flag is set. */
void matmul_f32(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, int transpose_a, const float *b,
                int64_t ldb, int transpose_b, float *c, int64_t ldc, int num_threads);

#endif
