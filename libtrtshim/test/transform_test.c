/* transform_test.c: the weight-transform kernels against plain index arithmetic, the vector paths against
 * the portable ones, thread counts against each other, bad arguments, and a throughput report.
 * The TypeScript tests (test/transform*.test.ts) check bit-identity with the TypeScript references.
 * TRANSFORM_BENCH=1 prints the 4096 x 4096 permute throughput against memcpy. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trtshim.h"

extern int transform_use_simd;
float transform_round_half(float x);
float transform_round_bfloat(float x);

static int failures = 0;
#define CHECK(cond, ...)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            failures++;                                       \
            fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);   \
            fprintf(stderr, __VA_ARGS__);                     \
            fprintf(stderr, "\n");                            \
        }                                                     \
    } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t next_random(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float random_float(void) { return (float)((int64_t)(next_random() % 2000001) - 1000000) / 1000.0f; }
static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static int same(float a, float b) { return bits(a) == bits(b) || (isnan(a) && isnan(b)); }
static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The permuted tensor by index arithmetic, one element at a time. */
static void naive_permute(const float *src, int rank, const int64_t *dims, const int32_t *perm, float *dst) {
    int64_t stride[8], out_dims[8], count = 1;
    for (int i = rank - 1, s = 1; i >= 0; i--) {
        stride[i] = s;
        s *= (int)dims[i];
    }
    for (int i = 0; i < rank; i++) {
        out_dims[i] = dims[perm[i]];
        count *= out_dims[i];
    }
    for (int64_t e = 0; e < count; e++) {
        int64_t rest = e, offset = 0;
        for (int i = rank - 1; i >= 0; i--) {
            offset += (rest % out_dims[i]) * stride[perm[i]];
            rest /= out_dims[i];
        }
        dst[e] = src[offset];
    }
}

