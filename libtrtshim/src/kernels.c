/* kernels.c: dtype conversion of network weights and the kernels of layers that are not GEMMs. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "kernels.h"
#include "ops.h"

void *aligned_zalloc(uint64_t bytes) {
    uint64_t rounded = (bytes + 63) / 64 * 64;
    if (rounded == 0) rounded = 64;
    void *p = aligned_alloc(64, (size_t)rounded);
    if (p) memset(p, 0, (size_t)rounded);
    return p;
}

static float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void weights_to_f32(trtshim_dtype dtype, const void *src, float *dst, int64_t count) {
    switch (dtype) {
    case TRTSHIM_FLOAT32: memcpy(dst, src, sizeof(float) * (size_t)count); return;
    case TRTSHIM_FLOAT16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < count; i++) dst[i] = half_to_f32(h[i]);
        return;
    }
    case TRTSHIM_BFLOAT16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < count; i++) {
            uint32_t bits = (uint32_t)h[i] << 16;
            memcpy(&dst[i], &bits, 4);
        }
        return;
    }
    default: return; /* integers are never converted */
    }
}

int weights_all_finite(trtshim_dtype dtype, const void *src, int64_t count) {
    switch (dtype) {
    case TRTSHIM_FLOAT32: {
        const uint32_t *u = src;
        for (int64_t i = 0; i < count; i++)
            if ((u[i] & 0x7f800000u) == 0x7f800000u) return 0;
        return 1;
    }
    case TRTSHIM_FLOAT16: {
        const uint16_t *u = src;
        for (int64_t i = 0; i < count; i++)
            if ((u[i] & 0x7c00u) == 0x7c00u) return 0;
        return 1;
    }
    case TRTSHIM_BFLOAT16: {
        const uint16_t *u = src;
        for (int64_t i = 0; i < count; i++)
            if ((u[i] & 0x7f80u) == 0x7f80u) return 0;
        return 1;
    }
    default: return 1;
    }
}

/* ---- shape helpers -------------------------------------------------------------------------- */

static void contiguous_strides(const tensor_desc *d, int64_t *strides) {
    int64_t s = 1;
    for (int32_t i = d->rank - 1; i >= 0; i--) {
        strides[i] = s;
        s *= d->dims[i];
    }
}

/* Strides of `d` seen as a tensor of rank `rank` broadcast to out: 0 along broadcast dimensions. */
static void broadcast_strides(const tensor_desc *d, int32_t rank, int64_t *strides) {
    int64_t own[MAX_RANK];
    contiguous_strides(d, own);
    for (int32_t i = 0; i < rank; i++) {
        int32_t j = i - (rank - d->rank);
        strides[i] = (j < 0 || d->dims[j] == 1) ? 0 : own[j];
    }
}

/* Copies out[i...] = in[base + sum idx[d] * in_strides[d]] over the dims of out. */
static void strided_gather(float *out, const float *in, int32_t rank, const int64_t *dims, const int64_t *in_strides,
                           int64_t base) {
    int64_t total = shape_volume(rank, dims);
    if (total <= 0) return;
    if (rank == 0) {
        out[0] = in[base];
        return;
    }
    int64_t idx[MAX_RANK] = {0};
    int64_t inner = dims[rank - 1], inner_stride = in_strides[rank - 1];
    int64_t off = base;
    for (int64_t o = 0; o < total; o += inner) {
        const float *src = in + off;
        if (inner_stride == 1) memcpy(out + o, src, sizeof(float) * (size_t)inner);
        else
            for (int64_t i = 0; i < inner; i++) out[o + i] = src[i * inner_stride];
        for (int32_t d = rank - 2; d >= 0; d--) {
            idx[d]++;
            off += in_strides[d];
            if (idx[d] < dims[d]) break;
            off -= idx[d] * in_strides[d];
            idx[d] = 0;
        }
    }
}

/* ---- kernels -------------------------------------------------------------------------------- */

