/* gemm.c: packed-weight GEMM, its tactics, and matmul_f32.
 *
 * Packed layout (every tactic): B is cut into panels of GEMM_NR = 32 columns; panel p holds columns
 * [32p, 32p + 32) as K rows of 32 values (row k of the panel is at ((p * K) + k) * 32), in the weight dtype.
 * Lanes past N in the last panel are zero. A K range of a panel is therefore contiguous, which is what the
 * cache-blocked kernels walk.
 *
 * Numerics (see gemm.h): acc = 0; for k = 0 .. K-1: acc = fma(a[m,k], b[k,n], acc); c = act(acc + bias[n]).
 *
 * Packing is what a refit spends its time on. The vector paths (AVX-512, AVX2) pack whole panels: a
 * torch-layout [N, K] source through 16 x 16 (8 x 8) in-register transposes, a row-major one row by row;
 * the rounding to float16 / bfloat16 is vectorized and bit-identical to the scalar conversions; a large
 * packing is written with non-temporal stores. The scalar path is the reference and packs the ragged
 * columns at the ends of a range.
 *
 * Quantized weights (see gemm.h): values in the same 32-column panels (one byte per value for int8 and
 * e4m3; for int4 16 bytes per panel row, byte l holding lane l in its low nibble and lane l + 16 in its
 * high one), then float32 scales from a 64-byte aligned offset: per column for int8 and e4m3; for int4 per
 * panel, [groups][32]. The run widens a K block of up to 4 panels at a time into float32 panels and hands
 * them to the float32 micro-kernels, so the numerics are those of the float32 GEMM over w = q * scale.
 */
#include "gemm.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops.h"
#include "threadpool.h"

#define GEMM_NR 32

/* ---- weight dtype conversion ---------------------------------------------------------------------- */

static uint32_t float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float bits_float(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* float32 -> float16, round to nearest even; NaN stays NaN (quieted), as the F16C instruction does. */
static uint16_t float_to_half(float x) {
    uint32_t u = float_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t exponent = (u >> 23) & 0xff, mantissa = u & 0x7fffff;
    if (exponent == 0xff) return (uint16_t)(sign | 0x7c00 | (mantissa ? 0x200 | (mantissa >> 13) : 0));
    int32_t e = (int32_t)exponent - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return sign; /* below half the smallest subnormal: rounds to zero */
        uint32_t m = mantissa | 0x800000;
        int shift = 14 - e;
        uint32_t half = m >> shift, rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (mantissa >> 13), rest = mantissa & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++; /* may carry into the exponent: correct */
    return (uint16_t)(sign | half);
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000 | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return bits_float(sign);
        float value = (float)mantissa * (1.0f / 16777216.0f); /* mantissa * 2^-24, exact */
        return sign ? -value : value;
    }
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/* float32 -> bfloat16, round to nearest even; NaN stays NaN (quieted). */
static uint16_t float_to_bfloat(float x) {
    uint32_t u = float_bits(x);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float bfloat_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

static size_t weight_size(trtshim_dtype dtype) {
    switch (dtype) {
    case TRTSHIM_FLOAT32: return 4;
    case TRTSHIM_FLOAT16:
    case TRTSHIM_BFLOAT16: return 2;
    default: return 0;
    }
}

/* Element i of a packed buffer, widened to float32. */
static float packed_at(const void *packed, trtshim_dtype dtype, size_t i) {
    switch (dtype) {
    case TRTSHIM_FLOAT16: return half_to_float(((const uint16_t *)packed)[i]);
    case TRTSHIM_BFLOAT16: return bfloat_to_float(((const uint16_t *)packed)[i]);
    default: return ((const float *)packed)[i];
    }
}

/* ---- micro-kernels -------------------------------------------------------------------------------- */

/* A micro-kernel computes a `rows` x W tile of C (W = the tactic's width; rows <= its MR) over kc steps of
   k. a is a packed A panel: row i of step k at a[k * a_stride + i]. b points at the first row of the K
   range of a packed B panel (rows GEMM_NR elements apart), offset to the tile's first column. Only the
   first `cols` columns of C are read and written. load_c: go on from the running sums stored in C (a later
   K block) instead of from 0. bias (may be NULL) is added at the end, so pass it only with the last K
   block. Every lane does acc = fma(a, b, acc) in k order, as fmaf does. */
typedef void (*micro_kernel)(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b, float *c,
                             int64_t ldc, int cols, int load_c, const float *bias);

/* A wide kernel: the same contract for 1 or 2 rows and 4 whole panels (128 columns) at once, the panels
   panel_stride elements apart. A thin A (one decode step) gets 8 or 16 independent accumulation chains
   instead of 2 or 4, which is what hides the latency of the fused multiply-add. */
typedef void (*wide_kernel)(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                            int64_t panel_stride, float *c, int64_t ldc, int load_c, const float *bias);
#define WIDE_ROWS 2
#define WIDE_PANELS 4

/* TRTSHIM_GEMM_PORTABLE builds only the scalar tactic, as on a CPU that is not x86 (tests that path). */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
#include <immintrin.h>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

static int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* 16 packed weights from element i, widened to float32 (exact for float16 and bfloat16). */
AVX512_TARGET INLINE __m512 avx512_load_b(const void *b, int64_t i, trtshim_dtype dtype) {
    if (dtype == TRTSHIM_FLOAT16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)b + i)));
    if (dtype == TRTSHIM_BFLOAT16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)b + i))), 16));
    return _mm512_loadu_ps((const float *)b + i);
}