static void test_permute_random(void) {
    for (int trial = 0; trial < 400; trial++) {
        int rank = 1 + (int)(next_random() % 6);
        int64_t dims[8], count = 1;
        int32_t perm[8];
        for (int i = 0; i < rank; i++) {
            /* Mostly small, sometimes past a tile (64) and the 8-wide vector blocks. */
            dims[i] = next_random() % 5 == 0 ? 1 + (int64_t)(next_random() % 150) : 1 + (int64_t)(next_random() % 7);
            perm[i] = i;
        }
        for (int i = 0; i < rank; i++) count *= dims[i];
        if (count > 400000) continue;
        for (int i = rank - 1; i > 0; i--) {
            int j = (int)(next_random() % (uint64_t)(i + 1));
            int32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        float *src = malloc((size_t)count * 4), *want = malloc((size_t)count * 4), *got = malloc((size_t)count * 4);
        for (int64_t i = 0; i < count; i++) src[i] = random_float();
        naive_permute(src, rank, dims, perm, want);
        for (int simd = 0; simd < 2; simd++) {
            for (int threads = 1; threads <= 3; threads += 2) {
                transform_use_simd = simd;
                memset(got, 0xff, (size_t)count * 4);
                trtshim_status status = trtshim_transform_permute(src, rank, dims, perm, got, threads);
                CHECK(status == TRTSHIM_OK, "permute: %s", trtshim_last_error());
                CHECK(memcmp(got, want, (size_t)count * 4) == 0, "permute rank %d trial %d simd %d threads %d differs", rank, trial,
                      simd, threads);
            }
        }
        transform_use_simd = 1;
        free(src);
        free(want);
        free(got);
    }
}

static void test_permute_errors(void) {
    float a[4] = {0}, b[4];
    int64_t dims[2] = {2, 2};
    int32_t repeated[2] = {0, 0}, outside[2] = {0, 2}, good[2] = {1, 0};
    CHECK(trtshim_transform_permute(a, 2, dims, repeated, b, 1) == TRTSHIM_ERR_ARGUMENT, "repeated axis accepted");
    CHECK(strstr(trtshim_last_error(), "perm[1] = 0") != NULL, "message: %s", trtshim_last_error());
    CHECK(trtshim_transform_permute(a, 2, dims, outside, b, 1) == TRTSHIM_ERR_ARGUMENT, "axis out of range accepted");
    CHECK(trtshim_transform_permute(a, 9, dims, good, b, 1) == TRTSHIM_ERR_ARGUMENT, "rank 9 accepted");
    CHECK(trtshim_transform_permute(NULL, 2, dims, good, b, 1) == TRTSHIM_ERR_ARGUMENT, "null source accepted");
    CHECK(strstr(trtshim_last_error(), "null source") != NULL, "message: %s", trtshim_last_error());
    int64_t negative[2] = {2, -1};
    CHECK(trtshim_transform_permute(a, 2, negative, good, b, 1) == TRTSHIM_ERR_ARGUMENT, "negative dimension accepted");
    int64_t empty[2] = {0, 3};
    CHECK(trtshim_transform_permute(NULL, 2, empty, good, NULL, 1) == TRTSHIM_OK, "an empty tensor needs no buffers");
}

/* float16 rounding: the portable path against the compiler's _Float16 conversion (an independent
   implementation) and against the F16C path, over a stride through every float bit pattern and the
   neighbourhoods of the boundaries. */
static void test_round_half(void) {
    enum { N = 4096 };
    static float src[N], simd_out[N], portable_out[N];
    const uint32_t edges[] = {0x477fefffu, 0x477ff000u, 0x477ff001u, 0x33000000u, 0x33000001u, 0x32ffffffu,
                              0x387fc000u, 0x387fe000u, 0x38800000u, 0x7f800000u, 0x7fc00001u, 0x7f800001u, 0};
    uint64_t checked = 0;
    for (uint64_t start = 0; start < (1ull << 32); start += 4099ull * N) {
        for (int i = 0; i < N; i++) {
            uint32_t u = (uint32_t)(start + (uint64_t)i * 4099u);
            if (i < (int)(sizeof edges / sizeof edges[0])) u = edges[i] ^ (uint32_t)(start & 0x80000000u);
            src[i] = from_bits(u);
        }
        transform_use_simd = 1;
        trtshim_transform_cast_round(src, TRTSHIM_FLOAT16, simd_out, N, 1);
        transform_use_simd = 0;
        trtshim_transform_cast_round(src, TRTSHIM_FLOAT16, portable_out, N, 1);
        for (int i = 0; i < N; i++) {
            CHECK(same(simd_out[i], portable_out[i]), "half %08x: f16c %08x, portable %08x", bits(src[i]), bits(simd_out[i]),
                  bits(portable_out[i]));
#ifdef __FLT16_MAX__
            CHECK(same((float)(_Float16)src[i], portable_out[i]), "half %08x: _Float16 %08x, portable %08x", bits(src[i]),
                  bits((float)(_Float16)src[i]), bits(portable_out[i]));
#endif
            checked++;
        }
        if (failures > 20) break;
    }
    /* The float16 subnormal range: a stride through it, and every tie (q + 1/2) * 2^-24 with its neighbours;
       then the ties and their neighbours of the normal range. */
    for (uint32_t u = 0x33000000u; u <= 0x38800000u && failures <= 20; u += 97) {
        float x = from_bits(u);
        float got = transform_round_half(x);
#ifdef __FLT16_MAX__
        CHECK(same((float)(_Float16)x, got), "half %08x: _Float16 %08x, portable %08x", u, bits((float)(_Float16)x), bits(got));
#endif
        checked++;
    }
    for (int q = 0; q < 1024; q++)
        for (int d = -2; d <= 2; d++) {
            float x = from_bits(bits(ldexpf((float)q + 0.5f, -24)) + (uint32_t)d);
            float got = transform_round_half(x);
#ifdef __FLT16_MAX__
            CHECK(same((float)(_Float16)x, got), "half %08x: _Float16 %08x, portable %08x", bits(x), bits((float)(_Float16)x),
                  bits(got));
#endif
            checked++;
        }
    for (uint32_t exponent = 102; exponent <= 143; exponent++)
        for (uint32_t high = 0; high < 1024; high++)
            for (uint32_t low = 0x0fff; low <= 0x1001; low++) {
                uint32_t u = (exponent << 23) | (high << 13) | low;
                for (int negative = 0; negative < 2; negative++) {
                    float x = from_bits(u | (negative ? 0x80000000u : 0));
                    float got = transform_round_half(x);
#ifdef __FLT16_MAX__
                    CHECK(same((float)(_Float16)x, got), "half %08x: _Float16 %08x, portable %08x", bits(x),
                          bits((float)(_Float16)x), bits(got));
#endif
                    checked++;
                }
            }
    transform_use_simd = 1;
    CHECK(checked > 1000000, "only %llu values checked", (unsigned long long)checked);
}

/* bfloat16 rounding against a definition: the nearer of the two bfloat16 neighbours, the even one on a tie. */
static void test_round_bfloat(void) {
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)next_random();
        if (i % 3 == 0) u = (u & 0xffff0000u) | 0x8000u; /* ties */
        float x = from_bits(u), got = transform_round_bfloat(x);
        if (isnan(x)) {
            CHECK(isnan(got), "bfloat NaN %08x gave %08x", u, bits(got));
            continue;
        }
        uint32_t down = u & 0xffff0000u, up = down + 0x10000u; /* magnitudes; `up` may be infinity */
        double below = fabs((double)from_bits(down)), value = fabs((double)x);
        /* Past the largest bfloat16 the upper neighbour is 2^128, which rounds to infinity. */
        double above = (up & 0x7fffffffu) == 0x7f800000u ? ldexp(1.0, 128) : fabs((double)from_bits(up));
        uint32_t want = value - below < above - value ? down
                      : value - below > above - value ? up
                      : ((down >> 16) & 1u) ? up : down;
        if ((u & 0x7f800000u) == 0x7f800000u) want = u; /* infinity stays */
        CHECK(bits(got) == want, "bfloat %08x: got %08x, want %08x", u, bits(got), want);
        if (failures > 20) break;
    }
}

