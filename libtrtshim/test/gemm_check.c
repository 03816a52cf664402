/* gemm_check.c: tests of the GEMM tactics, weight packing, matmul_f32 and the thread pool.
 *
 *   - every supported tactic against a double-precision reference, within a bound derived from the
 *     rounding of the weights and of the float32 accumulation;
 *   - every tactic bit-identical to tactic 0 (memcmp), 1 vs 2 threads bit-identical;
 *   - column-range packing gives the bytes of whole packing;
 *   - every vector packing path and threaded packing write the bytes of the scalar path;
 *   - float16 / bfloat16 rounding against hand-worked values;
 *   - matmul_f32 in all four transpose combinations, and bit-identical to the packed GEMM;
 *   - quantized weights (int8, fp8 e4m3, int4 groups): scales and error bounds, hand-worked roundings,
 *     packing from float32 == packing the values it quantized to, range packing, refusal of bad input, and
 *     every tactic bit-identical to an fmaf loop over the widened weights;
 *   - parallel_for covers every index exactly once, nested and from concurrent callers.
 * Run by `make -C libtrtshim check`. Set GEMM_CHECK_SEED to reproduce a run.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "trtshim.h"
#include "ops.h"
#include "threadpool.h"

/* Stand-ins for ops.c (written by another module): weak, so the real definitions win when linked. */
__attribute__((weak)) float unary_apply(trtshim_unary_op op, float x) {
    switch (op) {
    case TRTSHIM_UNARY_RELU: return x > 0.0f ? x : 0.0f;
    case TRTSHIM_UNARY_SIGMOID: return 1.0f / (1.0f + expf(-x));
    case TRTSHIM_UNARY_TANH: return tanhf(x);
    case TRTSHIM_UNARY_NEG: return -x;
    case TRTSHIM_UNARY_ABS: return fabsf(x);
    default: return x * 0.5f + 0.25f; /* any fixed function: the tests compare fused against unfused */
    }
}
__attribute__((weak)) void unary_apply_n(trtshim_unary_op op, float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = unary_apply(op, x[i]);
}

static int failures;
#define CHECK(cond, ...)                                                                                     \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            failures++;                                                                                      \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                             \
            fprintf(stderr, __VA_ARGS__);                                                                    \
            fprintf(stderr, "\n");                                                                           \
            if (failures > 20) exit(1);                                                                      \
        }                                                                                                    \
    } while (0)

