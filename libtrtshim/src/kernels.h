/* kernels.h: kernels of the layers that are not GEMMs (kernels.c), called by context.c. */
#ifndef TRTSHIM_KERNELS_H
#define TRTSHIM_KERNELS_H

#include "engine.h"

void k_elementwise(trtshim_elementwise_op op, const tensor_desc *da, const float *a, const tensor_desc *db,
                   const float *b, const tensor_desc *dout, float *out);
void k_softmax(const tensor_desc *d, int32_t axis, const float *x, float *y);
void k_layer_norm(const tensor_desc *d, int32_t axis, float eps, const float *scale, const float *shift, const float *x,
                  float *y);
void k_rms_norm(const tensor_desc *d, float eps, const float *scale, const float *x, float *y);
void k_batch_norm(const tensor_desc *d, float eps, const float *scale, const float *shift, const float *mean,
                  const float *var, const float *x, float *y);
void k_reduce(const tensor_desc *d, trtshim_reduce_op op, uint32_t mask, const float *x, float *y, int64_t out_count);
/* pp: the 9 pooling parameters (unused for global average). */
void k_pooling(const tensor_desc *d, const tensor_desc *od, trtshim_pool_op op, const int64_t *pp, const float *x,
               float *y);
void k_transpose(const tensor_desc *d, const int64_t *perm, const float *x, const tensor_desc *od, float *y);
void k_slice(const tensor_desc *d, const int64_t *start, const int64_t *stride, const float *x, const tensor_desc *od,
             float *y);
void k_concat(const tensor_desc *const *ds, const float *const *xs, int32_t count, int32_t axis, const tensor_desc *od,
              float *y);
/* Returns 0 (and the index) when an index is out of range; nothing is written then. */
int k_gather(const tensor_desc *d, int32_t axis, const void *indices, trtshim_dtype idx_dtype, int64_t n_idx,
             const float *x, float *y, int64_t *bad_index);
/* cp: the 12 convolution parameters; x is one group's channels of one image; fills the rows of output
   rows [oh_begin, oh_end). */
void k_im2col(const float *x, int64_t C, int64_t H, int64_t W, const int64_t *cp, int64_t oh_begin, int64_t oh_end,
              int64_t OW, float *col);

#endif
