/* gemm.c: packed-weight GEMM, its tactics, and matmul_f32.
 *
 * Packed layout (every tactic): B is cut into panels of GEMM_NR = 32 columns; panel p holds columns
 * [32p, 32p + 32) as K rows of 32 values (row k of the panel is at ((p * K) + k) * 32), in the weight dtype.
 * Lanes past N in the last panel are zero. A K range of a panel is therefore contiguous, which is what the
 * cache-blocked kernels walk.
 *
 * Numerics (see gemm.h): acc = 0; for k = 0 .. K-1: acc = fma(a[m,k], b[k,n], acc); c = act(acc + bias[n]).
 */
#include "gemm.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

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

/* float32 -> float16 of n values with the F16C instruction: round to nearest even, NaN quieted, the same
   bits as float_to_half. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TRTSHIM_GEMM_PORTABLE)
__attribute__((target("avx,f16c"))) static int64_t halves_f16c(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    return i;
}
static int has_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
#else
static int64_t halves_f16c(uint16_t *dst, const float *src, int64_t n) { return 0; }
static int has_f16c(void) { return 0; }
#endif

/* Stores n values, rounded to the weight dtype, at element `at` of a packed buffer. */
static void store_run(void *packed, trtshim_dtype dtype, size_t at, const float *values, int64_t n) {
    if (dtype == TRTSHIM_FLOAT16) {
        uint16_t *dst = (uint16_t *)packed + at;
        int64_t i = has_f16c() ? halves_f16c(dst, values, n) : 0;
        for (; i < n; i++) dst[i] = float_to_half(values[i]);
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

void gemm_pack_columns(int tactic, const float *b, int b_transposed, int64_t ldb, int64_t K, int64_t N,
                       int64_t n_begin, int64_t n_count, trtshim_dtype weight_dtype, void *packed) {
    if (!packed || weight_size(weight_dtype) == 0 || K < 0 || N < 0 || n_begin < 0 || n_count < 0 ||
        n_begin + n_count > N || (n_count > 0 && K > 0 && !b))
        return;
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
    /* The call that packs the last column also zeroes the padding lanes (zero bits are 0.0 in every
       weight dtype), so range-by-range packing writes the same bytes as one whole packing. */
    if (n_begin + n_count == N && N % GEMM_NR != 0) {
        size_t element = weight_size(weight_dtype), lane = (size_t)(N % GEMM_NR);
        char *panel = (char *)packed + (size_t)(N / GEMM_NR) * (size_t)K * GEMM_NR * element;
        for (int64_t k = 0; k < K; k++) memset(panel + ((size_t)k * GEMM_NR + lane) * element, 0, (GEMM_NR - lane) * element);
    }
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
            for (int64_t k = 0; k < p->K; k++)
                acc = fmaf(a_at(p, m, k), packed_at(p->packed, p->weight_dtype, base + (size_t)k * GEMM_NR), acc);
            c[n] = p->bias ? acc + p->bias[n] : acc;
        }
        if (p->act != TRTSHIM_UNARY_IDENTITY) unary_apply_n(p->act, c + n0, n_count);
    }
}

/* Per-thread scratch buffers (packed A blocks, matmul's packed B), kept between calls, freed at thread
   exit. Each block starts with its capacity in floats; data follows at SCRATCH_HEADER bytes. */
enum { SCRATCH_A, SCRATCH_B, SCRATCH_KINDS };
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

static void blocked_tile(const gemm_problem *p, float *a_block, int64_t m0, int64_t m_count, int64_t n0,
                         int64_t n_count) {
    const tactic_info *t = p->tactic;
    micro_kernel kernel = t->kernels[p->weight_dtype];
    wide_kernel wide = t->wide[p->weight_dtype];
    size_t element = weight_size(p->weight_dtype);
    for (int64_t k0 = 0; k0 < p->K; k0 += t->kc) {
        int64_t kc = p->K - k0 < t->kc ? p->K - k0 : t->kc;
        int last = k0 + kc == p->K;
        pack_a(p, m0, m_count, k0, kc, t->mr, a_block);
        for (int64_t j = 0; j < n_count;) {
            int64_t n = n0 + j;
            int cols = (int)(n_count - j < t->width ? n_count - j : t->width);
            const char *b = (const char *)p->packed +
                            (((size_t)(n / GEMM_NR) * (size_t)p->K + (size_t)k0) * GEMM_NR + (size_t)(n % GEMM_NR)) * element;
            const float *bias = last && p->bias ? p->bias + n : NULL;
            if (wide && m_count <= WIDE_ROWS && n_count - j >= WIDE_PANELS * GEMM_NR && n % GEMM_NR == 0) {
                float *c = p->c + m0 * p->ldc + n;
                wide((int)m_count, kc, a_block, t->mr, b, p->K * GEMM_NR, c, p->ldc, k0 > 0, bias);
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

/* parallel_for body: tiles [begin, end), m block fastest, so a thread's consecutive tiles share a B block. */
static void run_tiles(void *context, int64_t begin, int64_t end) {
    const gemm_problem *p = context;
    float *a_block = p->tactic->kernels[p->weight_dtype] ? scratch(SCRATCH_A, (size_t)(p->mc * p->tactic->kc)) : NULL;
    for (int64_t tile = begin; tile < end; tile++) {
        int64_t m0 = (tile % p->m_blocks) * p->mc, n0 = (tile / p->m_blocks) * p->nc;
        int64_t m_count = p->M - m0 < p->mc ? p->M - m0 : p->mc, n_count = p->N - n0 < p->nc ? p->N - n0 : p->nc;
        if (a_block)
            blocked_tile(p, a_block, m0, m_count, n0, n_count);
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
    gemm_problem problem = {M, N, K, a, lda, 0, packed, weight_dtype, bias, act, c, ldc, NULL, 0, 0, 0};
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
                            c, ldc, NULL, 0, 0, 0};
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