static uint64_t rng_state;
static uint64_t next_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static int64_t rand_int(int64_t lo, int64_t hi) { return lo + (int64_t)(next_u64() % (uint64_t)(hi - lo + 1)); }
static float rand_unit(void) { return (float)((double)(next_u64() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }
static void fill(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = rand_unit();
}

static const trtshim_dtype weight_dtypes[] = {TRTSHIM_FLOAT32, TRTSHIM_FLOAT16, TRTSHIM_BFLOAT16};
/* Relative rounding error of one weight stored in the dtype (unit roundoff). */
static double weight_roundoff(trtshim_dtype dtype) {
    return dtype == TRTSHIM_FLOAT16 ? ldexp(1, -11) : dtype == TRTSHIM_BFLOAT16 ? ldexp(1, -8) : 0.0;
}
static const char *dtype_label(trtshim_dtype dtype) {
    return dtype == TRTSHIM_FLOAT16 ? "float16" : dtype == TRTSHIM_BFLOAT16 ? "bfloat16" : "float32";
}

/* B as a torch Linear weight ([N, K], ldb = K) or row-major [K, N] (ldb = N). */
static float b_at(const float *b, int transposed, int64_t K, int64_t N, int64_t k, int64_t n) {
    return transposed ? b[n * K + k] : b[k * N + n];
}

static void *pack_whole(int tactic, const float *b, int transposed, int64_t K, int64_t N, trtshim_dtype dtype) {
    size_t bytes = gemm_packed_bytes(tactic, K, N, dtype);
    void *packed = malloc(bytes + 1);
    memset(packed, 0xab, bytes + 1);
    gemm_pack_columns(tactic, b, transposed, transposed ? K : N, K, N, 0, N, dtype, packed);
    return packed;
}

/* One random problem: every supported tactic against the reference and against tactic 0. */
static void check_problem(int64_t M, int64_t N, int64_t K, trtshim_dtype dtype, int transposed, int with_bias,
                          trtshim_unary_op act) {
    int64_t lda = K + rand_int(0, 3), ldc = N + rand_int(0, 3);
    float *a = malloc(sizeof(float) * (size_t)(M * lda + 1));
    float *b = malloc(sizeof(float) * (size_t)(K * N + 1));
    float *bias = malloc(sizeof(float) * (size_t)(N + 1));
    fill(a, M * lda);
    fill(b, K * N);
    fill(bias, N);
    size_t c_count = (size_t)(M * ldc);
    float *expected = malloc(sizeof(float) * c_count + 4);
    float *c = malloc(sizeof(float) * c_count + 4);
    const float guard = -12345.5f;

    /* Reference for the identity activation, and its error bound. */
    double *reference = malloc(sizeof(double) * (size_t)(M * N + 1));
    double *bound = malloc(sizeof(double) * (size_t)(M * N + 1));
    double u = weight_roundoff(dtype), gamma = (double)(K + 2) * ldexp(1, -24);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double sum = 0, magnitude = 0;
            for (int64_t k = 0; k < K; k++) {
                double product = (double)a[m * lda + k] * (double)b_at(b, transposed, K, N, k, n);
                sum += product;
                magnitude += fabs(product);
            }
            if (with_bias) sum += bias[n], magnitude += fabs(bias[n]);
            reference[m * N + n] = sum;
            /* weight rounding + float32 accumulation + float16 subnormal absolute error */
            bound[m * N + n] = (u + gamma) * (1 + u) * magnitude + (double)K * ldexp(1, -24) + 1e-30;
        }

    for (int tactic = 0; tactic < gemm_tactic_count(); tactic++) {
        if (!gemm_tactic_supported(tactic)) continue;
        void *packed = pack_whole(tactic, b, transposed, K, N, dtype);
        for (int threads = 1; threads <= 2; threads++) {
            for (size_t i = 0; i < c_count; i++) c[i] = guard;
            gemm_run(tactic, M, N, K, a, lda, packed, dtype, with_bias ? bias : NULL, TRTSHIM_UNARY_IDENTITY, c,
                     ldc, threads);
            int64_t bad = -1;
            for (int64_t m = 0; m < M && bad < 0; m++)
                for (int64_t n = 0; n < ldc; n++) {
                    float value = c[m * ldc + n];
                    if (n >= N ? value != guard : !(fabs(value - reference[m * N + n]) <= bound[m * N + n])) {
                        bad = m * ldc + n;
                        break;
                    }
                }
            CHECK(bad < 0, "tactic %s %s M=%lld N=%lld K=%lld threads=%d: c[%lld] = %.9g, reference %.9g",
                  gemm_tactic_name(tactic), dtype_label(dtype), (long long)M, (long long)N, (long long)K, threads,
                  (long long)bad, bad < 0 ? 0.0 : c[bad],
                  bad < 0 || bad % ldc >= N ? 0.0 : reference[(bad / ldc) * N + bad % ldc]);

            /* The fused activation equals the activation applied afterwards, bit for bit. */
            if (act != TRTSHIM_UNARY_IDENTITY)
                for (int64_t m = 0; m < M; m++) unary_apply_n(act, c + m * ldc, N);
            float *fused = malloc(sizeof(float) * c_count + 4);
            for (size_t i = 0; i < c_count; i++) fused[i] = guard;
            gemm_run(tactic, M, N, K, a, lda, packed, dtype, with_bias ? bias : NULL, act, fused, ldc, threads);
            CHECK(memcmp(fused, c, sizeof(float) * c_count) == 0, "tactic %s act %d: fused differs from unfused",
                  gemm_tactic_name(tactic), (int)act);

            if (tactic == 0 && threads == 1) memcpy(expected, c, sizeof(float) * c_count);
            CHECK(memcmp(expected, c, sizeof(float) * c_count) == 0,
                  "tactic %s threads=%d %s M=%lld N=%lld K=%lld: not bit-identical to tactic %s, 1 thread",
                  gemm_tactic_name(tactic), threads, dtype_label(dtype), (long long)M, (long long)N, (long long)K,
                  gemm_tactic_name(0));
            free(fused);
        }
        free(packed);
    }
    free(a), free(b), free(bias), free(expected), free(c), free(reference), free(bound);
}

static void check_random_problems(int count, int64_t max_dim, int64_t max_k) {
    for (int i = 0; i < count; i++) {
        int64_t M = rand_int(1, max_dim), N = rand_int(1, max_dim), K = rand_int(0, max_k);
        switch (rand_int(0, 5)) { /* edge sizes often */
        case 0: M = 1; break;
        case 1: N = 1; break;
        case 2: K = rand_int(0, 1); break;
        default: break;
        }
        trtshim_dtype dtype = weight_dtypes[rand_int(0, 2)];
        trtshim_unary_op act = (trtshim_unary_op)rand_int(0, 15);
        check_problem(M, N, K, dtype, (int)rand_int(0, 1), (int)rand_int(0, 1), act);
    }
}

/* Packing column range by column range, in a random order, writes the bytes of one whole packing. */
static void check_column_ranges(int count) {
    for (int i = 0; i < count; i++) {
        int64_t K = rand_int(0, 70), N = rand_int(1, 150);
        int transposed = (int)rand_int(0, 1);
        trtshim_dtype dtype = weight_dtypes[rand_int(0, 2)];
        float *b = malloc(sizeof(float) * (size_t)(K * N + 1));
        fill(b, K * N);
        for (int tactic = 0; tactic < gemm_tactic_count(); tactic++) {
            size_t bytes = gemm_packed_bytes(tactic, K, N, dtype);
            void *whole = pack_whole(tactic, b, transposed, K, N, dtype);
            unsigned char *pieces = malloc(bytes + 1);
            memset(pieces, 0xcd, bytes + 1);
            int64_t cuts[8], cut_count = rand_int(0, 6);
            for (int64_t j = 0; j < cut_count; j++) cuts[j] = rand_int(0, N);
            cuts[cut_count++] = 0;
            cuts[cut_count++] = N;
            for (int64_t x = 0; x < cut_count; x++) /* sort */
                for (int64_t y = x + 1; y < cut_count; y++)
                    if (cuts[y] < cuts[x]) { int64_t t = cuts[x]; cuts[x] = cuts[y]; cuts[y] = t; }
            for (int64_t r = cut_count - 2; r >= 0; r--) { /* last range first: order must not matter */
                int64_t begin = cuts[r], width = cuts[r + 1] - cuts[r];
                const float *columns = transposed ? b + begin * K : b + begin;
                gemm_pack_columns(tactic, columns, transposed, transposed ? K : N, K, N, begin, width, dtype, pieces);
            }
            CHECK(memcmp(whole, pieces, bytes) == 0 && ((unsigned char *)whole)[bytes] == 0xab &&
                      pieces[bytes] == 0xcd,
                  "tactic %s %s K=%lld N=%lld: column-range packing differs from whole packing",
                  gemm_tactic_name(tactic), dtype_label(dtype), (long long)K, (long long)N);
            free(whole), free(pieces);
        }
        free(b);
    }
}

/* A float32 weight that exercises the conversions: any bit pattern (NaN payloads, infinities, subnormals),
   exact float16 and bfloat16 ties, values near the float16 overflow and subnormal range, plain values. */
static float tricky_value(void) {
    uint32_t bits = (uint32_t)next_u64();
    float x;
    switch (rand_int(0, 7)) {
    case 0: break; /* any bits */
    case 1: bits = (bits & ~0x1fffu) | 0x1000u; break;                         /* float16 tie (normal range) */
    case 2: bits = (bits & ~0xffffu) | 0x8000u; break;                         /* bfloat16 tie */
    case 3: bits = (bits & 0x807fffffu) | ((uint32_t)rand_int(100, 113) << 23); break; /* float16 subnormals */
    case 4: bits = (bits & 0x807fffffu) | ((uint32_t)rand_int(140, 143) << 23); break; /* float16 overflow */
    case 5: bits = (bits & 0x8000ffffu) | 0x7f800000u | ((uint32_t)rand_int(0, 1) << 22); break; /* NaN or inf */
    default: return rand_unit();
    }
    memcpy(&x, &bits, 4);
    return x;
}

/* Every vector packing path, and threaded packing, against the scalar path byte for byte: random shapes
   and column ranges (ragged panels at both ends, K tails), padded strides, a misaligned destination, and
   values that exercise every rounding case. */
static void check_pack_one(int64_t K, int64_t N, int64_t n_begin, int64_t n_count, int transposed, int64_t pad,
                           trtshim_dtype dtype, size_t misalign) {
    int64_t ldb = (transposed ? K : n_count) + pad;
    size_t source_count = (size_t)((transposed ? n_count : K) * ldb) + 1;
    float *b = malloc(sizeof(float) * source_count);
    for (size_t i = 0; i < source_count; i++) b[i] = tricky_value();
    size_t bytes = gemm_packed_bytes(0, K, N, dtype);
    unsigned char *expected = malloc(bytes + 1), *raw = aligned_alloc(64, (bytes + misalign + 64) / 64 * 64);
    unsigned char *got = raw + misalign;
    for (size_t i = 0; i <= bytes; i++) expected[i] = (unsigned char)(i * 7 + 3); /* outside the range: kept */
    memcpy(got, expected, bytes + 1);
    gemm_pack_columns_path(GEMM_PACK_SCALAR, b, transposed, ldb, K, N, n_begin, n_count, dtype, expected);
    for (int path = 1; path <= GEMM_PACK_PATH_COUNT + 2; path++) {
        int threads = path > GEMM_PACK_PATH_COUNT - 1 ? path - GEMM_PACK_PATH_COUNT + 2 : 1;
        if (threads == 1 && !gemm_pack_path_supported(path)) continue;
        for (size_t i = 0; i <= bytes; i++) got[i] = (unsigned char)(i * 7 + 3);
        if (threads == 1) gemm_pack_columns_path(path, b, transposed, ldb, K, N, n_begin, n_count, dtype, got);
        else gemm_pack_columns_mt(0, b, transposed, ldb, K, N, n_begin, n_count, dtype, got, threads);
        size_t first_bad = bytes + 1;
        for (size_t i = 0; i <= bytes && first_bad > bytes; i++)
            if (got[i] != expected[i]) first_bad = i;
        CHECK(first_bad > bytes,
              "packing %s threads=%d %s %s K=%lld N=%lld columns [%lld, +%lld) ldb=%lld misalign=%zu: byte %zu is "
              "%02x, scalar path wrote %02x",
              threads == 1 ? gemm_pack_path_name(path) : "mt", threads, dtype_label(dtype),
              transposed ? "[N,K]" : "[K,N]", (long long)K, (long long)N, (long long)n_begin, (long long)n_count,
              (long long)ldb, misalign, first_bad, first_bad <= bytes ? got[first_bad] : 0,
              first_bad <= bytes ? expected[first_bad] : 0);
    }
    free(b), free(expected), free(raw);
}

static void check_pack_paths(int count) {
    for (int i = 0; i < count; i++) {
        int64_t K = rand_int(0, 200), N = rand_int(1, 230);
        if (i % 4 == 0) N = 32 * rand_int(1, 7); /* whole panels only */
        int64_t n_begin = rand_int(0, 2) == 0 ? 0 : rand_int(0, N), n_count = rand_int(0, N - n_begin);
        if (i % 3 == 0) n_begin = 0, n_count = N;
        trtshim_dtype dtype = weight_dtypes[rand_int(0, 2)];
        size_t misalign = rand_int(0, 3) == 0 ? (size_t)(2 * rand_int(1, 31)) : 0;
        check_pack_one(K, N, n_begin, n_count, (int)rand_int(0, 1), rand_int(0, 1) ? 0 : rand_int(1, 9), dtype, misalign);
    }
    /* Large enough for non-temporal stores (aligned), and the same without them (misaligned). */
    for (int transposed = 0; transposed <= 1; transposed++)
        for (size_t d = 0; d < 3; d++) {
            check_pack_one(1100, 600, 0, 600, transposed, 3, weight_dtypes[d], 0);
            check_pack_one(1031, 577, 5, 560, transposed, 0, weight_dtypes[d], 2);
        }
}

/* Weight rounding on hand-worked values: one weight, one input of 1, so c = the stored weight. */
static float stored_weight(int tactic, float w, trtshim_dtype dtype) {
    void *packed = pack_whole(tactic, &w, 0, 1, 1, dtype);
    float one = 1.0f, c = 0;
    gemm_run(tactic, 1, 1, 1, &one, 1, packed, dtype, NULL, TRTSHIM_UNARY_IDENTITY, &c, 1, 1);
    free(packed);
    return c;
}

static void check_weight_rounding(void) {
    struct { float in, half, bfloat; } cases[] = {
        {1.0f, 1.0f, 1.0f},
        {-2.5f, -2.5f, -2.5f},
        {1.0f + 0x1p-11f, 1.0f, 1.0f},                              /* tie -> even */
        {1.0f + 3 * 0x1p-11f, 1.0f + 0x1p-9f, 1.0f},                /* tie -> even (up) */
        {1.0f + 0x1p-11f + 0x1p-20f, 1.0f + 0x1p-10f, 1.0f},        /* above the tie */
        {1.0f + 0x1p-8f, 1.0f + 0x1p-8f, 1.0f},                     /* bfloat16 tie -> even */
        {1.0f + 3 * 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-6f},   /* bfloat16 tie -> even (up) */
        {65504.0f, 65504.0f, 65536.0f},                             /* largest half */
        {65520.0f, INFINITY, 65536.0f},                             /* rounds past the largest half */
        {0x1p-24f, 0x1p-24f, 0x1p-24f},                             /* smallest half subnormal */
        {0x1p-25f, 0.0f, 0x1p-25f},                                 /* tie to zero */
        {0x1p-25f + 0x1p-40f, 0x1p-24f, 0x1p-25f},                  /* above the tie */
        {3 * 0x1p-25f, 2 * 0x1p-24f, 3 * 0x1p-25f},                 /* subnormal tie -> even */
        {0x1p-14f - 0x1p-25f, 0x1p-14f, 0x1p-14f},                  /* rounds up into the normals */
        {INFINITY, INFINITY, INFINITY},
    };
    for (int tactic = 0; tactic < gemm_tactic_count(); tactic++) {
        if (!gemm_tactic_supported(tactic)) continue;
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            float f32 = stored_weight(tactic, cases[i].in, TRTSHIM_FLOAT32);
            float half = stored_weight(tactic, cases[i].in, TRTSHIM_FLOAT16);
            float bfloat = stored_weight(tactic, cases[i].in, TRTSHIM_BFLOAT16);
            CHECK(f32 == cases[i].in, "tactic %s: float32 weight %a stored as %a", gemm_tactic_name(tactic),
                  cases[i].in, f32);
            CHECK(half == cases[i].half, "tactic %s: float16 weight %a stored as %a, expected %a",
                  gemm_tactic_name(tactic), cases[i].in, half, cases[i].half);
            CHECK(bfloat == cases[i].bfloat, "tactic %s: bfloat16 weight %a stored as %a, expected %a",
                  gemm_tactic_name(tactic), cases[i].in, bfloat, cases[i].bfloat);
        }
        CHECK(isnan(stored_weight(tactic, NAN, TRTSHIM_FLOAT16)), "float16 NaN weight lost");
        CHECK(isnan(stored_weight(tactic, NAN, TRTSHIM_BFLOAT16)), "bfloat16 NaN weight lost");
    }
}