/* ROWS x 32 tile, two zmm accumulators per row (up to 14 rows: 28 accumulators + 2 weights). */
AVX512_TARGET INLINE void avx512_tile(const int ROWS, trtshim_dtype dtype, int64_t kc, const float *a,
                                      int64_t a_stride, const void *b, float *c, int64_t ldc, int cols, int load_c,
                                      const float *bias) {
    __m512 acc0[14], acc1[14];
    __mmask16 mask0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
    __mmask16 mask1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
#pragma GCC unroll 14
    for (int i = 0; i < ROWS; i++) {
        acc0[i] = load_c ? _mm512_maskz_loadu_ps(mask0, c + i * ldc) : _mm512_setzero_ps();
        acc1[i] = load_c ? _mm512_maskz_loadu_ps(mask1, c + i * ldc + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kc; k++) {
        __m512 b0 = avx512_load_b(b, k * GEMM_NR, dtype), b1 = avx512_load_b(b, k * GEMM_NR + 16, dtype);
        const float *ak = a + k * a_stride;
#pragma GCC unroll 14
        for (int i = 0; i < ROWS; i++) {
            __m512 x = _mm512_set1_ps(ak[i]);
            acc0[i] = _mm512_fmadd_ps(x, b0, acc0[i]);
            acc1[i] = _mm512_fmadd_ps(x, b1, acc1[i]);
        }
    }
    if (bias) {
        __m512 bias0 = _mm512_maskz_loadu_ps(mask0, bias), bias1 = _mm512_maskz_loadu_ps(mask1, bias + 16);
#pragma GCC unroll 14
        for (int i = 0; i < ROWS; i++) {
            acc0[i] = _mm512_add_ps(acc0[i], bias0);
            acc1[i] = _mm512_add_ps(acc1[i], bias1);
        }
    }
#pragma GCC unroll 14
    for (int i = 0; i < ROWS; i++) {
        _mm512_mask_storeu_ps(c + i * ldc, mask0, acc0[i]);
        _mm512_mask_storeu_ps(c + i * ldc + 16, mask1, acc1[i]);
    }
}

/* One body per row count, so that the accumulators of each stay in registers. */
AVX512_TARGET INLINE void avx512_rows(trtshim_dtype dtype, int rows, int64_t kc, const float *a, int64_t a_stride,
                                      const void *b, float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    switch (rows) {
    case 1: avx512_tile(1, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 2: avx512_tile(2, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 3: avx512_tile(3, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 4: avx512_tile(4, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 5: avx512_tile(5, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 6: avx512_tile(6, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 7: avx512_tile(7, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 8: avx512_tile(8, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 9: avx512_tile(9, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 10: avx512_tile(10, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 11: avx512_tile(11, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 12: avx512_tile(12, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 13: avx512_tile(13, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 14: avx512_tile(14, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    default: break;
    }
}

AVX512_TARGET static void avx512_kernel_f32(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                            float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    avx512_rows(TRTSHIM_FLOAT32, rows, kc, a, a_stride, b, c, ldc, cols, load_c, bias);
}
AVX512_TARGET static void avx512_kernel_f16(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                            float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    avx512_rows(TRTSHIM_FLOAT16, rows, kc, a, a_stride, b, c, ldc, cols, load_c, bias);
}
AVX512_TARGET static void avx512_kernel_bf16(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                             float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    avx512_rows(TRTSHIM_BFLOAT16, rows, kc, a, a_stride, b, c, ldc, cols, load_c, bias);
}

AVX512_TARGET INLINE void avx512_wide_tile(const int ROWS, trtshim_dtype dtype, int64_t kc, const float *a,
                                           int64_t a_stride, const void *b, int64_t panel_stride, float *c,
                                           int64_t ldc, int load_c, const float *bias) {
    __m512 acc[WIDE_ROWS][2 * WIDE_PANELS];
#pragma GCC unroll 2
    for (int i = 0; i < ROWS; i++)
#pragma GCC unroll 8
        for (int v = 0; v < 2 * WIDE_PANELS; v++)
            acc[i][v] = load_c ? _mm512_loadu_ps(c + i * ldc + v * 16) : _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m512 x[WIDE_ROWS];
#pragma GCC unroll 2
        for (int i = 0; i < ROWS; i++) x[i] = _mm512_set1_ps(a[k * a_stride + i]);
#pragma GCC unroll 8
        for (int v = 0; v < 2 * WIDE_PANELS; v++) {
            __m512 w = avx512_load_b(b, (v / 2) * panel_stride + k * GEMM_NR + (v % 2) * 16, dtype);
#pragma GCC unroll 2
            for (int i = 0; i < ROWS; i++) acc[i][v] = _mm512_fmadd_ps(x[i], w, acc[i][v]);
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < ROWS; i++)
#pragma GCC unroll 8
        for (int v = 0; v < 2 * WIDE_PANELS; v++) {
            __m512 sum = bias ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(bias + v * 16)) : acc[i][v];
            _mm512_storeu_ps(c + i * ldc + v * 16, sum);
        }
}

AVX512_TARGET INLINE void avx512_wide_rows(trtshim_dtype dtype, int rows, int64_t kc, const float *a,
                                           int64_t a_stride, const void *b, int64_t panel_stride, float *c,
                                           int64_t ldc, int load_c, const float *bias) {
    if (rows == 1) avx512_wide_tile(1, dtype, kc, a, a_stride, b, panel_stride, c, ldc, load_c, bias);
    else if (rows == 2) avx512_wide_tile(2, dtype, kc, a, a_stride, b, panel_stride, c, ldc, load_c, bias);
}

AVX512_TARGET static void avx512_wide_f32(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                          int64_t panel_stride, float *c, int64_t ldc, int load_c, const float *bias) {
    avx512_wide_rows(TRTSHIM_FLOAT32, rows, kc, a, a_stride, b, panel_stride, c, ldc, load_c, bias);
}
AVX512_TARGET static void avx512_wide_f16(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                          int64_t panel_stride, float *c, int64_t ldc, int load_c, const float *bias) {
    avx512_wide_rows(TRTSHIM_FLOAT16, rows, kc, a, a_stride, b, panel_stride, c, ldc, load_c, bias);
}
AVX512_TARGET static void avx512_wide_bf16(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                           int64_t panel_stride, float *c, int64_t ldc, int load_c, const float *bias) {
    avx512_wide_rows(TRTSHIM_BFLOAT16, rows, kc, a, a_stride, b, panel_stride, c, ldc, load_c, bias);
}

/* 8 packed weights from element i, widened to float32. */
AVX2_TARGET INLINE __m256 avx2_load_b(const void *b, int64_t i, trtshim_dtype dtype) {
    if (dtype == TRTSHIM_FLOAT16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + i)));
    if (dtype == TRTSHIM_BFLOAT16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + i))), 16));
    return _mm256_loadu_ps((const float *)b + i);
}

/* ROWS x 16 tile, two ymm accumulators per row (up to 6 rows: 12 accumulators of the 16 registers). */
AVX2_TARGET INLINE void avx2_tile(const int ROWS, trtshim_dtype dtype, int64_t kc, const float *a, int64_t a_stride,
                                  const void *b, float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    __m256 acc0[6], acc1[6];
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lanes);
    __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lanes);
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; i++) {
        acc0[i] = load_c ? _mm256_maskload_ps(c + i * ldc, mask0) : _mm256_setzero_ps();
        acc1[i] = load_c ? _mm256_maskload_ps(c + i * ldc + 8, mask1) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kc; k++) {
        __m256 b0 = avx2_load_b(b, k * GEMM_NR, dtype), b1 = avx2_load_b(b, k * GEMM_NR + 8, dtype);
        const float *ak = a + k * a_stride;
#pragma GCC unroll 6
        for (int i = 0; i < ROWS; i++) {
            __m256 x = _mm256_broadcast_ss(ak + i);
            acc0[i] = _mm256_fmadd_ps(x, b0, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(x, b1, acc1[i]);
        }
    }
    if (bias) {
        __m256 bias0 = _mm256_maskload_ps(bias, mask0), bias1 = _mm256_maskload_ps(bias + 8, mask1);
#pragma GCC unroll 6
        for (int i = 0; i < ROWS; i++) {
            acc0[i] = _mm256_add_ps(acc0[i], bias0);
            acc1[i] = _mm256_add_ps(acc1[i], bias1);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; i++) {
        _mm256_maskstore_ps(c + i * ldc, mask0, acc0[i]);
        _mm256_maskstore_ps(c + i * ldc + 8, mask1, acc1[i]);
    }
}

AVX2_TARGET INLINE void avx2_rows(trtshim_dtype dtype, int rows, int64_t kc, const float *a, int64_t a_stride,
                                  const void *b, float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    switch (rows) {
    case 1: avx2_tile(1, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 2: avx2_tile(2, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 3: avx2_tile(3, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 4: avx2_tile(4, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 5: avx2_tile(5, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    case 6: avx2_tile(6, dtype, kc, a, a_stride, b, c, ldc, cols, load_c, bias); break;
    default: break;
    }
}

AVX2_TARGET static void avx2_kernel_f32(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                        float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    avx2_rows(TRTSHIM_FLOAT32, rows, kc, a, a_stride, b, c, ldc, cols, load_c, bias);
}
AVX2_TARGET static void avx2_kernel_f16(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                        float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    avx2_rows(TRTSHIM_FLOAT16, rows, kc, a, a_stride, b, c, ldc, cols, load_c, bias);
}
AVX2_TARGET static void avx2_kernel_bf16(int rows, int64_t kc, const float *a, int64_t a_stride, const void *b,
                                         float *c, int64_t ldc, int cols, int load_c, const float *bias) {
    avx2_rows(TRTSHIM_BFLOAT16, rows, kc, a, a_stride, b, c, ldc, cols, load_c, bias);
}

#define AVX512_KERNELS {avx512_kernel_f32, avx512_kernel_f16, avx512_kernel_bf16}
#define AVX2_KERNELS {avx2_kernel_f32, avx2_kernel_f16, avx2_kernel_bf16}
#define AVX512_WIDE {avx512_wide_f32, avx512_wide_f16, avx512_wide_bf16}
#else
static int has_avx512(void) { return 0; }
static int has_avx2(void) { return 0; }
#define AVX512_KERNELS {NULL, NULL, NULL}
#define AVX2_KERNELS {NULL, NULL, NULL}
#define AVX512_WIDE {NULL, NULL, NULL}
#endif

/* ---- tactics ------------------------------------------------------------------------------------- */

/* A blocked tactic walks C in tiles of mc x nc (the unit of parallel work); within a tile, K in blocks of
   kc (the packed A block, mc x kc, stays in L2; one kc x width slice of a B panel stays in L1 while every
   micro-tile row block of the tile passes over it). Tactic 0 has no kernel: scalar fmaf loops. */
typedef struct {
    const char *name;
    int (*supported)(void);
    int mr, width;
    int64_t kc, mc, nc;
    micro_kernel kernels[3]; /* by weight dtype: FLOAT32, FLOAT16, BFLOAT16 */
    wide_kernel wide[3];     /* for tiles of at most WIDE_ROWS rows; NULL where there is none */
} tactic_info;

static int always(void) { return 1; }

static const tactic_info tactics[] = {
    {"scalar", always, 1, 1, 0, 0, 0, {NULL, NULL, NULL}, {NULL, NULL, NULL}},
    {"avx2_6x16", has_avx2, 6, 16, 256, 276, 1024, AVX2_KERNELS, {NULL, NULL, NULL}},
    {"avx512_6x32", has_avx512, 6, 32, 256, 276, 1024, AVX512_KERNELS, {NULL, NULL, NULL}},
    {"avx512_8x32", has_avx512, 8, 32, 256, 280, 1024, AVX512_KERNELS, AVX512_WIDE},
    {"avx512_14x32", has_avx512, 14, 32, 256, 280, 1024, AVX512_KERNELS, AVX512_WIDE},
};
#define TACTIC_COUNT ((int)(sizeof tactics / sizeof tactics[0]))

int gemm_tactic_count(void) { return TACTIC_COUNT; }

const char *gemm_tactic_name(int tactic) {
    return tactic >= 0 && tactic < TACTIC_COUNT ? tactics[tactic].name : "?";
}

int gemm_tactic_supported(int tactic) {
    return tactic >= 0 && tactic < TACTIC_COUNT && tactics[tactic].supported();
}

/* The fastest supported tactic on this machine, for matmul_f32 (which no builder times). */
static int preferred_tactic(void) {
    static const char *const order[] = {"avx512_14x32", "avx2_6x16"};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        for (int t = 0; t < TACTIC_COUNT; t++)
            if (strcmp(tactics[t].name, order[i]) == 0 && gemm_tactic_supported(t)) return t;
    return 0;
}

/* ---- packing ------------------------------------------------------------------------------------- */

static int64_t panel_count(int64_t N) { return (N + GEMM_NR - 1) / GEMM_NR; }

size_t gemm_packed_bytes(int tactic, int64_t K, int64_t N, trtshim_dtype weight_dtype) {
    size_t size = weight_size(weight_dtype);
    if (size == 0 || K < 0 || N < 0) return 0;
    return (size_t)panel_count(N) * GEMM_NR * (size_t)K * size;
}

/* Packing paths. The scalar path is the reference (hand-written conversions, any column range); the
   vector paths pack whole panels (columns [32p, 32p + 32)) and leave the ragged columns at either end of
   a range to the scalar path, so every path writes the same bytes. */

/* Stores n values, rounded to the weight dtype, at element `at` of a packed buffer. */
static void store_run(void *packed, trtshim_dtype dtype, size_t at, const float *values, int64_t n) {
    if (dtype == TRTSHIM_FLOAT16) {
        uint16_t *dst = (uint16_t *)packed + at;
        for (int64_t i = 0; i < n; i++) dst[i] = float_to_half(values[i]);
    } else if (dtype == TRTSHIM_BFLOAT16) {
        uint16_t *dst = (uint16_t *)packed + at;
        for (int64_t i = 0; i < n; i++) dst[i] = float_to_bfloat(values[i]);
    } else {
        memcpy((float *)packed + at, values, sizeof(float) * (size_t)n);
    }
}

/* Walks panel by panel and, within a panel, K in blocks of PACK_KB rows: a transposed source is gathered
   through a small block that stays in L1, so both reading and writing go along memory. */
#define PACK_KB 64

static void pack_columns_scalar(const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t n_begin,
                                int64_t n_count, trtshim_dtype weight_dtype, void *packed) {
    float block[PACK_KB * GEMM_NR];
    /* Row-major [K, n_count]: K blocks outside, so a block of source rows is read whole while it is in
       cache. Transposed [n_count, K]: panels outside, so each source row is read from start to end. */
    int64_t outer_steps = b_transposed ? 1 : (K + PACK_KB - 1) / PACK_KB;
    for (int64_t outer = 0; outer < outer_steps; outer++) {
        for (int64_t j0 = 0; j0 < n_count;) {
            int64_t column = n_begin + j0, lane = column % GEMM_NR;
            int64_t width = GEMM_NR - lane < n_count - j0 ? GEMM_NR - lane : n_count - j0;
            size_t panel = (size_t)(column / GEMM_NR) * (size_t)K * GEMM_NR + (size_t)lane;
            int64_t k_begin = b_transposed ? 0 : outer * PACK_KB, k_end = b_transposed ? K : k_begin + PACK_KB;
            if (k_end > K) k_end = K;
            for (int64_t k0 = k_begin; k0 < k_end; k0 += PACK_KB) {
                int64_t rows = k_end - k0 < PACK_KB ? k_end - k0 : PACK_KB;
                if (!b_transposed) {
                    for (int64_t k = 0; k < rows; k++)
                        store_run(packed, weight_dtype, panel + (size_t)(k0 + k) * GEMM_NR, b + (k0 + k) * ldb + j0,
                                  width);
                } else {
                    for (int64_t l = 0; l < width; l++) {
                        const float *src = b + (j0 + l) * ldb + k0;
                        for (int64_t k = 0; k < rows; k++) block[k * GEMM_NR + l] = src[k];
                    }
                    for (int64_t k = 0; k < rows; k++)
                        store_run(packed, weight_dtype, panel + (size_t)(k0 + k) * GEMM_NR, block + k * GEMM_NR, width);
                }
            }
            j0 += width;
        }
    }
}

/* A vector path packs `panels` whole panels starting at panel `first_panel`; b points at the source of the
   panel's first column. nt: write with non-temporal stores (only passed when the buffer is 64-byte
   aligned): a large packing then does not read every destination line in before overwriting it, and does
   not push the activations out of the cache. */
typedef void (*panel_packer)(const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t first_panel,
                             int64_t panels, trtshim_dtype weight_dtype, void *packed, int nt);

/* Packings of at least this many bytes are written with non-temporal stores: about the size of L2, past
   which the packed weight would not stay in cache until its first use anyway. */
#define PACK_NT_BYTES ((size_t)2 << 20)
/* Rows of a row-major source handled per pass over the panels (their 32-column slices stay in L1). */
#define PACK_ROWS 8
/* k per visit of a transposed source's rows (a multiple of 16). */
#ifndef PACK_KT
#define PACK_KT 64
#endif

#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)

/* float32 -> bfloat16 of 16 lanes, the rounding of float_to_bfloat: round to nearest even on the bits,
   NaN quieted (keeps its top bits, sets the quiet bit). */
AVX512_TARGET INLINE __m256i avx512_to_bfloat(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __m512i quieted = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quieted));
}

/* One packed row of 32 lanes (x0: lanes 0-15, x1: 16-31), rounded to the dtype, at a row-aligned dst. */
AVX512_TARGET INLINE void avx512_emit_row(__m512 x0, __m512 x1, trtshim_dtype dtype, void *dst, int nt) {
    if (dtype == TRTSHIM_FLOAT32) {
        if (nt) {
            _mm512_stream_ps((float *)dst, x0);
            _mm512_stream_ps((float *)dst + 16, x1);
        } else {
            _mm512_storeu_ps((float *)dst, x0);
            _mm512_storeu_ps((float *)dst + 16, x1);
        }
        return;
    }
    __m256i h0, h1;
    if (dtype == TRTSHIM_FLOAT16) {
        h0 = _mm512_cvtps_ph(x0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        h1 = _mm512_cvtps_ph(x1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        h0 = avx512_to_bfloat(x0);
        h1 = avx512_to_bfloat(x1);
    }
    __m512i row = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
    if (nt) _mm512_stream_si512((__m512i *)dst, row);
    else _mm512_storeu_si512(dst, row);
}

/* In-register transpose of 16 x 16 floats: r[i] lane j becomes r[j] lane i. */
AVX512_TARGET INLINE void avx512_transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + c], 128-bit lane j: column 4j + c of rows 4i .. 4i + 3 */
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) { /* a 4 x 4 transpose of 128-bit lanes over the row groups */
        __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
        __m512 x2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), x3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_f32x4(x0, x2, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(x0, x2, 0xdd);
        r[8 + c] = _mm512_shuffle_f32x4(x1, x3, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(x1, x3, 0xdd);
    }
}

AVX512_TARGET static void avx512_pack_panels(const float *b, int b_transposed, int64_t ldb, int64_t K,
                                             int64_t first_panel, int64_t panels, trtshim_dtype dtype, void *packed,
                                             int nt) {
    size_t element = weight_size(dtype), row_bytes = GEMM_NR * element;
    char *out = (char *)packed + (size_t)first_panel * (size_t)K * row_bytes;
    if (!b_transposed) {
        for (int64_t k0 = 0; k0 < K; k0 += PACK_ROWS) {
            int64_t rows = K - k0 < PACK_ROWS ? K - k0 : PACK_ROWS;
            for (int64_t p = 0; p < panels; p++) {
                char *dst = out + ((size_t)p * (size_t)K + (size_t)k0) * row_bytes;
                const float *src = b + k0 * ldb + p * GEMM_NR;
                for (int64_t k = 0; k < rows; k++)
                    avx512_emit_row(_mm512_loadu_ps(src + k * ldb), _mm512_loadu_ps(src + k * ldb + 16), dtype,
                                    dst + (size_t)k * row_bytes, nt);
            }
        }
        return;
    }
    /* Source rows are columns: PACK_KT k at a time (a run of each source row long enough for the hardware
       prefetcher), as 16 x 16 transposes into an L1 block, then PACK_KT packed rows. */
    float block[PACK_KT * GEMM_NR] __attribute__((aligned(64)));
    for (int64_t p = 0; p < panels; p++) {
        const float *src = b + p * GEMM_NR * ldb;
        char *dst = out + (size_t)p * (size_t)K * row_bytes;
        for (int64_t k0 = 0; k0 < K; k0 += PACK_KT) {
            int64_t rows = K - k0 < PACK_KT ? K - k0 : PACK_KT;
            /* the next visit's run of every source row: 32 streams are more than the prefetcher follows */
            if (k0 + PACK_KT < K)
                for (int l = 0; l < GEMM_NR; l++)
                    for (int64_t k = 0; k < PACK_KT && k0 + PACK_KT + k < K; k += 16)
                        _mm_prefetch((const char *)(src + l * ldb + k0 + PACK_KT + k), _MM_HINT_T0);
            for (int64_t k1 = 0; k1 < rows; k1 += 16) {
                __mmask16 mask = rows - k1 >= 16 ? 0xffff : (__mmask16)((1u << (rows - k1)) - 1);
                for (int half = 0; half < 2; half++) {
                    __m512 r[16];
                    for (int l = 0; l < 16; l++)
                        r[l] = _mm512_maskz_loadu_ps(mask, src + (half * 16 + l) * ldb + k0 + k1);
                    avx512_transpose16(r);
                    for (int k = 0; k < 16; k++) _mm512_store_ps(block + (k1 + k) * GEMM_NR + half * 16, r[k]);
                }
            }
            for (int64_t k = 0; k < rows; k++)
                avx512_emit_row(_mm512_load_ps(block + k * GEMM_NR), _mm512_load_ps(block + k * GEMM_NR + 16), dtype,
                                dst + (size_t)(k0 + k) * row_bytes, nt);
        }
    }
}

/* float32 -> bfloat16 of 8 lanes (as avx512_to_bfloat), in the low 16 bits of each 32-bit lane. */
AVX2_TARGET INLINE __m256i avx2_to_bfloat32(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m256i quieted = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    /* signed compare is right here: both sides are below 2^31 */
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, quieted, nan);
}

/* 16 lanes (x0: 0-7, x1: 8-15) rounded to a 16-bit dtype, in order. */
AVX2_TARGET INLINE __m256i avx2_to_16bit(__m256 x0, __m256 x1, trtshim_dtype dtype) {
    if (dtype == TRTSHIM_FLOAT16)
        return _mm256_set_m128i(_mm256_cvtps_ph(x1, _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(x0, _MM_FROUND_TO_NEAREST_INT));
    /* packus interleaves the 128-bit halves; the permute puts x0's 8 values before x1's */
    __m256i mixed = _mm256_packus_epi32(avx2_to_bfloat32(x0), avx2_to_bfloat32(x1));
    return _mm256_permute4x64_epi64(mixed, 0xd8);
}

/* One packed row of 32 lanes from x[0..3] (8 lanes each). */
AVX2_TARGET INLINE void avx2_emit_row(const __m256 x[4], trtshim_dtype dtype, void *dst, int nt) {
    if (dtype == TRTSHIM_FLOAT32) {
        for (int v = 0; v < 4; v++) {
            if (nt) _mm256_stream_ps((float *)dst + 8 * v, x[v]);
            else _mm256_storeu_ps((float *)dst + 8 * v, x[v]);
        }
        return;
    }
    for (int v = 0; v < 2; v++) {
        __m256i h = avx2_to_16bit(x[2 * v], x[2 * v + 1], dtype);
        if (nt) _mm256_stream_si256((__m256i *)((uint16_t *)dst + 16 * v), h);
        else _mm256_storeu_si256((__m256i *)((uint16_t *)dst + 16 * v), h);
    }
}

/* In-register transpose of 8 x 8 floats. */
AVX2_TARGET INLINE void avx2_transpose8(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) { /* s[4i + c], 128-bit lane j: column 4j + c of rows 4i .. 4i + 3 */
        __m256d a = _mm256_castps_pd(t[4 * i]), b = _mm256_castps_pd(t[4 * i + 1]);
        __m256d c = _mm256_castps_pd(t[4 * i + 2]), d = _mm256_castps_pd(t[4 * i + 3]);
        s[4 * i + 0] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
        s[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
        s[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
        s[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
}

AVX2_TARGET static void avx2_pack_panels(const float *b, int b_transposed, int64_t ldb, int64_t K,
                                         int64_t first_panel, int64_t panels, trtshim_dtype dtype, void *packed,
                                         int nt) {
    size_t element = weight_size(dtype), row_bytes = GEMM_NR * element;
    char *out = (char *)packed + (size_t)first_panel * (size_t)K * row_bytes;
    if (!b_transposed) {
        for (int64_t k0 = 0; k0 < K; k0 += PACK_ROWS) {
            int64_t rows = K - k0 < PACK_ROWS ? K - k0 : PACK_ROWS;
            for (int64_t p = 0; p < panels; p++) {
                char *dst = out + ((size_t)p * (size_t)K + (size_t)k0) * row_bytes;
                const float *src = b + k0 * ldb + p * GEMM_NR;
                for (int64_t k = 0; k < rows; k++) {
                    __m256 x[4];
                    for (int v = 0; v < 4; v++) x[v] = _mm256_loadu_ps(src + k * ldb + 8 * v);
                    avx2_emit_row(x, dtype, dst + (size_t)k * row_bytes, nt);
                }
            }
        }
        return;
    }
    /* 8 k at a time: four 8 x 8 transposes make 8 packed rows; a K tail is gathered element by element. */
    float block[8 * GEMM_NR] __attribute__((aligned(32)));
    for (int64_t p = 0; p < panels; p++) {
        const float *src = b + p * GEMM_NR * ldb;
        char *dst = out + (size_t)p * (size_t)K * row_bytes;
        for (int64_t k0 = 0; k0 < K; k0 += 8) {
            int64_t rows = K - k0 < 8 ? K - k0 : 8;
            if (rows == 8) {
                for (int quarter = 0; quarter < 4; quarter++) {
                    __m256 r[8];
                    for (int l = 0; l < 8; l++) r[l] = _mm256_loadu_ps(src + (quarter * 8 + l) * ldb + k0);
                    avx2_transpose8(r);
                    for (int k = 0; k < 8; k++) _mm256_store_ps(block + k * GEMM_NR + quarter * 8, r[k]);
                }
            } else {
                for (int l = 0; l < GEMM_NR; l++)
                    for (int64_t k = 0; k < rows; k++) block[k * GEMM_NR + l] = src[l * ldb + k0 + k];
            }
            for (int64_t k = 0; k < rows; k++) {
                __m256 x[4];
                for (int v = 0; v < 4; v++) x[v] = _mm256_load_ps(block + k * GEMM_NR + 8 * v);
                avx2_emit_row(x, dtype, dst + (size_t)(k0 + k) * row_bytes, nt);
            }
        }
    }
}

static void store_fence(void) { _mm_sfence(); }
#define AVX512_PACKER avx512_pack_panels
#define AVX2_PACKER avx2_pack_panels
#else
static void store_fence(void) {}
#define AVX512_PACKER NULL
#define AVX2_PACKER NULL
#endif

static int has_nothing(void) { return 1; }

static const struct {
    const char *name;
    int (*supported)(void);
    panel_packer pack; /* NULL: the scalar path */
} pack_paths[GEMM_PACK_PATH_COUNT] = {
    {"scalar", has_nothing, NULL},
    {"avx2", has_avx2, AVX2_PACKER},
    {"avx512", has_avx512, AVX512_PACKER},
};

const char *gemm_pack_path_name(int path) { return path >= 0 && path < GEMM_PACK_PATH_COUNT ? pack_paths[path].name : "?"; }

int gemm_pack_path_supported(int path) {
    return path >= 0 && path < GEMM_PACK_PATH_COUNT && (path == GEMM_PACK_SCALAR || pack_paths[path].pack) &&
           pack_paths[path].supported();
}

static int best_pack_path(void) {
    int path = GEMM_PACK_PATH_COUNT - 1;
    while (path > 0 && !gemm_pack_path_supported(path)) path--;
    return path;
}

void gemm_pack_columns_path(int path, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                            int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed) {
    if (!packed || weight_size(weight_dtype) == 0 || K < 0 || N < 0 || n_begin < 0 || n_count < 0 ||
        n_begin + n_count > N || (n_count > 0 && K > 0 && !b))
        return;
    if (path == GEMM_PACK_AUTO || !gemm_pack_path_supported(path)) path = best_pack_path();
    panel_packer fast = pack_paths[path].pack;
    /* Whole panels [whole_begin, whole_end) in columns go to the vector path; the ragged ends to scalar. */
    int64_t whole_begin = (n_begin + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    int64_t whole_end = (n_begin + n_count) / GEMM_NR * GEMM_NR;
    if (!fast || K == 0 || whole_end <= whole_begin) {
        pack_columns_scalar(b, b_transposed, ldb, K, n_begin, n_count, weight_dtype, packed);
    } else {
        int64_t head = whole_begin - n_begin, tail = n_begin + n_count - whole_end;
        const float *whole = b_transposed ? b + head * ldb : b + head;
        const float *after = b_transposed ? b + (whole_end - n_begin) * ldb : b + (whole_end - n_begin);
        pack_columns_scalar(b, b_transposed, ldb, K, n_begin, head, weight_dtype, packed);
        size_t bytes = (size_t)(whole_end - whole_begin) * (size_t)K * weight_size(weight_dtype);
        int nt = bytes >= PACK_NT_BYTES && ((uintptr_t)packed & 63) == 0;
        fast(whole, b_transposed, ldb, K, whole_begin / GEMM_NR, (whole_end - whole_begin) / GEMM_NR, weight_dtype,
             packed, nt);
        if (nt) store_fence();
        pack_columns_scalar(after, b_transposed, ldb, K, whole_end, tail, weight_dtype, packed);
    }
    /* The call that packs the last column also zeroes the padding lanes (zero bits are 0.0 in every
       weight dtype), so range-by-range packing writes the same bytes as one whole packing. */
    if (n_begin + n_count == N && N % GEMM_NR != 0) {
        size_t element = weight_size(weight_dtype), lane = (size_t)(N % GEMM_NR);
        char *panel = (char *)packed + (size_t)(N / GEMM_NR) * (size_t)K * GEMM_NR * element;
        for (int64_t k = 0; k < K; k++) memset(panel + ((size_t)k * GEMM_NR + lane) * element, 0, (GEMM_NR - lane) * element);
    }
}

void gemm_pack_columns(int tactic, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                       int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed) {
    gemm_pack_columns_path(GEMM_PACK_AUTO, b, b_transposed, ldb, K, N, n_begin, n_count, weight_dtype, packed);
}

/* Threaded packing: whole panels per piece of work, so no two threads write the same panel row. */
typedef struct {
    const float *b;
    int b_transposed;
    int64_t ldb, K, N, n_begin, n_count, pieces, columns_per_piece;
    trtshim_dtype weight_dtype;
    void *packed;
    int path;
} pack_job;

static void pack_pieces(void *context, int64_t begin, int64_t end) {
    const pack_job *job = context;
    int64_t first = job->n_begin / GEMM_NR * GEMM_NR; /* the panel boundary at or before n_begin */
    for (int64_t piece = begin; piece < end; piece++) {
        int64_t lo = first + piece * job->columns_per_piece, hi = lo + job->columns_per_piece;
        if (lo < job->n_begin) lo = job->n_begin;
        if (hi > job->n_begin + job->n_count) hi = job->n_begin + job->n_count;
        if (hi <= lo) continue;
        int64_t offset = lo - job->n_begin;
        const float *b = job->b_transposed ? job->b + offset * job->ldb : job->b + offset;
        gemm_pack_columns_path(job->path, b, job->b_transposed, job->ldb, job->K, job->N, lo, hi - lo, job->weight_dtype,
                          job->packed);
    }
}

void gemm_pack_columns_mt(int tactic, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                          int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed, int num_threads) {
    if (!packed || weight_size(weight_dtype) == 0 || K < 0 || N < 0 || n_begin < 0 || n_count < 0 ||
        n_begin + n_count > N || (n_count > 0 && K > 0 && !b))
        return;
    /* About 1 MiB of float32 input per piece at least, and a few pieces per thread to even out the load. */
    int64_t panels = (n_begin + n_count + GEMM_NR - 1) / GEMM_NR - n_begin / GEMM_NR;
    int64_t panel_bytes = K * GEMM_NR * (int64_t)sizeof(float);
    int64_t by_size = panel_bytes > 0 ? (int64_t)(262144 * sizeof(float)) / panel_bytes : panels;
    int64_t panels_per_piece = by_size < 1 ? 1 : by_size;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (panels_per_piece * 4 * threads > panels) panels_per_piece = panels / (4 * (int64_t)threads);
    if (panels_per_piece < 1) panels_per_piece = 1;
    pack_job job = {b, b_transposed, ldb, K, N, n_begin, n_count, 0, panels_per_piece * GEMM_NR, weight_dtype, packed,
                   GEMM_PACK_AUTO};
    job.pieces = (panels + panels_per_piece - 1) / panels_per_piece;
    if (threads <= 1 || job.pieces <= 1 || (double)n_count * (double)K < 65536.0) {
        gemm_pack_columns(tactic, b, b_transposed, ldb, K, N, n_begin, n_count, weight_dtype, packed);
        return;
    }
    parallel_for(job.pieces, threads, pack_pieces, &job);
}

/* ---- quantized weights ---------------------------------------------------------------------------- */

int gemm_quant_format_valid(gemm_quant_format format) {
    switch (format.kind) {
    case GEMM_QUANT_INT8:
    case GEMM_QUANT_FP8_E4M3: return 1;
    case GEMM_QUANT_INT4: return format.group_size == 32 || format.group_size == 64 || format.group_size == 128;
    default: return 0;
    }
}

int64_t gemm_quant_groups(gemm_quant_format format, int64_t K) {
    if (format.kind != GEMM_QUANT_INT4) return 1;
    return K > 0 ? (K + format.group_size - 1) / format.group_size : 0;
}

/* Bytes of a packed row of 32 values, and where the scales start. */
static size_t quant_row_bytes(gemm_quant_format format) { return format.kind == GEMM_QUANT_INT4 ? 16 : 32; }
static size_t quant_scales_offset(gemm_quant_format format, int64_t K, int64_t N) {
    size_t values = (size_t)panel_count(N) * (size_t)K * quant_row_bytes(format);
    return (values + 63) / 64 * 64;
}

size_t gemm_quant_packed_bytes(gemm_quant_format format, int64_t K, int64_t N) {
    if (!gemm_quant_format_valid(format) || K < 0 || N < 0) return 0;
    size_t scales = (size_t)panel_count(N) * GEMM_NR * (size_t)gemm_quant_groups(format, K) * sizeof(float);
    return quant_scales_offset(format, K, N) + scales;
}

/* Scale g of column n: INT8 / FP8 [panels * 32]; INT4 per panel [groups][32], so a panel's are together. */
static size_t quant_scale_index(int64_t groups, int64_t n, int64_t g) {
    return ((size_t)(n / GEMM_NR) * (size_t)groups + (size_t)g) * GEMM_NR + (size_t)(n % GEMM_NR);
}

/* e4m3 code -> float32, exact. Normals: exponent rebiased from 7 to 127; subnormals: m * 2^-9 through an
   integer conversion (independent of the denormals-are-zero mode). */
static float e4m3_to_float(uint8_t code) {
    uint32_t exponent = (code >> 3) & 15, mantissa = code & 7;
    float magnitude;
    if ((code & 0x7f) == 0x7f) magnitude = NAN;
    else if (exponent == 0) magnitude = (float)mantissa * 0x1p-9f;
    else magnitude = bits_float(((exponent + 120) << 23) | (mantissa << 20));
    return code & 0x80 ? -magnitude : magnitude;
}

/* float32 (finite) -> e4m3, round to nearest even, saturated at +-448. Normals: round the float32 bits at
   the third mantissa bit (a carry runs into the exponent, as it should), then rebias the exponent from 127
   to 7; below 2^-6 the e4m3 subnormals are multiples of 2^-9. */
static uint8_t float_to_e4m3(float x) {
    uint8_t sign = signbit(x) ? 0x80 : 0;
    float a = fabsf(x);
    if (a > 448.0f) a = 448.0f;
    if (a < 0x1p-6f) return (uint8_t)(sign | (uint8_t)nearbyintf(a * 512.0f)); /* 8 -> 0x08 = 2^-6: right */
    uint32_t u = float_bits(a);
    u += 0x7ffff + ((u >> 20) & 1);
    return (uint8_t)(sign | ((u >> 20) - (120u << 3)));
}

static float quant_value(gemm_quant_format format, int32_t q) {
    return format.kind == GEMM_QUANT_FP8_E4M3 ? e4m3_to_float((uint8_t)q) : (float)q;
}

/* Packed value of (k, n), as the int8 or e4m3 code it stands for. */
static int32_t quant_load(gemm_quant_format format, const unsigned char *values, int64_t K, int64_t k, int64_t n) {
    size_t row = ((size_t)(n / GEMM_NR) * (size_t)K + (size_t)k) * quant_row_bytes(format);
    int lane = (int)(n % GEMM_NR);
    if (format.kind == GEMM_QUANT_INT4) {
        int nibble = (values[row + lane % 16] >> (lane >= 16 ? 4 : 0)) & 15;
        return (nibble ^ 8) - 8;
    }
    return format.kind == GEMM_QUANT_INT8 ? (int32_t)(int8_t)values[row + lane] : (int32_t)values[row + lane];
}

static void quant_store(gemm_quant_format format, unsigned char *values, int64_t K, int64_t k, int64_t n, int32_t q) {
    size_t row = ((size_t)(n / GEMM_NR) * (size_t)K + (size_t)k) * quant_row_bytes(format);
    int lane = (int)(n % GEMM_NR);
    if (format.kind == GEMM_QUANT_INT4) {
        unsigned char *byte = values + row + lane % 16;
        int shift = lane >= 16 ? 4 : 0;
        *byte = (unsigned char)((*byte & ~(15 << shift)) | ((q & 15) << shift));
    } else {
        values[row + lane] = (unsigned char)q;
    }
}

float gemm_quant_weight(gemm_quant_format format, const void *packed, int64_t K, int64_t N, int64_t k, int64_t n) {
    if (!gemm_quant_format_valid(format) || !packed || k < 0 || k >= K || n < 0 || n >= N) return NAN;
    int64_t groups = gemm_quant_groups(format, K), g = format.kind == GEMM_QUANT_INT4 ? k / format.group_size : 0;
    const float *scales = (const float *)((const char *)packed + quant_scales_offset(format, K, N));
    return quant_value(format, quant_load(format, packed, K, k, n)) * scales[quant_scale_index(groups, n, g)];
}

/* Where value (k, j) and scale (g, j) of column j live in gemm_quant_quantize's layouts. */
static size_t source_index(int b_transposed, int64_t ld, int64_t k, int64_t j) {
    return b_transposed ? (size_t)(j * ld + k) : (size_t)(k * ld + j);
}
static size_t scale_source_index(int b_transposed, int64_t groups, int64_t n_count, int64_t g, int64_t j) {
    return b_transposed ? (size_t)(j * groups + g) : (size_t)(g * n_count + j);
}

static int64_t quant_max_code(gemm_quant_format format) { return format.kind == GEMM_QUANT_INT4 ? 7 : 127; }

/* Quantizes rows [k_begin, k_end) of column j with the scale of that group; returns the scale. */
static float quantize_group(gemm_quant_format format, const float *b, int b_transposed, int64_t ldb, int64_t j,
                            int64_t k_begin, int64_t k_end, void *q_out, int b_q_transposed, int64_t ldq,
                            void (*put)(void *, int64_t, int64_t, int32_t, int, int64_t)) {
    float largest = 0.0f;
    for (int64_t k = k_begin; k < k_end; k++) {
        float a = fabsf(b[source_index(b_transposed, ldb, k, j)]);
        if (a > largest) largest = a;
    }
    float scale = largest / (format.kind == GEMM_QUANT_FP8_E4M3 ? 448.0f : (float)quant_max_code(format));
    for (int64_t k = k_begin; k < k_end; k++) {
        float w = b[source_index(b_transposed, ldb, k, j)];
        int32_t q = 0;
        if (scale > 0.0f) {
            float x = w / scale;
            if (format.kind == GEMM_QUANT_FP8_E4M3) {
                q = float_to_e4m3(x);
            } else {
                float limit = (float)quant_max_code(format), r = nearbyintf(x);
                q = (int32_t)(r > limit ? limit : r < -limit ? -limit : r);
            }
        }
        put(q_out, k, j, q, b_q_transposed, ldq);
    }
    return scale;
}

#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
/* 1 when all of x[0 .. n) are finite. */
AVX512_TARGET static int avx512_all_finite(const float *x, int64_t n) {
    const __m512 largest = _mm512_set1_ps(3.40282347e38f);
    __mmask16 ok = 0xffff;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) ok &= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + i)), largest, _CMP_LE_OQ);
    __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
    ok &= (__mmask16)(_mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + i)), largest, _CMP_LE_OQ) | ~tail);
    return ok == 0xffff;
}
#endif

static int all_finite(const float *x, int64_t n) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
    if (has_avx512()) return avx512_all_finite(x, n);
#endif
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= isfinite(x[i]) != 0;
    return ok;
}

/* The first non-finite value among columns [0, n_count); 0 when all are finite. Scans along memory, and
   looks element by element only at a run that holds one. */
static int find_non_finite(const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t n_count, int64_t *k_bad,
                           int64_t *j_bad) {
    int64_t runs = b_transposed ? n_count : K, length = b_transposed ? K : n_count;
    for (int64_t r = 0; r < runs; r++) {
        if (all_finite(b + r * ldb, length)) continue;
        for (int64_t i = 0; i < length; i++)
            if (!isfinite(b[r * ldb + i])) {
                *k_bad = b_transposed ? i : r, *j_bad = b_transposed ? r : i;
                return 1;
            }
    }
    return 0;
}

static trtshim_status check_quant_arguments(gemm_quant_format format, int64_t K, int64_t N, int64_t n_begin,
                                           int64_t n_count, int64_t ld, int b_transposed, const void *source,
                                           const void *out) {
    if (!gemm_quant_format_valid(format))
        return set_error(TRTSHIM_ERR_ARGUMENT, "quantized weight: format %d with group size %d is not one of int8, "
                         "fp8 e4m3, int4 with groups of 32, 64 or 128", (int)format.kind, (int)format.group_size);
    if (K < 0 || N < 0 || n_begin < 0 || n_count < 0 || n_begin + n_count > N)
        return set_error(TRTSHIM_ERR_ARGUMENT, "quantized weight: columns [%lld, %lld) do not fit K = %lld, N = %lld",
                         (long long)n_begin, (long long)(n_begin + n_count), (long long)K, (long long)N);
    if (ld < (b_transposed ? K : n_count))
        return set_error(TRTSHIM_ERR_ARGUMENT, "quantized weight: row stride %lld is shorter than a row of %lld",
                         (long long)ld, (long long)(b_transposed ? K : n_count));
    if (!out || (K > 0 && n_count > 0 && !source))
        return set_error(TRTSHIM_ERR_ARGUMENT, "quantized weight: null buffer");
    return TRTSHIM_OK;
}

typedef struct {
    gemm_quant_format format;
    unsigned char *values;
    int64_t K, n_begin;
} packed_target;

static void put_plain(void *out, int64_t k, int64_t j, int32_t q, int b_transposed, int64_t ldq) {
    ((unsigned char *)out)[source_index(b_transposed, ldq, k, j)] = (unsigned char)q;
}
static void put_packed(void *out, int64_t k, int64_t j, int32_t q, int b_transposed, int64_t ldq) {
    packed_target *target = out;
    quant_store(target->format, target->values, target->K, k, target->n_begin + j, q);
}

#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
/* 16 lanes of w quantized with their scales, as quantize_group does one value: the int8 / int4 value or
   the e4m3 code, in 32-bit lanes. */
AVX512_TARGET INLINE __m512i avx512_quantize(gemm_quant_kind kind, __m512 w, __m512 scale) {
    __mmask16 live = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ);
    __m512 x = _mm512_maskz_div_ps(live, w, scale); /* +0 where the scale is 0: value 0, code 0 */
    if (kind != GEMM_QUANT_FP8_E4M3) {
        __m512 limit = _mm512_set1_ps(kind == GEMM_QUANT_INT4 ? 7.0f : 127.0f);
        __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_max_ps(_mm512_min_ps(r, limit), _mm512_sub_ps(_mm512_setzero_ps(), limit));
        return _mm512_cvtps_epi32(r);
    }
    __m512i sign = _mm512_srli_epi32(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)), 24);
    __m512 a = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(448.0f));
    __m512i u = _mm512_castps_si512(a);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7ffff), _mm512_and_si512(_mm512_srli_epi32(u, 20),
                                                                                           _mm512_set1_epi32(1))));
    __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(120 << 3));
    __m512i subnormal = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(512.0f)),
                                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-6f), _CMP_LT_OQ);
    return _mm512_or_si512(_mm512_mask_blend_epi32(small, normal, subnormal), sign);
}