void k_elementwise(trtshim_elementwise_op op, const tensor_desc *da, const float *a, const tensor_desc *db,
                   const float *b, const tensor_desc *dout, float *out) {
    int64_t total = shape_volume(dout->rank, dout->dims);
    int64_t va = shape_volume(da->rank, da->dims), vb = shape_volume(db->rank, db->dims);
    if (total <= 0) return;
    if (va == total && vb == total) {
        for (int64_t i = 0; i < total; i++) out[i] = elementwise_apply(op, a[i], b[i]);
        return;
    }
    if (va == total && vb == 1) {
        for (int64_t i = 0; i < total; i++) out[i] = elementwise_apply(op, a[i], b[0]);
        return;
    }
    int32_t r = dout->rank;
    int64_t sa[MAX_RANK], sb[MAX_RANK], idx[MAX_RANK] = {0};
    broadcast_strides(da, r, sa);
    broadcast_strides(db, r, sb);
    if (r == 0) {
        out[0] = elementwise_apply(op, a[0], b[0]);
        return;
    }
    int64_t inner = dout->dims[r - 1], ia = sa[r - 1], ib = sb[r - 1], oa = 0, ob = 0;
    for (int64_t o = 0; o < total; o += inner) {
        for (int64_t i = 0; i < inner; i++) out[o + i] = elementwise_apply(op, a[oa + i * ia], b[ob + i * ib]);
        for (int32_t d = r - 2; d >= 0; d--) {
            idx[d]++;
            oa += sa[d];
            ob += sb[d];
            if (idx[d] < dout->dims[d]) break;
            oa -= idx[d] * sa[d];
            ob -= idx[d] * sb[d];
            idx[d] = 0;
        }
    }
}

static void split_axis(const tensor_desc *d, int32_t axis, int64_t *outer, int64_t *len, int64_t *inner) {
    *outer = 1;
    *inner = 1;
    for (int32_t i = 0; i < axis; i++) *outer *= d->dims[i];
    for (int32_t i = axis + 1; i < d->rank; i++) *inner *= d->dims[i];
    *len = d->dims[axis];
}

void k_softmax(const tensor_desc *d, int32_t axis, const float *x, float *y) {
    int64_t outer, len, inner;
    split_axis(d, axis, &outer, &len, &inner);
    for (int64_t o = 0; o < outer; o++)
        for (int64_t in = 0; in < inner; in++) {
            const float *xs = x + o * len * inner + in;
            float *ys = y + o * len * inner + in;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t i = 0; i < len; i++) mx = fmaxf(mx, xs[i * inner]);
            for (int64_t i = 0; i < len; i++) {
                ys[i * inner] = expf(xs[i * inner] - mx);
                sum += ys[i * inner];
            }
            for (int64_t i = 0; i < len; i++) ys[i * inner] /= sum;
        }
}

void k_layer_norm(const tensor_desc *d, int32_t axis, float eps, const float *scale, const float *shift, const float *x,
                  float *y) {
    int64_t outer = 1, n = 1;
    for (int32_t i = 0; i < axis; i++) outer *= d->dims[i];
    for (int32_t i = axis; i < d->rank; i++) n *= d->dims[i];
    for (int64_t o = 0; o < outer; o++) {
        const float *xs = x + o * n;
        float *ys = y + o * n;
        double sum = 0, sq = 0;
        for (int64_t i = 0; i < n; i++) sum += xs[i];
        float mean = (float)(sum / (double)n);
        for (int64_t i = 0; i < n; i++) sq += (double)(xs[i] - mean) * (double)(xs[i] - mean);
        float inv = 1.0f / sqrtf((float)(sq / (double)n) + eps);
        for (int64_t i = 0; i < n; i++)
            ys[i] = (xs[i] - mean) * inv * (scale ? scale[i] : 1.0f) + (shift ? shift[i] : 0.0f);
    }
}