/* matmul_f32: all transposes against the reference, and bit-identical to the float32 packed GEMM. */
static void check_matmul(int count, int64_t max_dim) {
    for (int i = 0; i < count; i++) {
        int64_t M = rand_int(1, max_dim), N = rand_int(1, max_dim), K = rand_int(0, max_dim);
        if (i % 5 == 0) M = 1;
        if (i % 7 == 0) K = 0;
        float *a_plain = malloc(sizeof(float) * (size_t)(M * K + 1));
        float *b_plain = malloc(sizeof(float) * (size_t)(K * N + 1));
        fill(a_plain, M * K);
        fill(b_plain, K * N);
        float *gemm_c = malloc(sizeof(float) * (size_t)(M * N));
        void *packed = pack_whole(0, b_plain, 0, K, N, TRTSHIM_FLOAT32);
        gemm_run(0, M, N, K, a_plain, K, packed, TRTSHIM_FLOAT32, NULL, TRTSHIM_UNARY_IDENTITY, gemm_c, N, 1);
        free(packed);
        for (int ta = 0; ta <= 1; ta++)
            for (int tb = 0; tb <= 1; tb++) {
                /* Stored operands with padded strides, transposed where asked. */
                int64_t lda = (ta ? M : K) + rand_int(0, 2), ldb = (tb ? K : N) + rand_int(0, 2);
                float *a = calloc((size_t)((ta ? K : M) * lda + 1), sizeof(float));
                float *b = calloc((size_t)((tb ? N : K) * ldb + 1), sizeof(float));
                for (int64_t m = 0; m < M; m++)
                    for (int64_t k = 0; k < K; k++) a[ta ? k * lda + m : m * lda + k] = a_plain[m * K + k];
                for (int64_t k = 0; k < K; k++)
                    for (int64_t n = 0; n < N; n++) b[tb ? n * ldb + k : k * ldb + n] = b_plain[k * N + n];
                int64_t ldc = N + 1;
                float *c = malloc(sizeof(float) * (size_t)(M * ldc));
                for (int threads = 1; threads <= 2; threads++) {
                    for (int64_t x = 0; x < M * ldc; x++) c[x] = -7.0f;
                    matmul_f32(M, N, K, a, lda, ta, b, ldb, tb, c, ldc, threads);
                    int same = 1, close = 1, guard_kept = 1;
                    for (int64_t m = 0; m < M; m++) {
                        guard_kept &= c[m * ldc + N] == -7.0f;
                        for (int64_t n = 0; n < N; n++) {
                            double sum = 0, magnitude = 0;
                            for (int64_t k = 0; k < K; k++) {
                                double p = (double)a_plain[m * K + k] * b_plain[k * N + n];
                                sum += p, magnitude += fabs(p);
                            }
                            close &= fabs(c[m * ldc + n] - sum) <= (double)(K + 2) * ldexp(1, -24) * magnitude;
                            same &= memcmp(&c[m * ldc + n], &gemm_c[m * N + n], sizeof(float)) == 0;
                        }
                    }
                    CHECK(close && same && guard_kept,
                          "matmul_f32 M=%lld N=%lld K=%lld ta=%d tb=%d threads=%d: close %d, same as gemm %d, guard %d",
                          (long long)M, (long long)N, (long long)K, ta, tb, threads, close, same, guard_kept);
                }
                free(a), free(b), free(c);
            }
        free(a_plain), free(b_plain), free(gemm_c);
    }
}

