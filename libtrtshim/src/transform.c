/* transform.c: weight-transform kernels of the refit effect layer (checkpoint tensors -> network weights).
 *
 * Each result must equal the TypeScript reference (src/weightmap/evaluate.ts, src/lora/lora.ts) bit for
 * bit, so the arithmetic here is written step by step in the reference's order and precision. That needs
 * the compiler to keep a * b + c as two rounded operations: -std=c11 makes GCC keep floating-point
 * contraction off, and the pragma below asks clang for the same.
 *
 * Threading never changes a result: work is split by output element, and every element is computed by
 * one thread in a fixed order.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "threadpool.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_TRANSFORM_PORTABLE)
#include <immintrin.h>
#define TRANSFORM_X86 1
#endif

/* Tests set this to 0 to run the portable paths on a CPU that has the vector ones. */
int transform_use_simd = 1;

static int resolve_threads(int32_t num_threads) { return num_threads <= 0 ? cpu_count() : num_threads; }

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- permute ----------------------------------------------------------------------------------- */

/* Output dimensions after dropping those of size 1 and merging neighbours that stay neighbours in the
   input, with each one's stride in the input and in the output (elements). */
typedef struct {
    int32_t rank;
    int64_t dims[TRTSHIM_MAX_RANK];
    int64_t src_stride[TRTSHIM_MAX_RANK];
    int64_t dst_stride[TRTSHIM_MAX_RANK];
} permute_plan;

static void plan_permute(int32_t rank, const int64_t *dims, const int32_t *perm, permute_plan *plan) {
    int64_t input_stride[TRTSHIM_MAX_RANK], stride = 1;
    for (int32_t i = rank - 1; i >= 0; i--) {
        input_stride[i] = stride;
        stride *= dims[i];
    }
    plan->rank = 0;
    for (int32_t i = 0; i < rank; i++) {
        int64_t d = dims[perm[i]], s = input_stride[perm[i]];
        if (d == 1) continue;
        int32_t last = plan->rank - 1;
        if (last >= 0 && plan->src_stride[last] == s * d) {
            plan->dims[last] *= d;
            plan->src_stride[last] = s;
            continue;
        }
        plan->dims[plan->rank] = d;
        plan->src_stride[plan->rank] = s;
        plan->rank++;
    }
    stride = 1;
    for (int32_t i = plan->rank - 1; i >= 0; i--) {
        plan->dst_stride[i] = stride;
        stride *= plan->dims[i];
    }
}

/* The source and destination offsets of an index over the plan's dimensions other than `skip_a` and
   `skip_b` (pass -1 to skip none), the last of those varying fastest. */
static void outer_offsets(const permute_plan *plan, int64_t index, int32_t skip_a, int32_t skip_b, int64_t *src,
                          int64_t *dst) {
    *src = 0;
    *dst = 0;
    for (int32_t i = plan->rank - 1; i >= 0; i--) {
        if (i == skip_a || i == skip_b) continue;
        int64_t coordinate = index % plan->dims[i];
        index /= plan->dims[i];
        *src += coordinate * plan->src_stride[i];
        *dst += coordinate * plan->dst_stride[i];
    }
}

typedef struct {
    const float *src;
    float *dst;
    permute_plan plan;
    int32_t axis_a;     /* the output dimension read contiguously (input stride 1) */
    int64_t tiles_a, tiles_b;
    int64_t peel_a, peel_b; /* a first, narrower tile that brings the next ones to 32-byte boundaries */
    int64_t row;        /* row-copy case: elements per contiguous row */
} permute_job;

/* Elements from p to the next 32-byte boundary (0 .. 7). */
static int64_t elements_to_boundary(const float *p) { return (int64_t)((32 - (uintptr_t)p % 32) % 32 / sizeof(float)); }

/* Tile `t` along a dimension of `dim` elements whose tiles start after a first one of `peel` elements. */