/* One packed row from 32 quantized lanes. */
AVX512_TARGET INLINE void avx512_store_quantized(gemm_quant_kind kind, __m512i q0, __m512i q1, unsigned char *row) {
    if (kind == GEMM_QUANT_INT4) {
        __m512i fifteen = _mm512_set1_epi32(15);
        __m512i pair = _mm512_or_si512(_mm512_and_si512(q0, fifteen), _mm512_slli_epi32(_mm512_and_si512(q1, fifteen), 4));
        _mm_storeu_si128((__m128i *)row, _mm512_cvtepi32_epi8(pair));
    } else {
        _mm_storeu_si128((__m128i *)row, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(row + 16), _mm512_cvtepi32_epi8(q1));
    }
}

/* Quantizes and packs whole panels (b at the panel's first column), the bytes quantize_group and
   quant_store write one value at a time. K blocks of 16 never straddle an int4 group (groups are
   multiples of 16). */
AVX512_TARGET static void avx512_quant_panels(gemm_quant_format format, const float *b, int b_transposed, int64_t ldb,
                                              int64_t K, int64_t N, int64_t first_panel, int64_t panels, void *packed) {
    int64_t groups = gemm_quant_groups(format, K), rows = format.kind == GEMM_QUANT_INT4 ? format.group_size : K;
    float *scales = (float *)((char *)packed + quant_scales_offset(format, K, N));
    __m512 top = _mm512_set1_ps(format.kind == GEMM_QUANT_FP8_E4M3 ? 448.0f : format.kind == GEMM_QUANT_INT4 ? 7.0f : 127.0f);
    float block[16 * GEMM_NR] __attribute__((aligned(64)));
    float largest[GEMM_NR] __attribute__((aligned(64)));
    for (int64_t p = 0; p < panels; p++) {
        int64_t panel = first_panel + p;
        const float *src = b_transposed ? b + p * GEMM_NR * ldb : b + p * GEMM_NR;
        unsigned char *values = (unsigned char *)packed + (size_t)panel * (size_t)K * quant_row_bytes(format);
        for (int64_t g = 0; g < groups; g++) {
            int64_t k_begin = g * rows, k_end = k_begin + rows < K ? k_begin + rows : K;
            __m512 max0 = _mm512_setzero_ps(), max1 = _mm512_setzero_ps();
            if (b_transposed) {
                for (int l = 0; l < GEMM_NR; l++) {
                    __m512 m = _mm512_setzero_ps();
                    for (int64_t k = k_begin; k < k_end; k += 16) {
                        __mmask16 mask = k_end - k >= 16 ? 0xffff : (__mmask16)((1u << (k_end - k)) - 1);
                        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, src + l * ldb + k)));
                    }
                    largest[l] = _mm512_reduce_max_ps(m);
                }
                max0 = _mm512_load_ps(largest), max1 = _mm512_load_ps(largest + 16);
            } else {
                for (int64_t k = k_begin; k < k_end; k++) {
                    max0 = _mm512_max_ps(max0, _mm512_abs_ps(_mm512_loadu_ps(src + k * ldb)));
                    max1 = _mm512_max_ps(max1, _mm512_abs_ps(_mm512_loadu_ps(src + k * ldb + 16)));
                }
            }
            __m512 scale0 = _mm512_div_ps(max0, top), scale1 = _mm512_div_ps(max1, top);
            float *scale_out = scales + quant_scale_index(groups, panel * GEMM_NR, g);
            _mm512_storeu_ps(scale_out, scale0), _mm512_storeu_ps(scale_out + 16, scale1);
            for (int64_t k0 = k_begin; k0 < k_end; k0 += 16) {
                int64_t kr = k_end - k0 < 16 ? k_end - k0 : 16;
                if (b_transposed) {
                    __mmask16 mask = kr == 16 ? 0xffff : (__mmask16)((1u << kr) - 1);
                    for (int half = 0; half < 2; half++) {
                        __m512 r[16];
                        for (int l = 0; l < 16; l++) r[l] = _mm512_maskz_loadu_ps(mask, src + (half * 16 + l) * ldb + k0);
                        avx512_transpose16(r);
                        for (int k = 0; k < 16; k++) _mm512_store_ps(block + k * GEMM_NR + half * 16, r[k]);
                    }
                }
                for (int64_t k = 0; k < kr; k++) {
                    const float *row = b_transposed ? block + k * GEMM_NR : src + (k0 + k) * ldb;
                    __m512i q0 = avx512_quantize(format.kind, _mm512_loadu_ps(row), scale0);
                    __m512i q1 = avx512_quantize(format.kind, _mm512_loadu_ps(row + 16), scale1);
                    avx512_store_quantized(format.kind, q0, q1, values + (size_t)(k0 + k) * quant_row_bytes(format));
                }
            }
        }
    }
}
#endif