/* Element (k, n) of a weight as b_transposed lays it out, with row stride ld. */
static float b_at2(const float *b, int transposed, int64_t ld, int64_t k, int64_t n) {
    return transposed ? b[n * ld + k] : b[k * ld + n];
}

/* ---- quantized weights ------------------------------------------------------------------------------ */

static const gemm_quant_format quant_formats[] = {
    {GEMM_QUANT_INT8, 0}, {GEMM_QUANT_FP8_E4M3, 0}, {GEMM_QUANT_INT4, 32}, {GEMM_QUANT_INT4, 64}, {GEMM_QUANT_INT4, 128},
};
static const char *quant_label(gemm_quant_format f) {
    return f.kind == GEMM_QUANT_INT8 ? "int8" : f.kind == GEMM_QUANT_FP8_E4M3 ? "fp8" : f.group_size == 32 ? "int4/32"
           : f.group_size == 64 ? "int4/64" : "int4/128";
}

/* The test's own e4m3 decoding, from the definition: (-1)^s * 2^(e - 7) * (1 + m / 8), subnormal 2^-6 * m / 8. */
static float e4m3_value(uint8_t code) {
    int e = (code >> 3) & 15, m = code & 7;
    double magnitude = (code & 0x7f) == 0x7f ? NAN : e == 0 ? ldexp(m / 8.0, -6) : ldexp(1 + m / 8.0, e - 7);
    return (float)(code & 0x80 ? -magnitude : magnitude);
}

