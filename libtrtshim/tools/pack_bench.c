/* pack_bench.c: weight packing throughput (what a refit spends its time on) beside a memcpy of the same
 * bytes, measured in the same run. Throughput is float32 input bytes per second, for every weight dtype
 * and both source layouts (torch Linear [N, K] and row-major [K, N]), on one thread and on all cores; and
 * the quantizing packers (int8, fp8 e4m3, int4 with groups of 128) on one thread.
 *
 *   pack_bench [K N] [--repeats R]   prints one JSON object on stdout
 */
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
    int64_t K, N;
    const float *b;
    int transposed, threads, tactic;
    trtshim_dtype dtype;
    void *packed;
    const void *copy_src;
    void *copy_dst;
    size_t copy_bytes;
} pack_case;

static void run_pack(pack_case *x) {
    gemm_pack_columns_mt(x->tactic, x->b, x->transposed, x->transposed ? x->K : x->N, x->K, x->N, 0, x->N, x->dtype,
                         x->packed, x->threads);
}

static gemm_quant_format quant_format;
static void run_quant_pack(pack_case *x) {
    gemm_quant_pack_columns(quant_format, x->b, x->transposed, x->transposed ? x->K : x->N, x->K, x->N, 0, x->N,
                            x->packed);
}

static void run_memcpy(pack_case *x) { memcpy(x->copy_dst, x->copy_src, x->copy_bytes); }

/* Best time of `repeats` runs after one untimed run (which also faults the destination pages in). */
static double best_seconds(void (*fn)(pack_case *), pack_case *x, int repeats) {
    fn(x);
    double best = INFINITY;
    for (int i = 0; i < repeats; i++) {
        double start = now();
        fn(x);
        double seconds = now() - start;
        if (seconds < best) best = seconds;
    }
    return best;
}

static const char *dtype_label(trtshim_dtype dtype) {
    return dtype == TRTSHIM_FLOAT16 ? "float16" : dtype == TRTSHIM_BFLOAT16 ? "bfloat16" : "float32";
}

int main(int argc, char **argv) {
    int64_t dims[2] = {4096, 4096};
    int repeats = 7, positional = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) repeats = atoi(argv[++i]);
        else if (positional < 2) dims[positional++] = atoll(argv[i]);
    }
    int64_t K = dims[0], N = dims[1];
    size_t input_bytes = sizeof(float) * (size_t)(K * N);
    float *b = aligned_alloc(64, (input_bytes + 63) / 64 * 64);
    void *copy_dst = aligned_alloc(64, (input_bytes + 63) / 64 * 64);
    srand(1);
    for (int64_t i = 0; i < K * N; i++) b[i] = (float)rand() / RAND_MAX - 0.5f;
    int tactic = gemm_tactic_count() - 1;
    while (tactic > 0 && !gemm_tactic_supported(tactic)) tactic--;
    void *packed = aligned_alloc(64, (gemm_packed_bytes(tactic, K, N, TRTSHIM_FLOAT32) + 63) / 64 * 64);

    pack_case x = {.K = K, .N = N, .b = b, .tactic = tactic, .packed = packed, .copy_src = b, .copy_dst = copy_dst,
                   .copy_bytes = input_bytes, .threads = 1};
    double memcpy_gbps = (double)input_bytes / best_seconds(run_memcpy, &x, repeats) * 1e-9;
    printf("{\n  \"K\": %lld, \"N\": %lld, \"input_bytes\": %zu, \"threads\": %d, \"tactic\": \"%s\",\n"
           "  \"memcpy_gbps\": %.3f,\n  \"packing\": [\n",
           (long long)K, (long long)N, input_bytes, cpu_count(), gemm_tactic_name(tactic), memcpy_gbps);
    static const trtshim_dtype dtypes[] = {TRTSHIM_FLOAT32, TRTSHIM_FLOAT16, TRTSHIM_BFLOAT16};
    int printed = 0;
    for (int transposed = 1; transposed >= 0; transposed--)
        for (size_t d = 0; d < 3; d++) {
            x.transposed = transposed;
            x.dtype = dtypes[d];
            x.threads = 1;
            double one = (double)input_bytes / best_seconds(run_pack, &x, repeats) * 1e-9;
            x.threads = cpu_count();
            double all = (double)input_bytes / best_seconds(run_pack, &x, repeats) * 1e-9;
            printf("%s    {\"layout\": \"%s\", \"dtype\": \"%s\", \"gbps_1thread\": %.3f, \"gbps_threads\": %.3f}",
                   printed++ ? ",\n" : "", transposed ? "nk" : "kn", dtype_label(dtypes[d]), one, all);
            fflush(stdout);
        }
    /* Quantizing packers (groundwork: scalar code, one thread). */
    static const struct { const char *name; gemm_quant_format format; } quant[] = {
        {"int8", {GEMM_QUANT_INT8, 0}}, {"fp8_e4m3", {GEMM_QUANT_FP8_E4M3, 0}}, {"int4_g128", {GEMM_QUANT_INT4, 128}}};
    printf("\n  ],\n  \"quantized\": [\n");
    printed = 0;
    x.threads = 1;
    for (int transposed = 1; transposed >= 0; transposed--)
        for (size_t q = 0; q < sizeof quant / sizeof quant[0]; q++) {
            quant_format = quant[q].format;
            x.transposed = transposed;
            double gbps = (double)input_bytes / best_seconds(run_quant_pack, &x, repeats < 3 ? repeats : 3) * 1e-9;
            printf("%s    {\"layout\": \"%s\", \"format\": \"%s\", \"gbps_1thread\": %.3f}", printed++ ? ",\n" : "",
                   transposed ? "nk" : "kn", quant[q].name, gbps);
            fflush(stdout);
        }
    /* memcpy again at the end: a change of machine load during the run shows as a difference. */
    x.threads = 1;
    double memcpy_after = (double)input_bytes / best_seconds(run_memcpy, &x, repeats) * 1e-9;
    printf("\n  ],\n  \"memcpy_gbps_after\": %.3f\n}\n", memcpy_after);
    free(b), free(copy_dst), free(packed);
    return 0;
}