void k_rms_norm(const tensor_desc *d, float eps, const float *scale, const float *x, float *y) {
    int64_t n = d->dims[d->rank - 1], outer = n ? shape_volume(d->rank, d->dims) / n : 0;
    for (int64_t o = 0; o < outer; o++) {
        const float *xs = x + o * n;
        float *ys = y + o * n;
        double sq = 0;
        for (int64_t i = 0; i < n; i++) sq += (double)xs[i] * (double)xs[i];
        float inv = 1.0f / sqrtf((float)(sq / (double)n) + eps);
        for (int64_t i = 0; i < n; i++) ys[i] = xs[i] * inv * (scale ? scale[i] : 1.0f);
    }
}

void k_batch_norm(const tensor_desc *d, float eps, const float *scale, const float *shift, const float *mean,
                  const float *var, const float *x, float *y) {
    int64_t outer, c, inner;
    split_axis(d, 1, &outer, &c, &inner);
    for (int64_t o = 0; o < outer; o++)
        for (int64_t ch = 0; ch < c; ch++) {
            float f = scale[ch] / sqrtf(var[ch] + eps), m = mean[ch], sh = shift[ch];
            const float *xs = x + (o * c + ch) * inner;
            float *ys = y + (o * c + ch) * inner;
            for (int64_t i = 0; i < inner; i++) ys[i] = (xs[i] - m) * f + sh;
        }
}

void k_reduce(const tensor_desc *d, trtshim_reduce_op op, uint32_t mask, const float *x, float *y, int64_t out_count) {
    int64_t ostride[MAX_RANK], s = 1, reduced = 1;
    for (int32_t i = d->rank - 1; i >= 0; i--) {
        if (mask & (1u << i)) {
            ostride[i] = 0;
            reduced *= d->dims[i];
        } else {
            ostride[i] = s;
            s *= d->dims[i];
        }
    }
    for (int64_t i = 0; i < out_count; i++) y[i] = op == TRTSHIM_REDUCE_MAX ? -INFINITY : 0.0f;
    int64_t total = shape_volume(d->rank, d->dims), idx[MAX_RANK] = {0}, off = 0;
    for (int64_t i = 0; i < total; i++) {
        if (op == TRTSHIM_REDUCE_MAX) y[off] = fmaxf(y[off], x[i]);
        else y[off] += x[i];
        for (int32_t k = d->rank - 1; k >= 0; k--) {
            idx[k]++;
            off += ostride[k];
            if (idx[k] < d->dims[k]) break;
            off -= idx[k] * ostride[k];
            idx[k] = 0;
        }
    }
    if (op == TRTSHIM_REDUCE_MEAN)
        for (int64_t i = 0; i < out_count; i++) y[i] /= (float)reduced;
}

void k_pooling(const tensor_desc *d, const tensor_desc *od, trtshim_pool_op op, const int64_t *pp, const float *x,
               float *y) {
    int64_t nc = d->dims[0] * d->dims[1], H = d->dims[2], W = d->dims[3], OH = od->dims[2], OW = od->dims[3];
    if (op == TRTSHIM_POOL_GLOBAL_AVERAGE) {
        for (int64_t i = 0; i < nc; i++) {
            double sum = 0;
            for (int64_t j = 0; j < H * W; j++) sum += x[i * H * W + j];
            y[i] = (float)(sum / (double)(H * W));
        }
        return;
    }
    int64_t kh = pp[0], kw = pp[1], sh = pp[2], sw = pp[3], pt = pp[4], pl = pp[5], include_pad = pp[8];
    for (int64_t i = 0; i < nc; i++) {
        const float *xs = x + i * H * W;
        for (int64_t oh = 0; oh < OH; oh++)
            for (int64_t ow = 0; ow < OW; ow++) {
                float acc = op == TRTSHIM_POOL_MAX ? -INFINITY : 0.0f;
                int64_t count = 0;
                for (int64_t a = 0; a < kh; a++) {
                    int64_t h = oh * sh - pt + a;
                    if (h < 0 || h >= H) continue;
                    for (int64_t b = 0; b < kw; b++) {
                        int64_t w = ow * sw - pl + b;
                        if (w < 0 || w >= W) continue;
                        float v = xs[h * W + w];
                        if (op == TRTSHIM_POOL_MAX) acc = fmaxf(acc, v);
                        else acc += v;
                        count++;
                    }
                }
                if (op == TRTSHIM_POOL_AVERAGE) acc /= (float)(include_pad ? kh * kw : (count ? count : 1));
                y[(i * OH + oh) * OW + ow] = acc;
            }
    }
}