/* What a stored value stands for (before its scale). */
static float quant_code_value(gemm_quant_format f, const unsigned char *q, size_t i) {
    return f.kind == GEMM_QUANT_FP8_E4M3 ? e4m3_value(q[i]) : (float)(int8_t)q[i];
}

/* Random weights with columns of very different magnitudes, a zero column now and then. */
static void fill_weight(float *b, int transposed, int64_t K, int64_t n_count, int64_t ld) {
    for (int64_t j = 0; j < n_count; j++) {
        float magnitude = rand_int(0, 9) == 0 ? 0.0f : ldexpf(1.0f, (int)rand_int(-20, 20));
        for (int64_t k = 0; k < K; k++) {
            float w = rand_unit() * magnitude;
            if (rand_int(0, 30) == 0) w = 0.0f;
            b[transposed ? j * ld + k : k * ld + j] = w;
        }
    }
}

static void check_quant_problem(gemm_quant_format f, int64_t M, int64_t N, int64_t K, int transposed) {
    int64_t groups = gemm_quant_groups(f, K), rows_per_group = f.kind == GEMM_QUANT_INT4 ? f.group_size : K;
    int64_t ldb = (transposed ? K : N) + rand_int(0, 3), ldq = (transposed ? K : N) + rand_int(0, 3);
    size_t source = (size_t)((transposed ? N : K) * (transposed ? ldb : ldb)) + 1;
    float *b = calloc(source, sizeof(float));
    unsigned char *q = calloc((size_t)((transposed ? N : K) * ldq) + 1, 1);
    float *scales = calloc((size_t)(N * groups) + 1, sizeof(float));
    fill_weight(b, transposed, K, N, ldb);
    CHECK(gemm_quant_quantize(f, b, transposed, ldb, K, N, q, ldq, scales) == TRTSHIM_OK, "%s quantize: %s",
          quant_label(f), trtshim_last_error());

    /* Scales are the group's largest magnitude over the format's largest value; the error of each weight
       is at most half a step (int) or half an e4m3 spacing (fp8), plus float32 rounding. */
    int scale_ok = 1, range_ok = 1, error_ok = 1;
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) {
            float largest = 0;
            int64_t k_end = (g + 1) * rows_per_group < K ? (g + 1) * rows_per_group : K;
            for (int64_t k = g * rows_per_group; k < k_end; k++) largest = fmaxf(largest, fabsf(b_at2(b, transposed, ldb, k, n)));
            float scale = scales[transposed ? n * groups + g : g * N + n];
            float top = f.kind == GEMM_QUANT_INT8 ? 127.0f : f.kind == GEMM_QUANT_INT4 ? 7.0f : 448.0f;
            scale_ok &= scale == largest / top;
            for (int64_t k = g * rows_per_group; k < k_end; k++) {
                size_t i = transposed ? (size_t)(n * ldq + k) : (size_t)(k * ldq + n);
                float w = b_at2(b, transposed, ldb, k, n), code = quant_code_value(f, q, i);
                range_ok &= f.kind == GEMM_QUANT_INT8 ? fabsf(code) <= 127 : f.kind == GEMM_QUANT_INT4 ? fabsf(code) <= 7
                                                                                                        : fabsf(code) <= 448;
                double error = fabs((double)w - (double)code * scale);
                double allowed = f.kind == GEMM_QUANT_FP8_E4M3 ? fmax(fabs(w) * 0x1p-4, scale * 0x1p-10) : 0.5 * scale;
                error_ok &= error <= allowed * (1 + 1e-5) + fabs(w) * 0x1p-22;
            }
        }
    CHECK(scale_ok && range_ok && error_ok, "%s K=%lld N=%lld: scales %d, value ranges %d, error bounds %d",
          quant_label(f), (long long)K, (long long)N, scale_ok, range_ok, error_ok);

    /* Packing from float32 (whole, and range by range in reverse order) == packing the quantized values. */
    size_t bytes = gemm_quant_packed_bytes(f, K, N);
    unsigned char *from_float = malloc(bytes + 1), *from_ranges = malloc(bytes + 1), *from_q = malloc(bytes + 1);
    memset(from_float, 0x5a, bytes + 1), memset(from_ranges, 0xa5, bytes + 1), memset(from_q, 0x3c, bytes + 1);
    CHECK(gemm_quant_pack_columns(f, b, transposed, ldb, K, N, 0, N, from_float) == TRTSHIM_OK, "%s pack: %s",
          quant_label(f), trtshim_last_error());
    int64_t cut = rand_int(0, N);
    gemm_quant_pack_columns(f, transposed ? b + cut * ldb : b + cut, transposed, ldb, K, N, cut, N - cut, from_ranges);
    gemm_quant_pack_columns(f, b, transposed, ldb, K, N, 0, cut, from_ranges);
    /* the pre-quantized path in two ranges too: its scales and values for the columns of each range */
    float *range_scales = malloc(sizeof(float) * (size_t)(N * groups + 1));
    for (int part = 0; part < 2; part++) {
        int64_t begin = part ? 0 : cut, count = part ? cut : N - cut;
        for (int64_t j = 0; j < count; j++)
            for (int64_t g = 0; g < groups; g++)
                range_scales[transposed ? j * groups + g : g * count + j] =
                    scales[transposed ? (begin + j) * groups + g : g * N + begin + j];
        CHECK(gemm_quant_pack_quantized(f, transposed ? q + begin * ldq : q + begin, range_scales, transposed, ldq, K, N,
                                        begin, count, from_q) == TRTSHIM_OK,
              "%s pack quantized: %s", quant_label(f), trtshim_last_error());
    }
    CHECK(memcmp(from_float, from_ranges, bytes) == 0 && from_float[bytes] == 0x5a && from_ranges[bytes] == 0xa5,
          "%s %s K=%lld N=%lld cut %lld: range-by-range quantized packing differs from whole", quant_label(f),
          transposed ? "[N,K]" : "[K,N]", (long long)K, (long long)N, (long long)cut);
    CHECK(memcmp(from_float, from_q, bytes) == 0 && from_q[bytes] == 0x3c,
          "%s %s K=%lld N=%lld: packing the quantized values differs from quantizing while packing", quant_label(f),
          transposed ? "[N,K]" : "[K,N]", (long long)K, (long long)N);

    /* The widened weights are the test's own decoding of (value, scale), bit for bit. */
    float *widened = malloc(sizeof(float) * (size_t)(K * N + 1));
    int widened_ok = 1;
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < N; n++) {
            size_t i = transposed ? (size_t)(n * ldq + k) : (size_t)(k * ldq + n);
            int64_t g = k / rows_per_group;
            widened[k * N + n] = quant_code_value(f, q, i) * scales[transposed ? n * groups + g : g * N + n];
            float got = gemm_quant_weight(f, from_float, K, N, k, n);
            widened_ok &= memcmp(&got, &widened[k * N + n], 4) == 0;
        }
    CHECK(widened_ok, "%s K=%lld N=%lld: gemm_quant_weight differs from the stored value times its scale",
          quant_label(f), (long long)K, (long long)N);

    /* The run: the test's fmaf loop over the widened weights, bit for bit, for every tactic and thread count. */
    int64_t lda = K + rand_int(0, 2), ldc = N + rand_int(0, 2);
    float *a = malloc(sizeof(float) * (size_t)(M * lda + 1)), *bias = malloc(sizeof(float) * (size_t)(N + 1));
    float *expected = malloc(sizeof(float) * (size_t)(M * ldc)), *c = malloc(sizeof(float) * (size_t)(M * ldc));
    fill(a, M * lda), fill(bias, N);
    int with_bias = (int)rand_int(0, 1);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < ldc; n++) {
            float acc = 0.0f;
            if (n < N)
                for (int64_t k = 0; k < K; k++) acc = fmaf(a[m * lda + k], widened[k * N + n], acc);
            expected[m * ldc + n] = n >= N ? -3.0f : with_bias ? acc + bias[n] : acc;
        }
    for (int tactic = 0; tactic < gemm_tactic_count(); tactic++) {
        if (!gemm_tactic_supported(tactic)) continue;
        for (int threads = 1; threads <= 2; threads++) {
            for (int64_t x = 0; x < M * ldc; x++) c[x] = -3.0f;
            gemm_quant_run(tactic, f, M, N, K, a, lda, from_float, with_bias ? bias : NULL, TRTSHIM_UNARY_IDENTITY, c,
                           ldc, threads);
            CHECK(memcmp(c, expected, sizeof(float) * (size_t)(M * ldc)) == 0,
                  "%s tactic %s threads=%d M=%lld N=%lld K=%lld: not bit-identical to the fmaf loop over the "
                  "widened weights", quant_label(f), gemm_tactic_name(tactic), threads, (long long)M, (long long)N,
                  (long long)K);
        }
    }
    free(b), free(q), free(scales), free(from_float), free(from_ranges), free(from_q), free(range_scales);
    free(widened), free(a), free(bias), free(expected), free(c);
}