trtshim_status gemm_quant_quantize(gemm_quant_format format, const float *b, int b_transposed, int64_t ldb, int64_t K,
                                   int64_t n_count, void *q, int64_t ldq, float *scales) {
    trtshim_status status = check_quant_arguments(format, K, n_count, 0, n_count, ldb, b_transposed, b, q);
    if (status != TRTSHIM_OK) return status;
    if (!scales || ldq < (b_transposed ? K : n_count))
        return set_error(TRTSHIM_ERR_ARGUMENT, "quantized weight: no scales, or value row stride %lld too short",
                         (long long)ldq);
    int64_t k_bad, j_bad;
    if (find_non_finite(b, b_transposed, ldb, K, n_count, &k_bad, &j_bad))
        return set_error(TRTSHIM_ERR_VALIDATION, "quantizing a weight: value at row %lld of column %lld is %g, "
                         "expected a finite number", (long long)k_bad, (long long)j_bad,
                         (double)b[source_index(b_transposed, ldb, k_bad, j_bad)]);
    int64_t groups = gemm_quant_groups(format, K), rows = format.kind == GEMM_QUANT_INT4 ? format.group_size : K;
    for (int64_t j = 0; j < n_count; j++)
        for (int64_t g = 0; g < groups; g++) {
            int64_t k_end = (g + 1) * rows < K ? (g + 1) * rows : K;
            scales[scale_source_index(b_transposed, groups, n_count, g, j)] =
                quantize_group(format, b, b_transposed, ldb, j, g * rows, k_end, q, b_transposed, ldq, put_plain);
        }
    return TRTSHIM_OK;
}