/* 64 x 64 tiles (16 KiB each side) measured best on a 4096 x 4096 transpose among 8 .. 128; the vector
   kernel is 2.5 times slower when its 32-byte loads and stores straddle cache lines, hence the peel. */
enum { TILE = 64 };

static void tile_range(int64_t t, int64_t peel, int64_t dim, int64_t *start, int64_t *length) {
    if (peel >= dim) peel = 0;
    *start = peel > 0 ? (t == 0 ? 0 : peel + (t - 1) * TILE) : t * TILE;
    int64_t end = peel > 0 && t == 0 ? peel : *start + TILE;
    *length = (end < dim ? end : dim) - *start;
}

static int64_t tile_count(int64_t peel, int64_t dim) {
    if (peel >= dim) peel = 0;
    return (peel > 0) + (dim - peel + TILE - 1) / TILE;
}

/* One tile: dst[a * dst_a + b] = src[a + b * src_b] for a < na, b < nb. */
static void transpose_tile_scalar(const float *src, int64_t src_b, float *dst, int64_t dst_a, int64_t na, int64_t nb) {
    for (int64_t a = 0; a < na; a++)
        for (int64_t b = 0; b < nb; b++) dst[a * dst_a + b] = src[a + b * src_b];
}

#ifdef TRANSFORM_X86
/* The same with 8x8 blocks transposed in AVX registers; edges fall back to scalar. */
__attribute__((target("avx2"))) static void transpose_tile_avx2(const float *src, int64_t src_b, float *dst,
                                                                int64_t dst_a, int64_t na, int64_t nb) {
    int64_t a8 = na & ~(int64_t)7, b8 = nb & ~(int64_t)7;
    /* a outer: each group of 8 destination rows is finished before the next, in whole cache lines. */
    for (int64_t a = 0; a < a8; a += 8) {
        for (int64_t b = 0; b < b8; b += 8) {
            const float *s = src + a + b * src_b;
            __m256 r0 = _mm256_loadu_ps(s + 0 * src_b), r1 = _mm256_loadu_ps(s + 1 * src_b);
            __m256 r2 = _mm256_loadu_ps(s + 2 * src_b), r3 = _mm256_loadu_ps(s + 3 * src_b);
            __m256 r4 = _mm256_loadu_ps(s + 4 * src_b), r5 = _mm256_loadu_ps(s + 5 * src_b);
            __m256 r6 = _mm256_loadu_ps(s + 6 * src_b), r7 = _mm256_loadu_ps(s + 7 * src_b);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
            __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
            __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
            float *d = dst + a * dst_a + b;
            _mm256_storeu_ps(d + 0 * dst_a, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(d + 1 * dst_a, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(d + 2 * dst_a, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(d + 3 * dst_a, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(d + 4 * dst_a, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(d + 5 * dst_a, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(d + 6 * dst_a, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(d + 7 * dst_a, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
    if (a8 < na) transpose_tile_scalar(src + a8, src_b, dst + a8 * dst_a, dst_a, na - a8, nb);
    if (b8 < nb) transpose_tile_scalar(src + b8 * src_b, src_b, dst + b8, dst_a, a8, nb - b8);
}
#endif

static void transpose_tile(const float *src, int64_t src_b, float *dst, int64_t dst_a, int64_t na, int64_t nb) {
#ifdef TRANSFORM_X86
    if (transform_use_simd && __builtin_cpu_supports("avx2")) {
        transpose_tile_avx2(src, src_b, dst, dst_a, na, nb);
        return;
    }
#endif
    transpose_tile_scalar(src, src_b, dst, dst_a, na, nb);
}

/* Units are (outer index, tile along the last axis, tile along axis_a), the last varying fastest: a run of
   units reads a band of whole input rows. */
static void permute_tiles(void *context, int64_t begin, int64_t end) {
    const permute_job *job = context;
    const permute_plan *p = &job->plan;
    int32_t a_axis = job->axis_a, b_axis = p->rank - 1;
    int64_t src_b = p->src_stride[b_axis], dst_a = p->dst_stride[a_axis];
    for (int64_t unit = begin; unit < end; unit++) {
        int64_t tile_a = unit % job->tiles_a, tile_b = (unit / job->tiles_a) % job->tiles_b;
        int64_t outer = unit / job->tiles_a / job->tiles_b, src_offset, dst_offset;
        outer_offsets(p, outer, a_axis, b_axis, &src_offset, &dst_offset);
        int64_t a0, na, b0, nb;
        tile_range(tile_a, job->peel_a, p->dims[a_axis], &a0, &na);
        tile_range(tile_b, job->peel_b, p->dims[b_axis], &b0, &nb);
        transpose_tile(job->src + src_offset + a0 + b0 * src_b, src_b, job->dst + dst_offset + a0 * dst_a + b0, dst_a,
                       na, nb);
    }
}

/* The last output dimension is contiguous in the input too: copy rows. */
static void permute_rows(void *context, int64_t begin, int64_t end) {
    const permute_job *job = context;
    for (int64_t unit = begin; unit < end; unit++) {
        int64_t src_offset, dst_offset;
        outer_offsets(&job->plan, unit, job->plan.rank - 1, -1, &src_offset, &dst_offset);
        memcpy(job->dst + dst_offset, job->src + src_offset, (size_t)job->row * sizeof(float));
    }
}

enum { COPY_CHUNK = 1 << 16 };

typedef struct {
    const float *src;
    float *dst;
    int64_t count;
} copy_job;

static void copy_chunks(void *context, int64_t begin, int64_t end) {
    const copy_job *job = context;
    int64_t first = begin * COPY_CHUNK, last = end * COPY_CHUNK < job->count ? end * COPY_CHUNK : job->count;
    memcpy(job->dst + first, job->src + first, (size_t)(last - first) * sizeof(float));
}

trtshim_status trtshim_transform_permute(const float *src, int32_t rank, const int64_t *dims, const int32_t *perm,
                                         float *dst, int32_t num_threads) {
    if (rank < 0 || rank > TRTSHIM_MAX_RANK)
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_permute: rank %d, expected 0 .. %d", rank, TRTSHIM_MAX_RANK);
    if (rank > 0 && (dims == NULL || perm == NULL))
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_permute: null %s", dims == NULL ? "dims" : "perm");
    int seen = 0;
    for (int32_t i = 0; i < rank; i++) {
        if (perm[i] < 0 || perm[i] >= rank || (seen & (1 << perm[i])))
            return set_error(TRTSHIM_ERR_ARGUMENT, "transform_permute: perm[%d] = %d is not a permutation of rank %d", i,
                             perm[i], rank);
        seen |= 1 << perm[i];
    }
    int64_t count = shape_volume(rank, dims);
    if (count < 0) return set_error(TRTSHIM_ERR_ARGUMENT, "transform_permute: negative or overflowing dimensions");
    if (count == 0) return TRTSHIM_OK;
    if (src == NULL || dst == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_permute: null %s", src == NULL ? "source" : "destination");

    int threads = resolve_threads(num_threads);
    permute_job job = {.src = src, .dst = dst};
    plan_permute(rank, dims, perm, &job.plan);
    const permute_plan *p = &job.plan;
    if (p->rank <= 1) { /* the identity, once size-1 dimensions are gone */
        copy_job copy = {src, dst, count};
        parallel_for((count + COPY_CHUNK - 1) / COPY_CHUNK, threads, copy_chunks, &copy);
        return TRTSHIM_OK;
    }
    if (p->src_stride[p->rank - 1] == 1) {
        job.row = p->dims[p->rank - 1];
        /* Under 256 KiB a thread hand-off costs more than the copy. */
        parallel_for(count / job.row, count * (int64_t)sizeof(float) < (1 << 18) ? 1 : threads, permute_rows, &job);
        return TRTSHIM_OK;
    }
    /* The innermost non-trivial input dimension keeps input stride 1 through the plan. */
    for (int32_t i = 0; i < p->rank; i++)
        if (p->src_stride[i] == 1) job.axis_a = i;
    /* Alignment is shared by every tile when the strides are multiples of 8 elements (the common case);
       otherwise the peel only helps some rows, which is still correct. */
    job.peel_a = elements_to_boundary(src);
    job.peel_b = elements_to_boundary(dst);
    job.tiles_a = tile_count(job.peel_a, p->dims[job.axis_a]);
    job.tiles_b = tile_count(job.peel_b, p->dims[p->rank - 1]);
    int64_t outer = count / p->dims[job.axis_a] / p->dims[p->rank - 1];
    parallel_for(outer * job.tiles_a * job.tiles_b, count < (1 << 16) ? 1 : threads, permute_tiles, &job);
    return TRTSHIM_OK;
}

/* ---- cast and round ----------------------------------------------------------------------------- */

/* The float16 value nearest to x (ties to even), widened back; beyond the float16 range: infinity. */
float transform_round_half(float x) {
    uint32_t u = bits_of(x), sign = u & 0x80000000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return a > 0x7f800000u ? float_of(u | 0x00400000u) : x; /* NaN (quiet), infinity */
    if (a >= 0x477ff000u) return float_of(sign | 0x7f800000u);                    /* >= 65520 rounds past 65504 */
    if (a <= 0x33000000u) return float_of(sign);                                  /* <= 2^-25 rounds to zero */
    int32_t exponent = (int32_t)(a >> 23) - 127;
    if (exponent >= -14) { /* a normal float16: keep 10 of the 23 mantissa bits; a carry moves the exponent */
        uint32_t rounded = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;
        return float_of(sign | rounded);
    }
    /* A float16 subnormal: multiples of 2^-24. */
    uint32_t significand = (a & 0x7fffffu) | 0x800000u;
    int32_t shift = 13 + (-14 - exponent); /* 14 .. 24 */
    uint32_t q = significand >> shift, rest = significand & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) q++;
    float magnitude = ldexpf((float)q, -24);
    return sign ? -magnitude : magnitude;
}

/* The bfloat16 value nearest to x (ties to even), widened back. */
float transform_round_bfloat(float x) {
    uint32_t u = bits_of(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return float_of((u | 0x00400000u) & 0xffff0000u);
    return float_of((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

typedef struct {
    const float *src;
    float *dst;
    int64_t count;
    trtshim_dtype to;
} cast_job;

#ifdef TRANSFORM_X86
__attribute__((target("avx,f16c"))) static void round_half_f16c(const float *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) dst[i] = transform_round_half(src[i]);
}
#endif

static void cast_chunks(void *context, int64_t begin, int64_t end) {
    const cast_job *job = context;
    int64_t first = begin * COPY_CHUNK, last = end * COPY_CHUNK < job->count ? end * COPY_CHUNK : job->count;
    const float *src = job->src + first;
    float *dst = job->dst + first;
    int64_t n = last - first;
    if (job->to == TRTSHIM_FLOAT16) {
#ifdef TRANSFORM_X86
        if (transform_use_simd && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
            round_half_f16c(src, dst, n);
            return;
        }
#endif
        for (int64_t i = 0; i < n; i++) dst[i] = transform_round_half(src[i]);
    } else if (job->to == TRTSHIM_BFLOAT16) {
        for (int64_t i = 0; i < n; i++) dst[i] = transform_round_bfloat(src[i]);
    } else if (dst != src) {
        memmove(dst, src, (size_t)n * sizeof(float));
    }
}

trtshim_status trtshim_transform_cast_round(const float *src, trtshim_dtype to, float *dst, uint64_t count,
                                            int32_t num_threads) {
    if (to != TRTSHIM_FLOAT32 && to != TRTSHIM_FLOAT16 && to != TRTSHIM_BFLOAT16)
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_cast_round: cannot round to %s, expected float32, float16 or bfloat16",
                         dtype_name(to));
    if (count == 0) return TRTSHIM_OK;
    if (count > (uint64_t)INT64_MAX / 4) return set_error(TRTSHIM_ERR_ARGUMENT, "transform_cast_round: count %llu too large", (unsigned long long)count);
    if (src == NULL || dst == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_cast_round: null %s", src == NULL ? "source" : "destination");
    cast_job job = {src, dst, (int64_t)count, to};
    parallel_for((job.count + COPY_CHUNK - 1) / COPY_CHUNK, resolve_threads(num_threads), cast_chunks, &job);
    return TRTSHIM_OK;
}

/* ---- BatchNorm folds ----------------------------------------------------------------------------- */

/* gamma / sqrt(variance + epsilon), every step rounded to float32 (the reference's bnScale). */
static float bn_scale(float gamma, float variance, float epsilon) {
    float shifted = variance + epsilon;
    float root = sqrtf(shifted);
    return gamma / root;
}

typedef struct {
    const float *weight, *gamma, *variance;
    float *dst;
    int64_t inner, chunks_per_channel;
    float epsilon;
} fold_job;

static void fold_weight_chunks(void *context, int64_t begin, int64_t end) {
    const fold_job *job = context;
    for (int64_t unit = begin; unit < end; unit++) {
        int64_t channel = unit / job->chunks_per_channel, chunk = unit % job->chunks_per_channel;
        int64_t first = chunk * COPY_CHUNK, last = first + COPY_CHUNK < job->inner ? first + COPY_CHUNK : job->inner;
        float scale = bn_scale(job->gamma[channel], job->variance[channel], job->epsilon);
        const float *w = job->weight + channel * job->inner;
        float *d = job->dst + channel * job->inner;
        for (int64_t i = first; i < last; i++) d[i] = w[i] * scale;
    }
}

trtshim_status trtshim_transform_bn_fold_weight(const float *weight, int64_t channels, int64_t inner, const float *gamma,
                                                const float *variance, double epsilon, float *dst, int32_t num_threads) {
    if (channels < 0 || inner < 0 || (inner > 0 && channels > INT64_MAX / inner))
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_bn_fold_weight: %lld channels of %lld elements", (long long)channels,
                         (long long)inner);
    if (channels == 0) return TRTSHIM_OK;
    if (gamma == NULL || variance == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_bn_fold_weight: null %s", gamma == NULL ? "gamma" : "variance");
    if (inner == 0) return TRTSHIM_OK;
    if (weight == NULL || dst == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_bn_fold_weight: null %s", weight == NULL ? "weight" : "destination");
    fold_job job = {weight, gamma, variance, dst, inner, (inner + COPY_CHUNK - 1) / COPY_CHUNK, (float)epsilon};
    int threads = channels * inner < (1 << 16) ? 1 : resolve_threads(num_threads);
    parallel_for(channels * job.chunks_per_channel, threads, fold_weight_chunks, &job);
    return TRTSHIM_OK;
}

trtshim_status trtshim_transform_bn_fold_bias(const float *bias, const float *gamma, const float *beta, const float *mean,
                                              const float *variance, int64_t channels, double epsilon, float *dst) {
    if (channels < 0) return set_error(TRTSHIM_ERR_ARGUMENT, "transform_bn_fold_bias: %lld channels", (long long)channels);
    if (channels == 0) return TRTSHIM_OK;
    const char *missing = gamma == NULL ? "gamma" : beta == NULL ? "beta" : mean == NULL ? "mean"
                        : variance == NULL ? "variance" : dst == NULL ? "destination" : NULL;
    if (missing != NULL) return set_error(TRTSHIM_ERR_ARGUMENT, "transform_bn_fold_bias: null %s", missing);
    float eps = (float)epsilon;
    for (int64_t c = 0; c < channels; c++) {
        float scale = bn_scale(gamma[c], variance[c], eps);
        float centered = (bias != NULL ? bias[c] : 0.0f) - mean[c];
        float scaled = centered * scale;
        dst[c] = scaled + beta[c];
    }
    return TRTSHIM_OK;
}

/* ---- LoRA ----------------------------------------------------------------------------------------- */

/* acc[i] += x * v[i] in float64. x and v[i] are float32 values, so their product is exact in float64 and
   only the add rounds: fused or not, the result is the reference's. */
static void axpy_scalar(double *acc, double x, const float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += x * (double)v[i];
}

/* w[i] = w[i] + (float)(acc[i] * scale): the delta rounded to float32 once, then a float32 add. */
static void add_rounded_scalar(float *w, const double *acc, double scale, int64_t n) {
    for (int64_t i = 0; i < n; i++) w[i] = w[i] + (float)(acc[i] * scale);
}

#ifdef TRANSFORM_X86
/* The same, 8 doubles a step. */
__attribute__((target("avx2"))) static void axpy_avx2(double *acc, double x, const float *v, int64_t n) {
    __m256d vx = _mm256_set1_pd(x);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256d p0 = _mm256_mul_pd(vx, _mm256_cvtps_pd(_mm_loadu_ps(v + i)));
        __m256d p1 = _mm256_mul_pd(vx, _mm256_cvtps_pd(_mm_loadu_ps(v + i + 4)));
        _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), p0));
        _mm256_storeu_pd(acc + i + 4, _mm256_add_pd(_mm256_loadu_pd(acc + i + 4), p1));
    }
    axpy_scalar(acc + i, x, v + i, n - i);
}

__attribute__((target("avx2"))) static void add_rounded_avx2(float *w, const double *acc, double scale, int64_t n) {
    __m256d vs = _mm256_set1_pd(scale);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m128 delta = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_loadu_pd(acc + i), vs)); /* round to nearest even */
        _mm_storeu_ps(w + i, _mm_add_ps(_mm_loadu_ps(w + i), delta));
    }
    add_rounded_scalar(w + i, acc + i, scale, n - i);
}
#endif

static void axpy(double *acc, double x, const float *v, int64_t n) {
#ifdef TRANSFORM_X86
    if (transform_use_simd && __builtin_cpu_supports("avx2")) {
        axpy_avx2(acc, x, v, n);
        return;
    }
#endif
    axpy_scalar(acc, x, v, n);
}

static void add_rounded(float *w, const double *acc, double scale, int64_t n) {
#ifdef TRANSFORM_X86
    if (transform_use_simd && __builtin_cpu_supports("avx2")) {
        add_rounded_avx2(w, acc, scale, n);
        return;
    }
#endif
    add_rounded_scalar(w, acc, scale, n);
}

/* Rows of the weight are split into `units` ranges; unit u accumulates in acc + u * acc_length. */
typedef struct {
    float *weight;
    const float *up, *down, *up_t; /* up_t: up transposed to [rank, out] (fan_in_fan_out only) */
    int transposed;
    int64_t out, in, rank, rows, units, acc_length;
    double scale;
    double *acc;
} lora_job;

/* weight [out, in]: row o gets sum_r up[o, r] * down[r, :]. */
static void lora_rows(const lora_job *job, int64_t first, int64_t last, double *acc) {
    for (int64_t o = first; o < last; o++) {
        memset(acc, 0, (size_t)job->in * sizeof(double));
        for (int64_t r = 0; r < job->rank; r++) {
            double u = job->up[o * job->rank + r];
            if (u == 0) continue; /* the reference skips zero entries of up, which matters for an infinite down */
            axpy(acc, u, job->down + r * job->in, job->in);
        }
        add_rounded(job->weight + o * job->in, acc, job->scale, job->in);
    }
}

/* weight [in, out] (fan_in_fan_out): row i gets sum_r up[:, r] * down[r, i]. Adding u * d for u = 0 adds a
   zero, which leaves the sum as skipping it would (the sum starts at +0 and so is never -0), unless d is
   infinite or NaN: only then are zero entries of up skipped one by one. */
static void lora_rows_transposed(const lora_job *job, int64_t first, int64_t last, double *acc) {
    for (int64_t i = first; i < last; i++) {
        memset(acc, 0, (size_t)job->out * sizeof(double));
        for (int64_t r = 0; r < job->rank; r++) {
            double d = job->down[r * job->in + i];
            const float *u = job->up_t + r * job->out;
            if (isfinite(d)) {
                axpy(acc, d, u, job->out);
            } else {
                for (int64_t o = 0; o < job->out; o++)
                    if (u[o] != 0) acc[o] += (double)u[o] * d;
            }
        }
        add_rounded(job->weight + i * job->out, acc, job->scale, job->out);
    }
}

static void lora_units(void *context, int64_t begin, int64_t end) {
    const lora_job *job = context;
    double *acc = job->acc + begin * job->acc_length;
    int64_t first = job->rows * begin / job->units, last = job->rows * end / job->units;
    if (job->transposed) lora_rows_transposed(job, first, last, acc);
    else lora_rows(job, first, last, acc);
}

trtshim_status trtshim_transform_lora_add(float *weight, int64_t out_features, int64_t in_features, int32_t fan_in_fan_out,
                                          const float *up, const float *down, int64_t rank, double scale,
                                          int32_t num_threads) {
    if (out_features < 0 || in_features < 0 || rank < 0 || (in_features > 0 && out_features > INT64_MAX / 8 / in_features) ||
        (rank > 0 && (out_features > INT64_MAX / 8 / rank || in_features > INT64_MAX / 8 / rank)))
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_lora_add: out_features %lld, in_features %lld, rank %lld",
                         (long long)out_features, (long long)in_features, (long long)rank);
    if (out_features == 0 || in_features == 0) return TRTSHIM_OK;
    if (weight == NULL) return set_error(TRTSHIM_ERR_ARGUMENT, "transform_lora_add: null weight");
    if (rank > 0 && (up == NULL || down == NULL))
        return set_error(TRTSHIM_ERR_ARGUMENT, "transform_lora_add: null %s", up == NULL ? "up" : "down");

    lora_job job = {.weight = weight, .up = up, .down = down, .out = out_features, .in = in_features, .rank = rank,
                    .scale = scale};
    job.rows = fan_in_fan_out ? in_features : out_features;
    job.acc_length = fan_in_fan_out ? out_features : in_features;
    int threads = resolve_threads(num_threads);
    if (out_features * in_features * (rank > 0 ? rank : 1) < (1 << 16)) threads = 1;
    job.units = threads < job.rows ? threads : job.rows;

    /* Every buffer is taken before the weight is touched, so a failed call leaves it as it was. */
    float *up_t = NULL;
    job.acc = malloc((size_t)(job.units * job.acc_length) * sizeof(double));
    if (fan_in_fan_out && rank > 0) up_t = malloc((size_t)(rank * out_features) * sizeof(float));
    if (job.acc == NULL || (fan_in_fan_out && rank > 0 && up_t == NULL)) {
        free(job.acc);
        free(up_t);
        return set_error(TRTSHIM_ERR_MEMORY, "transform_lora_add: no memory for the accumulators of a [%lld, %lld] weight",
                         (long long)out_features, (long long)in_features);
    }
    if (fan_in_fan_out) {
        for (int64_t o = 0; o < out_features; o++)
            for (int64_t r = 0; r < rank; r++) up_t[r * out_features + o] = up[o * rank + r];
        job.up_t = up_t;
        job.transposed = 1;
    }
    parallel_for(job.units, threads, lora_units, &job);
    free(job.acc);
    free(up_t);
    return TRTSHIM_OK;
}
