/* convert.c: element conversions to and from float32, bit-exact with src/safetensors/convert.ts.
 *
 * Everything works on bit patterns so NaN payloads survive as the TypeScript side keeps them. Sources may
 * be unaligned (a tensor's offset inside a safetensors file need not be a multiple of its size), so
 * multi-byte elements are loaded with memcpy. */
#include <stdint.h>
#include <string.h>

#include "common.h"

static float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static uint32_t f32_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    return bits;
}

/* IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Infinities and NaN payloads are kept. */
static uint32_t f16_to_f32_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return sign | 0x7f800000u | (mantissa << 13);
    if (exponent == 0) return sign | f32_bits((float)mantissa * 0x1p-24f); /* zero and subnormals, exact */
    return sign | ((exponent + 112u) << 23) | (mantissa << 13);
}

/* OCP e4m3fn: bias 7, no infinities, S.1111.111 is NaN. */
static uint32_t e4m3_to_f32_bits(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    uint32_t exponent = (b >> 3) & 0xfu;
    uint32_t mantissa = b & 0x7u;
    if (exponent == 0xf && mantissa == 0x7) return sign | 0x7fc00000u;
    if (exponent == 0) return sign | f32_bits((float)mantissa * 0x1p-9f);
    return sign | ((exponent + 120u) << 23) | (mantissa << 20);
}

/* e5m2 is the upper byte of an IEEE half. */
static uint32_t e5m2_to_f32_bits(uint8_t b) { return f16_to_f32_bits((uint16_t)(b << 8)); }

/* Round to nearest, ties to even; overflow gives infinity; NaN stays a quiet NaN with its top payload bits. */
static uint16_t f32_to_f16_bits(uint32_t x) {
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t exponent = (x >> 23) & 0xffu;
    uint32_t mantissa = x & 0x7fffffu;
    if (exponent == 0xff) return (uint16_t)(sign | 0x7c00u | (mantissa ? 0x200u | (mantissa >> 13) : 0));
    int32_t e = (int32_t)exponent - 112; /* the half exponent field before rounding */
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return sign; /* below half the smallest subnormal */
        uint32_t significand = mantissa | 0x800000u;
        uint32_t shift = (uint32_t)(126 - (int32_t)exponent); /* 14 .. 24 */
        uint32_t q = significand >> shift;
        uint32_t rest = significand & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rest > half || (rest == half && (q & 1))) q++; /* may carry into the smallest normal: right */
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((uint32_t)e << 10) | (mantissa >> 13);
    uint32_t rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (q & 1))) q++; /* may carry into infinity: right */
    return (uint16_t)(sign | q);
}

static uint16_t f32_to_bf16_bits(uint32_t x) {
    if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x7fffffu)) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

trtshim_status trtshim_convert_to_f32(trtshim_dtype src_dtype, const void *src, float *dst, uint64_t count) {
    if (count == 0) return TRTSHIM_OK;
    if (src == NULL || dst == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "convert_to_f32: null %s", src == NULL ? "source" : "destination");
    const uint8_t *in = src;
    switch (src_dtype) {
    case TRTSHIM_FLOAT32:
        memmove(dst, src, count * 4);
        return TRTSHIM_OK;
    case TRTSHIM_FLOAT16:
        for (uint64_t i = 0; i < count; i++) {
            uint16_t h;
            memcpy(&h, in + 2 * i, 2);
            dst[i] = f32_from_bits(f16_to_f32_bits(h));
        }
        return TRTSHIM_OK;
    case TRTSHIM_BFLOAT16:
        for (uint64_t i = 0; i < count; i++) {
            uint16_t h;
            memcpy(&h, in + 2 * i, 2);
            dst[i] = f32_from_bits((uint32_t)h << 16);
        }
        return TRTSHIM_OK;
    case TRTSHIM_FP8_E4M3:
        for (uint64_t i = 0; i < count; i++) dst[i] = f32_from_bits(e4m3_to_f32_bits(in[i]));
        return TRTSHIM_OK;
    case TRTSHIM_FP8_E5M2:
        for (uint64_t i = 0; i < count; i++) dst[i] = f32_from_bits(e5m2_to_f32_bits(in[i]));
        return TRTSHIM_OK;
    case TRTSHIM_FLOAT64:
        for (uint64_t i = 0; i < count; i++) {
            double d;
            memcpy(&d, in + 8 * i, 8);
            dst[i] = (float)d;
        }
        return TRTSHIM_OK;
    case TRTSHIM_INT8:
        for (uint64_t i = 0; i < count; i++) dst[i] = (float)(int8_t)in[i];
        return TRTSHIM_OK;
    case TRTSHIM_UINT8:
        for (uint64_t i = 0; i < count; i++) dst[i] = (float)in[i];
        return TRTSHIM_OK;
    case TRTSHIM_BOOL:
        for (uint64_t i = 0; i < count; i++) dst[i] = in[i] ? 1.0f : 0.0f;
        return TRTSHIM_OK;
    case TRTSHIM_INT32:
        for (uint64_t i = 0; i < count; i++) {
            int32_t v;
            memcpy(&v, in + 4 * i, 4);
            dst[i] = (float)v;
        }
        return TRTSHIM_OK;
    case TRTSHIM_INT64:
        for (uint64_t i = 0; i < count; i++) {
            int64_t v;
            memcpy(&v, in + 8 * i, 8);
            dst[i] = (float)v;
        }
        return TRTSHIM_OK;
    }
    return set_error(TRTSHIM_ERR_ARGUMENT, "convert_to_f32: no conversion from dtype %d", (int)src_dtype);
}

trtshim_status trtshim_convert_from_f32(const float *src, trtshim_dtype dst_dtype, void *dst, uint64_t count) {
    if (dst_dtype != TRTSHIM_FLOAT32 && dst_dtype != TRTSHIM_FLOAT16 && dst_dtype != TRTSHIM_BFLOAT16)
        return set_error(TRTSHIM_ERR_ARGUMENT, "convert_from_f32: to %s is not supported (float32, float16, bfloat16)",
                         dtype_name(dst_dtype));
    if (count == 0) return TRTSHIM_OK;
    if (src == NULL || dst == NULL)
        return set_error(TRTSHIM_ERR_ARGUMENT, "convert_from_f32: null %s", src == NULL ? "source" : "destination");
    uint8_t *out = dst;
    if (dst_dtype == TRTSHIM_FLOAT32) {
        memmove(dst, src, count * 4);
        return TRTSHIM_OK;
    }
    for (uint64_t i = 0; i < count; i++) {
        uint16_t h = dst_dtype == TRTSHIM_FLOAT16 ? f32_to_f16_bits(f32_bits(src[i])) : f32_to_bf16_bits(f32_bits(src[i]));
        memcpy(out + 2 * i, &h, 2);
    }
    return TRTSHIM_OK;
}
