/* ops.c: scalar unary and elementwise functions, shared by standalone kernels and fused epilogues. */
#include <math.h>

#include "ops.h"

int unary_op_valid(int op) { return op >= TRTSHIM_UNARY_IDENTITY && op <= TRTSHIM_UNARY_LOG; }
int elementwise_op_valid(int op) { return op >= TRTSHIM_ELEMENTWISE_ADD && op <= TRTSHIM_ELEMENTWISE_MAX; }

static inline float relu(float x) { return x > 0.0f ? x : 0.0f; }
static inline float gelu_erf(float x) { return x * 0.5f * (1.0f + erff(x * 0.70710678118654752f)); }
static inline float gelu_tanh(float x) {
    return x * 0.5f * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float hardswish(float x) { return x * fminf(fmaxf(x + 3.0f, 0.0f), 6.0f) / 6.0f; }
static inline float hardsigmoid(float x) { return fmaxf(0.0f, fminf(1.0f, x / 6.0f + 0.5f)); }

float unary_apply(trtshim_unary_op op, float x) {
    switch (op) {
    case TRTSHIM_UNARY_IDENTITY: return x;
    case TRTSHIM_UNARY_RELU: return relu(x);
    case TRTSHIM_UNARY_GELU_ERF: return gelu_erf(x);
    case TRTSHIM_UNARY_GELU_TANH: return gelu_tanh(x);
    case TRTSHIM_UNARY_SILU: return x * sigmoid(x);
    case TRTSHIM_UNARY_SIGMOID: return sigmoid(x);
    case TRTSHIM_UNARY_TANH: return tanhf(x);
    case TRTSHIM_UNARY_HARDSWISH: return hardswish(x);
    case TRTSHIM_UNARY_HARDSIGMOID: return hardsigmoid(x);
    case TRTSHIM_UNARY_EXP: return expf(x);
    case TRTSHIM_UNARY_SQRT: return sqrtf(x);
    case TRTSHIM_UNARY_RECIPROCAL: return 1.0f / x;
    case TRTSHIM_UNARY_NEG: return -x;
    case TRTSHIM_UNARY_ERF: return erff(x);
    case TRTSHIM_UNARY_ABS: return fabsf(x);
    case TRTSHIM_UNARY_LOG: return logf(x);
    }
    return x;
}

/* One loop per op, so the compiler can vectorize the simple ones; the values equal unary_apply's. */
void unary_apply_n(trtshim_unary_op op, float *x, int64_t n) {
    switch (op) {
    case TRTSHIM_UNARY_IDENTITY: return;
    case TRTSHIM_UNARY_RELU: for (int64_t i = 0; i < n; i++) x[i] = relu(x[i]); return;
    case TRTSHIM_UNARY_GELU_ERF: for (int64_t i = 0; i < n; i++) x[i] = gelu_erf(x[i]); return;
    case TRTSHIM_UNARY_GELU_TANH: for (int64_t i = 0; i < n; i++) x[i] = gelu_tanh(x[i]); return;
    case TRTSHIM_UNARY_SILU: for (int64_t i = 0; i < n; i++) x[i] = x[i] * sigmoid(x[i]); return;
    case TRTSHIM_UNARY_SIGMOID: for (int64_t i = 0; i < n; i++) x[i] = sigmoid(x[i]); return;
    case TRTSHIM_UNARY_TANH: for (int64_t i = 0; i < n; i++) x[i] = tanhf(x[i]); return;
    case TRTSHIM_UNARY_HARDSWISH: for (int64_t i = 0; i < n; i++) x[i] = hardswish(x[i]); return;
    case TRTSHIM_UNARY_HARDSIGMOID: for (int64_t i = 0; i < n; i++) x[i] = hardsigmoid(x[i]); return;
    case TRTSHIM_UNARY_NEG: for (int64_t i = 0; i < n; i++) x[i] = -x[i]; return;
    case TRTSHIM_UNARY_ABS: for (int64_t i = 0; i < n; i++) x[i] = fabsf(x[i]); return;
    default: for (int64_t i = 0; i < n; i++) x[i] = unary_apply(op, x[i]); return;
    }
}

float elementwise_apply(trtshim_elementwise_op op, float a, float b) {
    switch (op) {
    case TRTSHIM_ELEMENTWISE_ADD: return a + b;
    case TRTSHIM_ELEMENTWISE_SUB: return a - b;
    case TRTSHIM_ELEMENTWISE_MUL: return a * b;
    case TRTSHIM_ELEMENTWISE_DIV: return a / b;
    case TRTSHIM_ELEMENTWISE_POW: return powf(a, b);
    /* NaN propagates, as in ONNX and the reference evaluator (fminf/fmaxf would drop it). */
    case TRTSHIM_ELEMENTWISE_MIN: return (a != a || b != b) ? a + b : fminf(a, b);
    case TRTSHIM_ELEMENTWISE_MAX: return (a != a || b != b) ? a + b : fmaxf(a, b);
    }
    return a;
}