/* The last range zeroes the padding lanes' values and scales, as gemm_pack_columns does, and the bytes
   between the values and the 64-byte aligned scales, so that every byte of the buffer is defined. */
static void quant_zero_padding(gemm_quant_format format, void *packed, int64_t K, int64_t N) {
    size_t values = (size_t)panel_count(N) * (size_t)K * quant_row_bytes(format);
    memset((char *)packed + values, 0, quant_scales_offset(format, K, N) - values);
    if (N % GEMM_NR == 0) return;
    int64_t groups = gemm_quant_groups(format, K);
    float *scales = (float *)((char *)packed + quant_scales_offset(format, K, N));
    for (int64_t n = N; n < panel_count(N) * GEMM_NR; n++) {
        for (int64_t k = 0; k < K; k++) quant_store(format, packed, K, k, n, 0);
        for (int64_t g = 0; g < groups; g++) scales[quant_scale_index(groups, n, g)] = 0.0f;
    }
}

trtshim_status gemm_quant_pack_columns(gemm_quant_format format, const float *b, int b_transposed, int64_t ldb,
                                       int64_t K, int64_t N, int64_t n_begin, int64_t n_count, void *packed) {
    trtshim_status status = check_quant_arguments(format, K, N, n_begin, n_count, ldb, b_transposed, b, packed);
    if (status != TRTSHIM_OK) return status;
    int64_t k_bad, j_bad;
    if (find_non_finite(b, b_transposed, ldb, K, n_count, &k_bad, &j_bad))
        return set_error(TRTSHIM_ERR_VALIDATION, "quantizing a weight: value at row %lld of column %lld is %g, "
                         "expected a finite number", (long long)k_bad, (long long)(n_begin + j_bad),
                         (double)b[source_index(b_transposed, ldb, k_bad, j_bad)]);
    int64_t groups = gemm_quant_groups(format, K), rows = format.kind == GEMM_QUANT_INT4 ? format.group_size : K;
    float *scales = (float *)((char *)packed + quant_scales_offset(format, K, N));
    packed_target target = {format, packed, K, n_begin};
    /* Whole panels go to the vector path where there is one; every other column to the scalar one. */
    int64_t whole_begin = n_count, whole_end = n_count;
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
    if (has_avx512() && K > 0) {
        whole_begin = (n_begin + GEMM_NR - 1) / GEMM_NR * GEMM_NR - n_begin;
        whole_end = (n_begin + n_count) / GEMM_NR * GEMM_NR - n_begin;
        if (whole_end > whole_begin)
            avx512_quant_panels(format, b_transposed ? b + whole_begin * ldb : b + whole_begin, b_transposed, ldb, K, N,
                                (n_begin + whole_begin) / GEMM_NR, (whole_end - whole_begin) / GEMM_NR, packed);
        else
            whole_begin = whole_end = n_count;
    }
#endif
    for (int64_t j = 0; j < n_count; j++)
        for (int64_t g = 0; g < groups && (j < whole_begin || j >= whole_end); g++) {
            int64_t k_end = (g + 1) * rows < K ? (g + 1) * rows : K;
            scales[quant_scale_index(groups, n_begin + j, g)] =
                quantize_group(format, b, b_transposed, ldb, j, g * rows, k_end, &target, 0, 0, put_packed);
        }
    if (n_begin + n_count == N) quant_zero_padding(format, packed, K, N);
    return TRTSHIM_OK;
}