/* Hand-worked roundings: one column whose largest magnitude makes the scale exactly 1. */
static void check_quant_rounding(void) {
    struct { gemm_quant_format f; float w[8]; int32_t q[8]; } cases[] = {
        {{GEMM_QUANT_INT8, 0}, {127, -63.5f, 0.5f, 1.5f, -0.5f, 2.5f, 126.49f, -127}, {127, -64, 0, 2, 0, 2, 126, -127}},
        {{GEMM_QUANT_FP8_E4M3, 0},
         {448, 1.0f, 0x1p-9f, 0x1p-10f, 3 * 0x1p-10f, 1.0625f, 1.1875f, -0x1p-6f + 0x1p-10f},
         {0x7e, 0x38, 0x01, 0x00, 0x02, 0x38, 0x3a, 0x88}},
        {{GEMM_QUANT_INT4, 32}, {7, -6.5f, 0.5f, 1.5f, -3.5f, 2.5f, 6.49f, -7}, {7, -6, 0, 2, -4, 2, 6, -7}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        unsigned char q[8];
        float scale = -1;
        CHECK(gemm_quant_quantize(cases[i].f, cases[i].w, 1, 8, 8, 1, q, 8, &scale) == TRTSHIM_OK, "quantize failed");
        CHECK(scale == 1.0f, "%s: scale %g, expected 1", quant_label(cases[i].f), scale);
        for (int k = 0; k < 8; k++) {
            int32_t got = cases[i].f.kind == GEMM_QUANT_FP8_E4M3 ? (int32_t)q[k] : (int32_t)(int8_t)q[k];
            CHECK(got == cases[i].q[k], "%s: %a quantized to %d, expected %d", quant_label(cases[i].f), cases[i].w[k],
                  got, cases[i].q[k]);
        }
        /* The same values through the packer (a whole panel, both layouts: the vector path where there is
           one): column n holds the cases rotated by n, so every column's scale is 1. */
        for (int transposed = 0; transposed <= 1; transposed++) {
            float w[8 * 32];
            for (int n = 0; n < 32; n++)
                for (int k = 0; k < 8; k++) w[transposed ? n * 8 + k : k * 32 + n] = cases[i].w[(k + n) % 8];
            size_t bytes = gemm_quant_packed_bytes(cases[i].f, 8, 32);
            void *packed = malloc(bytes);
            gemm_quant_pack_columns(cases[i].f, w, transposed, transposed ? 8 : 32, 8, 32, 0, 32, packed);
            int same = 1;
            for (int n = 0; n < 32; n++)
                for (int k = 0; k < 8; k++) {
                    int32_t code = cases[i].q[(k + n) % 8];
                    float expected = cases[i].f.kind == GEMM_QUANT_FP8_E4M3 ? e4m3_value((uint8_t)code) : (float)code;
                    same &= gemm_quant_weight(cases[i].f, packed, 8, 32, k, n) == expected;
                }
            CHECK(same, "%s %s: packing a panel of hand-worked values does not give the hand-worked codes",
                  quant_label(cases[i].f), transposed ? "[N,K]" : "[K,N]");
            free(packed);
        }
    }
    /* e4m3 saturates: a value past 448 (only reachable through rounding of w / scale) stays 448. */
    for (int code = 0; code < 256; code++)
        if ((code & 0x7f) != 0x7f) {
            float w[2] = {448, e4m3_value((uint8_t)code)};
            unsigned char q[2];
            float scale;
            gemm_quant_quantize(quant_formats[1], w, 0, 1, 2, 1, q, 1, &scale);
            CHECK(q[1] == code || (w[1] == 0 && (q[1] & 0x7f) == 0), "e4m3 code %#x does not survive a round trip (got %#x)",
                  code, q[1]);
        }
}

/* Bad input is refused before anything is written. */
static void check_quant_errors(void) {
    int64_t K = 40, N = 33;
    float *b = malloc(sizeof(float) * (size_t)(K * N));
    fill(b, K * N);
    b[7 * K + 13] = NAN;
    for (size_t i = 0; i < sizeof quant_formats / sizeof quant_formats[0]; i++) {
        gemm_quant_format f = quant_formats[i];
        size_t bytes = gemm_quant_packed_bytes(f, K, N);
        unsigned char *packed = malloc(bytes), *before = malloc(bytes);
        for (size_t x = 0; x < bytes; x++) packed[x] = before[x] = (unsigned char)(x * 13);
        trtshim_status status = gemm_quant_pack_columns(f, b, 1, K, K, N, 0, N, packed);
        CHECK(status == TRTSHIM_ERR_VALIDATION && strstr(trtshim_last_error(), "row 13 of column 7") &&
                  memcmp(packed, before, bytes) == 0,
              "%s: a NaN weight gave status %d, '%s', buffer %s", quant_label(f), (int)status, trtshim_last_error(),
              memcmp(packed, before, bytes) ? "changed" : "kept");
        int64_t groups = gemm_quant_groups(f, K);
        signed char *q = calloc((size_t)(K * N), 1);
        float *scales = calloc((size_t)(N * groups), sizeof(float));
        q[5 * K + 9] = f.kind == GEMM_QUANT_FP8_E4M3 ? (signed char)0xff : f.kind == GEMM_QUANT_INT4 ? 8 : 0;
        if (f.kind == GEMM_QUANT_INT8) scales[3] = -1.0f;
        status = gemm_quant_pack_quantized(f, q, scales, 1, K, K, N, 0, N, packed);
        CHECK(status == TRTSHIM_ERR_VALIDATION && memcmp(packed, before, bytes) == 0,
              "%s: a bad quantized value or scale gave status %d ('%s'), buffer %s", quant_label(f), (int)status,
              trtshim_last_error(), memcmp(packed, before, bytes) ? "changed" : "kept");
        free(packed), free(before), free(q), free(scales);
    }
    gemm_quant_format bad = {GEMM_QUANT_INT4, 48};
    CHECK(!gemm_quant_format_valid(bad) && gemm_quant_packed_bytes(bad, 4, 4) == 0, "int4 groups of 48 accepted");
    free(b);
}

static void check_quantized(int count) {
    check_quant_rounding();
    check_quant_errors();
    for (int i = 0; i < count; i++) {
        gemm_quant_format f = quant_formats[rand_int(0, 4)];
        int64_t M = rand_int(1, 12), N = rand_int(1, 200), K = rand_int(0, 300);
        if (i % 4 == 0) M = rand_int(1, 2); /* the wide kernels */
        check_quant_problem(f, M, N, K, (int)rand_int(0, 1));
    }
    /* Several K blocks and tiles, int4 groups across K blocks, and a decode step over many panels. */
    check_quant_problem(quant_formats[4], 30, 300, 600, 1);
    check_quant_problem(quant_formats[2], 1, 520, 300, 0);
    check_quant_problem(quant_formats[1], 37, 161, 513, 1);
    check_quant_problem(quant_formats[0], 2, 1030, 100, 0);
}

/* ---- thread pool ---------------------------------------------------------------------------------- */

typedef struct {
    int *hits;
    int nested;
} cover_context;

static void count_hits(void *context, int64_t begin, int64_t end) {
    cover_context *cover = context;
    for (int64_t i = begin; i < end; i++) __atomic_fetch_add(&cover->hits[i], 1, __ATOMIC_RELAXED);
    if (cover->nested) { /* a nested loop runs inline and must still cover its range */
        int inner[17] = {0};
        cover_context inner_cover = {inner, 0};
        parallel_for(17, 2, count_hits, &inner_cover);
        for (int i = 0; i < 17; i++)
            if (inner[i] != 1) __atomic_fetch_add(&cover->hits[0], 1000, __ATOMIC_RELAXED);
    }
}

static int covers_once(int64_t n, int threads, int nested) {
    int *hits = calloc((size_t)n + 1, sizeof(int));
    cover_context cover = {hits, nested};
    parallel_for(n, threads, count_hits, &cover);
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= hits[i] == 1;
    free(hits);
    return ok;
}

static void *concurrent_caller(void *arg) {
    int *ok = arg;
    for (int i = 0; i < 200; i++) *ok &= covers_once(1 + i % 37, 4, 0);
    return NULL;
}

static void check_thread_pool(void) {
    CHECK(cpu_count() >= 1, "cpu_count() = %d", cpu_count());
    int64_t sizes[] = {0, 1, 2, 3, 7, 64, 1001};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (int threads = 0; threads <= 5; threads++)
            CHECK(covers_once(sizes[i], threads, threads == 2), "parallel_for n=%lld threads=%d does not cover once",
                  (long long)sizes[i], threads);
    int ok[3] = {1, 1, 1};
    pthread_t callers[3];
    for (int i = 0; i < 3; i++) pthread_create(&callers[i], NULL, concurrent_caller, &ok[i]);
    for (int i = 0; i < 3; i++) pthread_join(callers[i], NULL);
    CHECK(ok[0] && ok[1] && ok[2], "concurrent parallel_for callers did not each cover once");
}

int main(void) {
    const char *seed_text = getenv("GEMM_CHECK_SEED");
    uint64_t seed = seed_text ? strtoull(seed_text, NULL, 10) : 0x9e3779b97f4a7c15ull;
    rng_state = seed ? seed : 1;
    printf("gemm_check: seed %llu, %d tactics:", (unsigned long long)seed, gemm_tactic_count());
    for (int t = 0; t < gemm_tactic_count(); t++)
        printf(" %s%s", gemm_tactic_name(t), gemm_tactic_supported(t) ? "" : "(unsupported)");
    printf("\n");
    CHECK(gemm_tactic_supported(0), "tactic 0 must be supported everywhere");
    CHECK(!gemm_tactic_supported(-1) && !gemm_tactic_supported(gemm_tactic_count()), "out-of-range tactic");

    check_thread_pool();
    check_weight_rounding();
    check_column_ranges(60);
    check_pack_paths(400);
    check_random_problems(300, 40, 40);
    check_random_problems(40, 130, 300);
    /* Shapes that cross every cache block: several K blocks, M and N blocks, ragged edges. */
    check_problem(150, 300, 600, TRTSHIM_FLOAT32, 1, 1, TRTSHIM_UNARY_RELU);
    check_problem(37, 517, 263, TRTSHIM_FLOAT16, 0, 1, TRTSHIM_UNARY_SIGMOID);
    check_problem(301, 33, 1030, TRTSHIM_BFLOAT16, 1, 0, TRTSHIM_UNARY_IDENTITY);
    for (int64_t K = 255; K <= 257; K++) check_problem(20, 40, K, TRTSHIM_FLOAT32, 0, 1, TRTSHIM_UNARY_TANH);
    check_problem(9, 70, 513, TRTSHIM_FLOAT16, 1, 1, TRTSHIM_UNARY_RELU);
    /* One or two rows (a decode step) over many whole panels: the wide kernels. */
    check_problem(1, 300, 70, TRTSHIM_FLOAT16, 1, 1, TRTSHIM_UNARY_GELU_ERF);
    check_problem(2, 257, 300, TRTSHIM_BFLOAT16, 0, 1, TRTSHIM_UNARY_SILU);
    check_problem(1, 1100, 513, TRTSHIM_FLOAT32, 1, 1, TRTSHIM_UNARY_IDENTITY);
    check_problem(2, 2080, 40, TRTSHIM_FLOAT32, 0, 0, TRTSHIM_UNARY_RELU);
    check_matmul(40, 70);
    check_quantized(120);

    if (failures) {
        printf("gemm_check: %d failures\n", failures);
        return 1;
    }
    printf("gemm_check: ok\n");
    return 0;
}