static void test_cast_errors(void) {
    float a[2] = {1, 2};
    CHECK(trtshim_transform_cast_round(a, TRTSHIM_INT8, a, 2, 1) == TRTSHIM_ERR_ARGUMENT, "int8 accepted");
    CHECK(strstr(trtshim_last_error(), "int8") != NULL, "message: %s", trtshim_last_error());
    CHECK(trtshim_transform_cast_round(NULL, TRTSHIM_FLOAT16, a, 2, 1) == TRTSHIM_ERR_ARGUMENT, "null accepted");
    float in_place[3] = {1.0009765625f, 1.00048828125f, 3.0f};
    CHECK(trtshim_transform_cast_round(in_place, TRTSHIM_FLOAT16, in_place, 3, 1) == TRTSHIM_OK, "in place");
    CHECK(in_place[0] == 1.0009765625f && in_place[1] == 1.0f && in_place[2] == 3.0f, "in place values %g %g %g", in_place[0],
          in_place[1], in_place[2]);
}

/* Thread counts and in-place use agree; a BatchNorm of unit scale leaves the weight as it was. */
static void test_bn_fold(void) {
    int64_t channels = 5, inner = 70000;
    float *w = malloc((size_t)(channels * inner) * 4), *one = malloc((size_t)(channels * inner) * 4),
          *two = malloc((size_t)(channels * inner) * 4);
    float gamma[5], variance[5], beta[5], mean[5], bias[5], folded[5];
    for (int64_t i = 0; i < channels * inner; i++) w[i] = random_float();
    for (int c = 0; c < 5; c++) {
        gamma[c] = random_float();
        variance[c] = fabsf(random_float());
        beta[c] = random_float();
        mean[c] = random_float();
        bias[c] = random_float();
    }
    CHECK(trtshim_transform_bn_fold_weight(w, channels, inner, gamma, variance, 1e-5, one, 1) == TRTSHIM_OK, "fold 1");
    CHECK(trtshim_transform_bn_fold_weight(w, channels, inner, gamma, variance, 1e-5, two, 2) == TRTSHIM_OK, "fold 2");
    CHECK(memcmp(one, two, (size_t)(channels * inner) * 4) == 0, "thread counts differ");
    for (int c = 0; c < 5; c++) {
        float scale = gamma[c] / sqrtf(variance[c] + 1e-5f);
        for (int64_t i = 0; i < inner; i += 997)
            CHECK(same(one[c * inner + i], w[c * inner + i] * scale), "channel %d element %lld", c, (long long)i);
    }
    CHECK(trtshim_transform_bn_fold_weight(w, channels, inner, gamma, variance, 1e-5, w, 2) == TRTSHIM_OK, "in place");
    CHECK(memcmp(one, w, (size_t)(channels * inner) * 4) == 0, "in place differs");
    float unit_gamma[1] = {1}, unit_variance[1] = {1}, x[3] = {1.5f, -2.25f, 1e-30f}, y[3];
    CHECK(trtshim_transform_bn_fold_weight(x, 1, 3, unit_gamma, unit_variance, 0.0, y, 1) == TRTSHIM_OK, "unit fold");
    CHECK(memcmp(x, y, sizeof x) == 0, "a unit BatchNorm changed the weight");
    CHECK(trtshim_transform_bn_fold_bias(bias, gamma, beta, mean, variance, 5, 1e-3, folded) == TRTSHIM_OK, "bias");
    for (int c = 0; c < 5; c++) {
        float s = gamma[c] / sqrtf(variance[c] + 1e-3f), want = (bias[c] - mean[c]) * s + beta[c];
        CHECK(same(folded[c], want), "bias channel %d: %g, want %g", c, folded[c], want);
    }
    CHECK(trtshim_transform_bn_fold_bias(NULL, gamma, beta, mean, variance, 5, 1e-3, folded) == TRTSHIM_OK, "no bias");
    CHECK(same(folded[0], (0.0f - mean[0]) * (gamma[0] / sqrtf(variance[0] + 1e-3f)) + beta[0]), "no bias folds as 0");
    CHECK(trtshim_transform_bn_fold_bias(NULL, gamma, NULL, mean, variance, 5, 1e-3, folded) == TRTSHIM_ERR_ARGUMENT, "null beta");
    CHECK(strstr(trtshim_last_error(), "beta") != NULL, "message: %s", trtshim_last_error());
    free(w);
    free(one);
    free(two);
}