trtshim_status gemm_quant_pack_quantized(gemm_quant_format format, const void *q, const float *scales, int b_transposed,
                                         int64_t ldq, int64_t K, int64_t N, int64_t n_begin, int64_t n_count,
                                         void *packed) {
    trtshim_status status = check_quant_arguments(format, K, N, n_begin, n_count, ldq, b_transposed, q, packed);
    if (status != TRTSHIM_OK) return status;
    int64_t groups = gemm_quant_groups(format, K);
    if (!scales && n_count > 0 && groups > 0) return set_error(TRTSHIM_ERR_ARGUMENT, "quantized weight: no scales");
    const unsigned char *bytes = q;
    /* Everything is checked before anything is written. */
    for (int64_t j = 0; j < n_count; j++) {
        for (int64_t g = 0; g < groups; g++) {
            float scale = scales[scale_source_index(b_transposed, groups, n_count, g, j)];
            if (!isfinite(scale) || scale < 0.0f)
                return set_error(TRTSHIM_ERR_VALIDATION, "quantized weight: scale %lld of column %lld is %g, expected "
                                 "a finite number >= 0", (long long)g, (long long)(n_begin + j), (double)scale);
        }
        for (int64_t k = 0; k < K; k++) {
            unsigned char byte = bytes[source_index(b_transposed, ldq, k, j)];
            int bad = format.kind == GEMM_QUANT_FP8_E4M3 ? (byte & 0x7f) == 0x7f
                      : format.kind == GEMM_QUANT_INT4   ? ((int8_t)byte < -8 || (int8_t)byte > 7)
                                                         : 0;
            if (bad)
                return set_error(TRTSHIM_ERR_VALIDATION, "quantized weight: value at row %lld of column %lld is %s %d, "
                                 "expected %s", (long long)k, (long long)(n_begin + j),
                                 format.kind == GEMM_QUANT_FP8_E4M3 ? "e4m3 code" : "int4", format.kind ==
                                 GEMM_QUANT_FP8_E4M3 ? (int)byte : (int)(int8_t)byte,
                                 format.kind == GEMM_QUANT_FP8_E4M3 ? "a finite value (not 0x7f or 0xff)"
                                                                    : "a value in [-8, 7]");
        }
    }
    float *packed_scales = (float *)((char *)packed + quant_scales_offset(format, K, N));
    for (int64_t j = 0; j < n_count; j++) {
        for (int64_t g = 0; g < groups; g++)
            packed_scales[quant_scale_index(groups, n_begin + j, g)] =
                scales[scale_source_index(b_transposed, groups, n_count, g, j)];
        for (int64_t k = 0; k < K; k++) {
            unsigned char byte = bytes[source_index(b_transposed, ldq, k, j)];
            quant_store(format, packed, K, k, n_begin + j,
                        format.kind == GEMM_QUANT_FP8_E4M3 ? (int32_t)byte : (int32_t)(int8_t)byte);
        }
    }
    if (n_begin + n_count == N) quant_zero_padding(format, packed, K, N);
    return TRTSHIM_OK;
}