void k_transpose(const tensor_desc *d, const int64_t *perm, const float *x, const tensor_desc *od, float *y) {
    int64_t in_strides[MAX_RANK], strides[MAX_RANK];
    contiguous_strides(d, in_strides);
    for (int32_t i = 0; i < d->rank; i++) strides[i] = in_strides[perm[i]];
    strided_gather(y, x, od->rank, od->dims, strides, 0);
}

void k_slice(const tensor_desc *d, const int64_t *start, const int64_t *stride, const float *x, const tensor_desc *od,
             float *y) {
    int64_t in_strides[MAX_RANK], strides[MAX_RANK], base = 0;
    contiguous_strides(d, in_strides);
    for (int32_t i = 0; i < d->rank; i++) {
        strides[i] = in_strides[i] * stride[i];
        base += start[i] * in_strides[i];
    }
    strided_gather(y, x, od->rank, od->dims, strides, base);
}

void k_concat(const tensor_desc *const *ds, const float *const *xs, int32_t count, int32_t axis, const tensor_desc *od,
              float *y) {
    int64_t outer, len, inner;
    split_axis(od, axis, &outer, &len, &inner);
    int64_t row = len * inner, col = 0;
    for (int32_t k = 0; k < count; k++) {
        int64_t chunk = ds[k]->dims[axis] * inner;
        for (int64_t o = 0; o < outer; o++) memcpy(y + o * row + col, xs[k] + o * chunk, sizeof(float) * (size_t)chunk);
        col += chunk;
    }
}

int k_gather(const tensor_desc *d, int32_t axis, const void *indices, trtshim_dtype idx_dtype, int64_t n_idx,
             const float *x, float *y, int64_t *bad_index) {
    int64_t outer, len, inner;
    split_axis(d, axis, &outer, &len, &inner);
    for (int64_t j = 0; j < n_idx; j++) {
        int64_t v = idx_dtype == TRTSHIM_INT32 ? ((const int32_t *)indices)[j] : ((const int64_t *)indices)[j];
        if (v < -len || v >= len) {
            *bad_index = v;
            return 0;
        }
    }
    for (int64_t o = 0; o < outer; o++)
        for (int64_t j = 0; j < n_idx; j++) {
            int64_t v = idx_dtype == TRTSHIM_INT32 ? ((const int32_t *)indices)[j] : ((const int64_t *)indices)[j];
            if (v < 0) v += len;
            memcpy(y + (o * n_idx + j) * inner, x + (o * len + v) * inner, sizeof(float) * (size_t)inner);
        }
    return 1;
}

/* im2col for one image and group: A[m][k], m = oh * OW + ow, k = (c * kh + i) * kw + j. */
void k_im2col(const float *x, int64_t C, int64_t H, int64_t W, const int64_t *cp, int64_t oh_begin, int64_t oh_end,
              int64_t OW, float *col) {
    int64_t kh = cp[1], kw = cp[2], sh = cp[3], sw = cp[4], pt = cp[5], pl = cp[6], dh = cp[9], dw = cp[10];
    int64_t K = C * kh * kw;
    for (int64_t oh = oh_begin; oh < oh_end; oh++)
        for (int64_t ow = 0; ow < OW; ow++) {
            float *row = col + (oh * OW + ow) * K;
            for (int64_t c = 0; c < C; c++)
                for (int64_t i = 0; i < kh; i++) {
                    int64_t h = oh * sh - pt + i * dh;
                    for (int64_t j = 0; j < kw; j++) {
                        int64_t w = ow * sw - pl + j * dw;
                        row[(c * kh + i) * kw + j] = (h >= 0 && h < H && w >= 0 && w < W) ? x[(c * H + h) * W + w] : 0.0f;
                    }
                }
        }
}
