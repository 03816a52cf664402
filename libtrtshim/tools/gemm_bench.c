/* gemm_bench.c: GFLOP/s of the GEMM tactics on one problem (default 1024 x 1024 x 1024), beside a naive
 * triple loop and the system BLAS (cblas_sgemm, loaded with dlopen where one is installed).
 *
 * Also the quantized formats (int8, fp8 e4m3, int4 with groups of 128), widened inside the GEMM.
 *
 *   gemm_bench [M N K] [--repeats R]   prints one JSON object on stdout
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gemm.h"
#include "threadpool.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    int64_t M, N, K;
    float *a, *b, *c;
    void *packed;
    int tactic, threads;
    trtshim_dtype dtype;
    void (*sgemm)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
} bench_case;

static gemm_quant_format quant_format;
static void run_quant(bench_case *x) {
    gemm_quant_run(x->tactic, quant_format, x->M, x->N, x->K, x->a, x->K, x->packed, NULL, TRTSHIM_UNARY_IDENTITY, x->c,
                   x->N, x->threads);
}

static void run_ours(bench_case *x) {
    gemm_run(x->tactic, x->M, x->N, x->K, x->a, x->K, x->packed, x->dtype, NULL, TRTSHIM_UNARY_IDENTITY, x->c, x->N,
             x->threads);
}

/* The baseline: i, j, k loops over row-major A and B, one thread. */
static void run_naive(bench_case *x) {
    for (int64_t i = 0; i < x->M; i++)
        for (int64_t j = 0; j < x->N; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < x->K; k++) acc += x->a[i * x->K + k] * x->b[k * x->N + j];
            x->c[i * x->N + j] = acc;
        }
}

static void run_blas(bench_case *x) {
    enum { ROW_MAJOR = 101, NO_TRANS = 111 };
    x->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)x->M, (int)x->N, (int)x->K, 1.0f, x->a, (int)x->K, x->b, (int)x->N,
             0.0f, x->c, (int)x->N);
}

/* Best time of `repeats` runs after `warmups` untimed ones, as GFLOP/s. */
static double gflops(void (*fn)(bench_case *), bench_case *x, int repeats, int warmups) {
    for (int i = 0; i < warmups; i++) fn(x);
    double best = INFINITY;
    for (int i = 0; i < repeats; i++) {
        double start = now();
        fn(x);
        double seconds = now() - start;
        if (seconds < best) best = seconds;
    }
    return 2.0 * (double)x->M * (double)x->N * (double)x->K / best * 1e-9;
}

static void pack(bench_case *x) {
    free(x->packed);
    x->packed = malloc(gemm_packed_bytes(x->tactic, x->K, x->N, x->dtype));
    gemm_pack_columns(x->tactic, x->b, 0, x->N, x->K, x->N, 0, x->N, x->dtype, x->packed);
}

int main(int argc, char **argv) {
    int64_t dims[3] = {1024, 1024, 1024};
    int repeats = 5, positional = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
        else if (positional < 3) dims[positional++] = atoll(argv[i]);
    }
    bench_case x = {.M = dims[0], .N = dims[1], .K = dims[2], .dtype = TRTSHIM_FLOAT32, .threads = cpu_count()};
    x.a = malloc(sizeof(float) * (size_t)(x.M * x.K));
    x.b = malloc(sizeof(float) * (size_t)(x.K * x.N));
    x.c = malloc(sizeof(float) * (size_t)(x.M * x.N));
    srand(1);
    for (int64_t i = 0; i < x.M * x.K; i++) x.a[i] = (float)rand() / RAND_MAX - 0.5f;
    for (int64_t i = 0; i < x.K * x.N; i++) x.b[i] = (float)rand() / RAND_MAX - 0.5f;

    printf("{\n  \"M\": %lld, \"N\": %lld, \"K\": %lld, \"threads\": %d,\n  \"tactics\": [\n", (long long)x.M,
           (long long)x.N, (long long)x.K, x.threads);
    int best = 0;
    double best_gflops = 0;
    int printed = 0;
    for (int t = 0; t < gemm_tactic_count(); t++) {
        if (!gemm_tactic_supported(t)) continue;
        x.tactic = t;
        pack(&x);
        /* the scalar tactic is slow: fewer repeats */
        double g = gflops(run_ours, &x, t == 0 ? 1 : repeats, 1);
        if (g > best_gflops) best_gflops = g, best = t;
        printf("%s    {\"name\": \"%s\", \"gflops\": %.3f}", printed++ ? ",\n" : "", gemm_tactic_name(t), g);
        fflush(stdout);
    }
    printf("\n  ],\n  \"best\": {\"name\": \"%s\", \"gflops\": %.3f", gemm_tactic_name(best), best_gflops);
    x.tactic = best;
    x.threads = 1;
    pack(&x);
    printf(", \"gflops_1thread\": %.3f", gflops(run_ours, &x, repeats, 1));
    x.threads = cpu_count();
    x.dtype = TRTSHIM_FLOAT16;
    pack(&x);
    printf(", \"gflops_float16\": %.3f", gflops(run_ours, &x, repeats, 1));
    x.dtype = TRTSHIM_BFLOAT16;
    pack(&x);
    printf(", \"gflops_bfloat16\": %.3f},\n", gflops(run_ours, &x, repeats, 1));
    fflush(stdout);

    /* Quantized weights, widened inside the GEMM (best tactic, all threads). */
    static const struct { const char *name; gemm_quant_format format; } quant[] = {
        {"int8", {GEMM_QUANT_INT8, 0}}, {"fp8_e4m3", {GEMM_QUANT_FP8_E4M3, 0}}, {"int4_g128", {GEMM_QUANT_INT4, 128}}};
    printf("  \"quantized\": [");
    for (size_t q = 0; q < sizeof quant / sizeof quant[0]; q++) {
        quant_format = quant[q].format;
        free(x.packed);
        x.packed = malloc(gemm_quant_packed_bytes(quant_format, x.K, x.N));
        gemm_quant_pack_columns(quant_format, x.b, 0, x.N, x.K, x.N, 0, x.N, x.packed);
        printf("%s{\"format\": \"%s\", \"gflops\": %.3f}", q ? ", " : "", quant[q].name, gflops(run_quant, &x, repeats, 1));
        fflush(stdout);
    }
    printf("],\n");

    printf("  \"naive\": {\"gflops\": %.3f},\n", gflops(run_naive, &x, 1, 0));

    static const char *const blas_names[] = {"libopenblas.so.0", "libblas.so.3", "libmkl_rt.so", "libmkl_rt.so.2"};
    void *blas = NULL;
    const char *blas_name = NULL;
    for (size_t i = 0; i < sizeof blas_names / sizeof blas_names[0] && !x.sgemm; i++) {
        blas = dlopen(blas_names[i], RTLD_NOW | RTLD_LOCAL);
        if (!blas) continue;
        *(void **)&x.sgemm = dlsym(blas, "cblas_sgemm");
        if (x.sgemm) blas_name = blas_names[i];
        else dlclose(blas);
    }
    if (x.sgemm)
        printf("  \"blas\": {\"library\": \"%s\", \"gflops\": %.3f}\n}\n", blas_name, gflops(run_blas, &x, repeats, 1));
    else
        printf("  \"blas\": {\"library\": \"not installed\"}\n}\n");
    return 0;
}