/* Widens rows [k0, k0 + kc) of panel `panel` into float32 rows of 32 (what the float32 micro-kernels read):
   out[k * 32 + l] = value * scale, exactly as gemm_quant_weight computes it. */
static void dequantize_panel_scalar(gemm_quant_format format, const void *packed, int64_t K, int64_t N, int64_t panel,
                                    int64_t k0, int64_t kc, float *out) {
    int64_t groups = gemm_quant_groups(format, K);
    const float *scales = (const float *)((const char *)packed + quant_scales_offset(format, K, N));
    for (int64_t k = 0; k < kc; k++) {
        int64_t g = format.kind == GEMM_QUANT_INT4 ? (k0 + k) / format.group_size : 0;
        for (int l = 0; l < GEMM_NR; l++) {
            int64_t n = panel * GEMM_NR + l;
            out[k * GEMM_NR + l] = quant_value(format, quant_load(format, packed, K, k0 + k, n)) *
                                   scales[quant_scale_index(groups, n, g)];
        }
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
/* 16 e4m3 codes (in 32-bit lanes) -> float32, the values of e4m3_to_float. */
AVX512_TARGET INLINE __m512 avx512_e4m3(__m512i code) {
    __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(code, 3), _mm512_set1_epi32(15));
    __m512i mantissa = _mm512_and_si512(code, _mm512_set1_epi32(7));
    __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, _mm512_set1_epi32(120)), 23),
                                     _mm512_slli_epi32(mantissa, 20));
    __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mantissa), _mm512_set1_ps(0x1p-9f));
    __mmask16 is_subnormal = _mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512());
    __m512 magnitude = _mm512_mask_blend_ps(is_subnormal, _mm512_castsi512_ps(normal), subnormal);
    __mmask16 is_nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(code, _mm512_set1_epi32(0x7f)), _mm512_set1_epi32(0x7f));
    magnitude = _mm512_mask_blend_ps(is_nan, magnitude, _mm512_set1_ps(NAN));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
}

AVX512_TARGET static void dequantize_panel_avx512(gemm_quant_format format, const void *packed, int64_t K, int64_t N,
                                                  int64_t panel, int64_t k0, int64_t kc, float *out) {
    int64_t groups = gemm_quant_groups(format, K);
    const float *scales = (const float *)((const char *)packed + quant_scales_offset(format, K, N));
    const unsigned char *rows = (const unsigned char *)packed + (size_t)panel * (size_t)K * quant_row_bytes(format);
    int64_t group = -1;
    __m512 scale0 = _mm512_setzero_ps(), scale1 = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        int64_t g = format.kind == GEMM_QUANT_INT4 ? (k0 + k) / format.group_size : 0;
        if (g != group) {
            const float *s = scales + quant_scale_index(groups, panel * GEMM_NR, g);
            scale0 = _mm512_loadu_ps(s), scale1 = _mm512_loadu_ps(s + 16), group = g;
        }
        const unsigned char *row = rows + (size_t)(k0 + k) * quant_row_bytes(format);
        __m512 v0, v1;
        if (format.kind == GEMM_QUANT_INT4) {
            __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row));
            __m512i eight = _mm512_set1_epi32(8), fifteen = _mm512_set1_epi32(15);
            __m512i low = _mm512_sub_epi32(_mm512_xor_si512(_mm512_and_si512(x, fifteen), eight), eight);
            __m512i high = _mm512_sub_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 4), eight), eight);
            v0 = _mm512_cvtepi32_ps(low), v1 = _mm512_cvtepi32_ps(high);
        } else if (format.kind == GEMM_QUANT_INT8) {
            v0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)row)));
            v1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 16))));
        } else {
            v0 = avx512_e4m3(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)row)));
            v1 = avx512_e4m3(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16))));
        }
        _mm512_storeu_ps(out + k * GEMM_NR, _mm512_mul_ps(v0, scale0));
        _mm512_storeu_ps(out + k * GEMM_NR + 16, _mm512_mul_ps(v1, scale1));
    }
}
#endif

static void dequantize_panel(gemm_quant_format format, const void *packed, int64_t K, int64_t N, int64_t panel,
                             int64_t k0, int64_t kc, float *out) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
    if (has_avx512()) {
        dequantize_panel_avx512(format, packed, K, N, panel, k0, kc, out);
        return;
    }
#endif
    dequantize_panel_scalar(format, packed, K, N, panel, k0, kc, out);
}

/* ---- the blocked driver ------------------------------------------------------------------------------ */

/* One GEMM as every path sees it: C = act(op(A) . B + bias), B packed. */
typedef struct {
    int64_t M, N, K;
    const float *a;
    int64_t lda;
    int transpose_a; /* only matmul_f32 sets it */
    const void *packed;
    trtshim_dtype weight_dtype;
    const float *bias;
    trtshim_unary_op act;
    float *c;
    int64_t ldc;
    const tactic_info *tactic;
    int64_t mc, nc, m_blocks; /* tiling chosen by plan_tiles */
    const gemm_quant_format *quant; /* a quantized weight (weight_dtype is then FLOAT32, the kernels') */
} gemm_problem;

static float a_at(const gemm_problem *p, int64_t m, int64_t k) {
    return p->transpose_a ? p->a[k * p->lda + m] : p->a[m * p->lda + k];
}

/* The reference: one output at a time, k in increasing order, fmaf. */
static void scalar_tile(const gemm_problem *p, int64_t m0, int64_t m_count, int64_t n0, int64_t n_count) {
    for (int64_t m = m0; m < m0 + m_count; m++) {
        float *c = p->c + m * p->ldc;
        for (int64_t n = n0; n < n0 + n_count; n++) {
            size_t base = (size_t)(n / GEMM_NR) * (size_t)p->K * GEMM_NR + (size_t)(n % GEMM_NR);
            float acc = 0.0f;
            if (p->quant)
                for (int64_t k = 0; k < p->K; k++)
                    acc = fmaf(a_at(p, m, k), gemm_quant_weight(*p->quant, p->packed, p->K, p->N, k, n), acc);
            else
                for (int64_t k = 0; k < p->K; k++)
                    acc = fmaf(a_at(p, m, k), packed_at(p->packed, p->weight_dtype, base + (size_t)k * GEMM_NR), acc);
            c[n] = p->bias ? acc + p->bias[n] : acc;
        }
        if (p->act != TRTSHIM_UNARY_IDENTITY) unary_apply_n(p->act, c + n0, n_count);
    }
}

/* Per-thread scratch buffers (packed A blocks, matmul's packed B), kept between calls, freed at thread
   exit. Each block starts with its capacity in floats; data follows at SCRATCH_HEADER bytes. */
enum { SCRATCH_A, SCRATCH_B, SCRATCH_Q, SCRATCH_KINDS };
#define SCRATCH_HEADER 64
static pthread_key_t scratch_keys[SCRATCH_KINDS];
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ready;

static void make_scratch_keys(void) {
    for (int i = 0; i < SCRATCH_KINDS; i++)
        if (pthread_key_create(&scratch_keys[i], free) != 0) return;
    scratch_ready = 1;
}

/* NULL when memory is short; callers fall back to the scalar path, which gives the same results. */
static float *scratch(int kind, size_t floats) {
    pthread_once(&scratch_once, make_scratch_keys);
    if (!scratch_ready) return NULL;
    size_t *block = pthread_getspecific(scratch_keys[kind]);
    if (block && block[0] >= floats) return (float *)((char *)block + SCRATCH_HEADER);
    free(block);
    pthread_setspecific(scratch_keys[kind], NULL);
    size_t bytes = SCRATCH_HEADER + (floats * sizeof(float) + 63) / 64 * 64;
    block = aligned_alloc(64, bytes);
    if (!block) return NULL;
    block[0] = floats;
    pthread_setspecific(scratch_keys[kind], block);
    return (float *)((char *)block + SCRATCH_HEADER);
}

/* Rows [m0, m0 + m_count) x K range [k0, k0 + kc) of op(A), as micro-panels of mr rows: the panel of row
   block i starts at dst + i * kc, and holds row r of step k at [k * mr + r]. */