/* LoRA: against a plain triple loop in the documented order, both layouts, several thread counts. */
static void test_lora(void) {
    for (int trial = 0; trial < 40; trial++) {
        int64_t out = 1 + (int64_t)(next_random() % 90), in = 1 + (int64_t)(next_random() % 90), rank = 1 + (int64_t)(next_random() % 9);
        int fan = (int)(next_random() % 2);
        double scale = (double)random_float() / 7.0;
        float *up = malloc((size_t)(out * rank) * 4), *down = malloc((size_t)(rank * in) * 4);
        float *w = malloc((size_t)(out * in) * 4), *want = malloc((size_t)(out * in) * 4), *got = malloc((size_t)(out * in) * 4);
        for (int64_t i = 0; i < out * rank; i++) up[i] = next_random() % 4 == 0 ? 0.0f : random_float();
        for (int64_t i = 0; i < rank * in; i++) down[i] = random_float();
        if (trial % 5 == 0) down[0] = INFINITY; /* zero entries of up must not turn it into NaN */
        for (int64_t i = 0; i < out * in; i++) w[i] = random_float();
        memcpy(want, w, (size_t)(out * in) * 4);
        for (int64_t o = 0; o < out; o++)
            for (int64_t i = 0; i < in; i++) {
                double sum = 0;
                for (int64_t r = 0; r < rank; r++)
                    if (up[o * rank + r] != 0) sum += (double)up[o * rank + r] * (double)down[r * in + i];
                float delta = (float)(sum * scale);
                float *target = fan ? &want[i * out + o] : &want[o * in + i];
                *target = *target + delta;
            }
        for (int threads = 1; threads <= 4; threads++) {
            transform_use_simd = threads % 2; /* the vector path on 1 and 3 threads, the portable one on 2 and 4 */
            memcpy(got, w, (size_t)(out * in) * 4);
            CHECK(trtshim_transform_lora_add(got, out, in, fan, up, down, rank, scale, threads) == TRTSHIM_OK, "lora: %s",
                  trtshim_last_error());
            int differ = 0;
            for (int64_t i = 0; i < out * in; i++) differ += !same(got[i], want[i]);
            CHECK(differ == 0, "lora [%lld, %lld] rank %lld fan %d threads %d: %d elements differ", (long long)out, (long long)in,
                  (long long)rank, fan, threads, differ);
        }
        transform_use_simd = 1;
        free(up);
        free(down);
        free(w);
        free(want);
        free(got);
    }
    float w[4] = {0};
    CHECK(trtshim_transform_lora_add(w, 2, 2, 0, NULL, w, 1, 1.0, 1) == TRTSHIM_ERR_ARGUMENT, "null up accepted");
    CHECK(trtshim_transform_lora_add(w, -2, 2, 0, w, w, 1, 1.0, 1) == TRTSHIM_ERR_ARGUMENT, "negative size accepted");
}

