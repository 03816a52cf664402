/* gemm_check.c: tests of the GEMM tactics, weight packing, matmul_f32 and the thread pool.
 *
 *   - every supported tactic against a double-precision reference, within a bound derived from the
 *     rounding of the weights and of the float32 accumulation;
 *   - every tactic bit-identical to tactic 0 (memcmp), 1 vs 2 threads bit-identical;
 *   - column-range packing gives the bytes of whole packing;
 *   - float16 / bfloat16 rounding against hand-worked values;
 *   - matmul_f32 in all four transpose combinations, and bit-identical to the packed GEMM;
 *   - parallel_for covers every index exactly once, nested and from concurrent callers.
 * Run by `make -C libtrtshim check`. Set GEMM_CHECK_SEED to reproduce a run.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
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

    if (failures) {
        printf("gemm_check: %d failures\n", failures);
        return 1;
    }
    printf("gemm_check: ok\n");
    return 0;
}