static void pack_a(const gemm_problem *p, int64_t m0, int64_t m_count, int64_t k0, int64_t kc, int mr, float *dst) {
    for (int64_t i0 = 0; i0 < m_count; i0 += mr) {
        int64_t rows = m_count - i0 < mr ? m_count - i0 : mr;
        float *panel = dst + i0 * kc;
        if (!p->transpose_a) {
            for (int64_t r = 0; r < rows; r++) {
                const float *src = p->a + (m0 + i0 + r) * p->lda + k0;
                for (int64_t k = 0; k < kc; k++) panel[k * mr + r] = src[k];
            }
        } else {
            for (int64_t k = 0; k < kc; k++) {
                const float *src = p->a + (k0 + k) * p->lda + m0 + i0;
                for (int64_t r = 0; r < rows; r++) panel[k * mr + r] = src[r];
            }
        }
    }
}

/* A quantized weight is widened, one K block of QUANT_PANELS panels at a time, into float32 panels
   (b_block) that the float32 kernels read; QUANT_PANELS = WIDE_PANELS keeps the wide kernels usable. */
#define QUANT_PANELS WIDE_PANELS

static void blocked_tile(const gemm_problem *p, float *a_block, float *b_block, int64_t m0, int64_t m_count,
                         int64_t n0, int64_t n_count) {
    const tactic_info *t = p->tactic;
    micro_kernel kernel = t->kernels[p->weight_dtype];
    wide_kernel wide = t->wide[p->weight_dtype];
    size_t element = weight_size(p->weight_dtype);
    /* n0 is a panel boundary (tiles are whole panels wide), so chunks of whole panels start on one too. */
    int64_t chunk = p->quant ? QUANT_PANELS * GEMM_NR : n_count;
    for (int64_t k0 = 0; k0 < p->K; k0 += t->kc) {
        int64_t kc = p->K - k0 < t->kc ? p->K - k0 : t->kc;
        int last = k0 + kc == p->K;
        pack_a(p, m0, m_count, k0, kc, t->mr, a_block);
        for (int64_t chunk_begin = 0; chunk_begin < n_count; chunk_begin += chunk) {
            int64_t chunk_end = chunk_begin + chunk < n_count ? chunk_begin + chunk : n_count;
            int64_t panel_stride = p->K * GEMM_NR;
            if (p->quant) {
                for (int64_t c = chunk_begin; c < chunk_end; c += GEMM_NR)
                    dequantize_panel(*p->quant, p->packed, p->K, p->N, (n0 + c) / GEMM_NR, k0, kc,
                                     b_block + (c - chunk_begin) / GEMM_NR * kc * GEMM_NR);
                panel_stride = kc * GEMM_NR;
            }
            for (int64_t j = chunk_begin; j < chunk_end;) {
                int64_t n = n0 + j;
                int cols = (int)(chunk_end - j < t->width ? chunk_end - j : t->width);
                const char *b =
                    p->quant ? (const char *)(b_block + ((j - chunk_begin) / GEMM_NR * kc) * GEMM_NR + n % GEMM_NR)
                             : (const char *)p->packed +
                                   (((size_t)(n / GEMM_NR) * (size_t)p->K + (size_t)k0) * GEMM_NR + (size_t)(n % GEMM_NR)) *
                                       element;
                const float *bias = last && p->bias ? p->bias + n : NULL;
                if (wide && m_count <= WIDE_ROWS && chunk_end - j >= WIDE_PANELS * GEMM_NR && n % GEMM_NR == 0) {
                    float *c = p->c + m0 * p->ldc + n;
                    wide((int)m_count, kc, a_block, t->mr, b, panel_stride, c, p->ldc, k0 > 0, bias);
                    if (last && p->act != TRTSHIM_UNARY_IDENTITY)
                        for (int r = 0; r < m_count; r++) unary_apply_n(p->act, c + r * p->ldc, WIDE_PANELS * GEMM_NR);
                    j += WIDE_PANELS * GEMM_NR;
                    continue;
                }
                for (int64_t i = 0; i < m_count; i += t->mr) {
                    int rows = (int)(m_count - i < t->mr ? m_count - i : t->mr);
                    float *c = p->c + (m0 + i) * p->ldc + n;
                    kernel(rows, kc, a_block + i * kc, t->mr, b, c, p->ldc, cols, k0 > 0, bias);
                    if (last && p->act != TRTSHIM_UNARY_IDENTITY)
                        for (int r = 0; r < rows; r++) unary_apply_n(p->act, c + r * p->ldc, cols);
                }
                j += t->width;
            }
        }
    }
}

/* parallel_for body: tiles [begin, end), m block fastest, so a thread's consecutive tiles share a B block. */
static void run_tiles(void *context, int64_t begin, int64_t end) {
    const gemm_problem *p = context;
    float *a_block = p->tactic->kernels[p->weight_dtype] ? scratch(SCRATCH_A, (size_t)(p->mc * p->tactic->kc)) : NULL;
    float *b_block = a_block && p->quant ? scratch(SCRATCH_Q, (size_t)(QUANT_PANELS * GEMM_NR * p->tactic->kc)) : NULL;
    for (int64_t tile = begin; tile < end; tile++) {
        int64_t m0 = (tile % p->m_blocks) * p->mc, n0 = (tile / p->m_blocks) * p->nc;
        int64_t m_count = p->M - m0 < p->mc ? p->M - m0 : p->mc, n_count = p->N - n0 < p->nc ? p->N - n0 : p->nc;
        if (a_block && (b_block || !p->quant))
            blocked_tile(p, a_block, b_block, m0, m_count, n0, n_count);
        else
            scalar_tile(p, m0, m_count, n0, n_count);
    }
}

static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* Chooses the tile size and the thread count: about 2^20 multiply-adds per thread at least (waking a
   worker costs more than a smaller share saves), and at least 4 tiles per thread when there is enough
   work, made by narrowing tiles over N first (keeps the packed A block reused), then over M. */
static int plan_tiles(gemm_problem *p, int num_threads) {
    const tactic_info *t = p->tactic;
    double work = (double)p->M * (double)p->N * (double)p->K;
    int threads = num_threads < 1 ? 1 : num_threads;
    if ((double)threads > work / 1048576.0 + 1) threads = (int)(work / 1048576.0) + 1;
    int64_t mc = t->mc ? t->mc : 64, nc = t->nc ? t->nc : 256;
    if (mc > round_up(p->M, t->mr)) mc = round_up(p->M, t->mr);
    if (nc > round_up(p->N, GEMM_NR)) nc = round_up(p->N, GEMM_NR);
    for (;;) {
        int64_t tiles = ((p->M + mc - 1) / mc) * ((p->N + nc - 1) / nc);
        if (threads <= 1 || tiles >= 4 * threads) break;
        if (nc > GEMM_NR) nc = round_up(nc / 2, GEMM_NR);
        else if (mc > t->mr) mc = round_up(mc / 2, t->mr);
        else break;
    }
    p->mc = mc;
    p->nc = nc;
    p->m_blocks = (p->M + mc - 1) / mc;
    return threads;
}

/* C = act(0 + bias): the empty sum. */
static void empty_sum(const gemm_problem *p) {
    for (int64_t m = 0; m < p->M; m++) {
        float *c = p->c + m * p->ldc;
        for (int64_t n = 0; n < p->N; n++) c[n] = p->bias ? 0.0f + p->bias[n] : 0.0f;
        if (p->act != TRTSHIM_UNARY_IDENTITY) unary_apply_n(p->act, c, p->N);
    }
}

static void run_problem(gemm_problem *p, int tactic, int num_threads) {
    if (p->K == 0) {
        empty_sum(p);
        return;
    }
    /* An unsupported tactic runs as tactic 0: the same results, only slower. */
    p->tactic = &tactics[gemm_tactic_supported(tactic) ? tactic : 0];
    int threads = plan_tiles(p, num_threads);
    int64_t tiles = p->m_blocks * ((p->N + p->nc - 1) / p->nc);
    parallel_for(tiles, threads, run_tiles, p);
}

void gemm_run(int tactic, int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, const void *packed,
              trtshim_dtype weight_dtype, const float *bias, trtshim_unary_op act, float *c, int64_t ldc,
              int num_threads) {
    if (M <= 0 || N <= 0 || K < 0 || !c || weight_size(weight_dtype) == 0 || (K > 0 && (!a || !packed))) return;
    gemm_problem problem = {M, N, K, a, lda, 0, packed, weight_dtype, bias, act, c, ldc, NULL, 0, 0, 0, NULL};
    run_problem(&problem, tactic, num_threads);
}

void gemm_quant_run(int tactic, gemm_quant_format format, int64_t M, int64_t N, int64_t K, const float *a,
                    int64_t lda, const void *packed, const float *bias, trtshim_unary_op act, float *c, int64_t ldc,
                    int num_threads) {
    if (M <= 0 || N <= 0 || K < 0 || !c || !gemm_quant_format_valid(format) || (K > 0 && (!a || !packed))) return;
    gemm_problem problem = {M, N, K, a, lda, 0, packed, TRTSHIM_FLOAT32, bias, act, c, ldc, NULL, 0, 0, 0, &format};
    run_problem(&problem, tactic, num_threads);
}

/* ---- matmul_f32 ----------------------------------------------------------------------------------- */

/* op(B) is packed into float32 panels (a thread-local buffer) and run through the packed path; without
   memory for that, a direct scalar loop with the same accumulation order. */
void matmul_f32(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, int transpose_a, const float *b,
                int64_t ldb, int transpose_b, float *c, int64_t ldc, int num_threads) {
    if (M <= 0 || N <= 0 || K < 0 || !c || (K > 0 && (!a || !b))) return;
    int tactic = preferred_tactic();
    size_t bytes = gemm_packed_bytes(tactic, K, N, TRTSHIM_FLOAT32);
    float *packed = K > 0 ? scratch(SCRATCH_B, bytes / sizeof(float)) : NULL;
    gemm_problem problem = {M, N, K, a, lda, transpose_a, packed, TRTSHIM_FLOAT32, NULL, TRTSHIM_UNARY_IDENTITY,
                            c, ldc, NULL, 0, 0, 0, NULL};
    if (packed || K == 0) {
        if (packed) gemm_pack_columns(tactic, b, transpose_b, ldb, K, N, 0, N, TRTSHIM_FLOAT32, packed);
        run_problem(&problem, tactic, num_threads);
        return;
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc = fmaf(a_at(&problem, m, k), transpose_b ? b[n * ldb + k] : b[k * ldb + n], acc);
            c[m * ldc + n] = acc;
        }
}