static double best_of(int repeats, void (*fn)(void *), void *context) {
    double best = 1e30;
    for (int i = 0; i < repeats; i++) {
        double start = seconds();
        fn(context);
        double t = seconds() - start;
        if (t < best) best = t;
    }
    return best;
}

typedef struct {
    float *src, *dst;
    int64_t n;
    int threads;
} bench_args;

static void run_memcpy(void *p) {
    bench_args *a = p;
    memcpy(a->dst, a->src, (size_t)(a->n * a->n) * 4);
}
static void run_permute(void *p) {
    bench_args *a = p;
    int64_t dims[2] = {a->n, a->n};
    int32_t perm[2] = {1, 0};
    trtshim_transform_permute(a->src, 2, dims, perm, a->dst, a->threads);
}
static void run_permute3(void *p) {
    bench_args *a = p;
    int64_t dims[3] = {64, a->n / 64, a->n}; /* [heads, head_dim, features] -> [features, heads, head_dim]... */
    int32_t perm[3] = {1, 2, 0};
    trtshim_transform_permute(a->src, 3, dims, perm, a->dst, a->threads);
}

static void bench(void) {
    bench_args a = {.n = 4096};
    size_t bytes = (size_t)(a.n * a.n) * 4;
    char *src_block = malloc(bytes + 128), *dst_block = malloc(bytes + 128);
    const char *shift = getenv("TRANSFORM_BENCH_SHIFT"); /* byte offset from a 64-byte boundary */
    size_t offset = shift != NULL ? (size_t)atoi(shift) : 0;
    a.src = (float *)(src_block + (64 - (uintptr_t)src_block % 64) + offset);
    a.dst = (float *)(dst_block + (64 - (uintptr_t)dst_block % 64) + offset);
    for (int64_t i = 0; i < a.n * a.n; i++) a.src[i] = (float)i;
    memset(a.dst, 0, bytes);
    double copy = best_of(7, run_memcpy, &a);
    printf("memcpy 4096x4096 float32: %.2f ms, %.2f GB/s\n", copy * 1e3, (double)bytes / copy / 1e9);
    for (a.threads = 1; a.threads <= 8; a.threads *= 2) {
        double t = best_of(7, run_permute, &a);
        printf("permute [1,0] threads %d: %.2f ms, %.2f GB/s, %.2f of memcpy\n", a.threads, t * 1e3, (double)bytes / t / 1e9, copy / t);
        t = best_of(7, run_permute3, &a);
        printf("permute [1,2,0] of [64,64,4096] threads %d: %.2f ms, %.2f GB/s\n", a.threads, t * 1e3, (double)bytes / t / 1e9);
    }
    /* LoRA rank 16 into 4096 x 4096, both layouts. */
    float *up = malloc((size_t)a.n * 16 * 4), *down = malloc((size_t)a.n * 16 * 4);
    for (int64_t i = 0; i < a.n * 16; i++) {
        up[i] = random_float();
        down[i] = random_float();
    }
    for (int fan = 0; fan < 2; fan++)
        for (int threads = 1; threads <= 8; threads *= 2) {
            double start = seconds();
            trtshim_transform_lora_add(a.dst, a.n, a.n, fan, up, down, 16, 0.5, threads);
            double t = seconds() - start;
            printf("lora_add 4096x4096 rank 16 fan_in_fan_out %d threads %d: %.2f ms, %.2f GB/s of weight\n", fan, threads, t * 1e3,
                   (double)bytes / t / 1e9);
        }
    free(up);
    free(down);
    free(src_block);
    free(dst_block);
}

int main(void) {
    test_permute_random();
    test_permute_errors();
    test_round_half();
    test_round_bfloat();
    test_cast_errors();
    test_bn_fold();
    test_lora();
    const char *b = getenv("TRANSFORM_BENCH");
    if (b != NULL && b[0] == '1') bench();
    if (failures > 0) {
        fprintf(stderr, "transform_test: %d failures\n", failures);
        return 1;
    }
    printf("transform_test: ok\n");
    return 0;
}
