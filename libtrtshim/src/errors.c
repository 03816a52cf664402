/* errors.c: the last-error message, version queries and dtype helpers. */
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common.h"

/* One message for the process, guarded by a mutex: calls made through a worker thread (asynchronous
   FFI calls) must be able to report to the thread that reads the message. Each reader gets its own copy,
   so a pointer it holds is not overwritten by another thread. */
static pthread_mutex_t error_lock = PTHREAD_MUTEX_INITIALIZER;
static char error_message[1024];
static _Thread_local char error_copy[1024];

trtshim_status set_error(trtshim_status status, const char *format, ...) {
    char message[sizeof(error_message)];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof(message), format, args);
    va_end(args);
    pthread_mutex_lock(&error_lock);
    memcpy(error_message, message, sizeof(message));
    pthread_mutex_unlock(&error_lock);
    return status;
}

const char *trtshim_last_error(void) {
    pthread_mutex_lock(&error_lock);
    memcpy(error_copy, error_message, sizeof(error_copy));
    pthread_mutex_unlock(&error_lock);
    return error_copy;
}

int32_t trtshim_abi_version(void) { return TRTSHIM_ABI_VERSION; }

const char *trtshim_version(void) { return "0.1.0"; }

int64_t trtshim_dtype_size(trtshim_dtype dtype) {
    switch (dtype) {
    case TRTSHIM_FLOAT32: case TRTSHIM_INT32: return 4;
    case TRTSHIM_FLOAT16: case TRTSHIM_BFLOAT16: return 2;
    case TRTSHIM_INT64: case TRTSHIM_FLOAT64: return 8;
    case TRTSHIM_INT8: case TRTSHIM_UINT8: case TRTSHIM_BOOL: case TRTSHIM_FP8_E4M3: case TRTSHIM_FP8_E5M2: return 1;
    }
    return 0;
}

int dtype_valid(int dtype) { return dtype >= TRTSHIM_FLOAT32 && dtype <= TRTSHIM_FLOAT64; }
int role_valid(int role) { return role >= TRTSHIM_ROLE_KERNEL && role <= TRTSHIM_ROLE_VARIANCE; }

const char *dtype_name(trtshim_dtype dtype) {
    static const char *names[] = {"float32", "float16", "bfloat16", "int32", "int64", "int8",
                                  "uint8", "bool", "fp8_e4m3", "fp8_e5m2", "float64"};
    return dtype_valid((int)dtype) ? names[dtype] : "?";
}

const char *role_name(trtshim_role role) {
    static const char *names[] = {"kernel", "bias", "scale", "shift", "constant", "mean", "variance"};
    return role_valid((int)role) ? names[role] : "?";
}

int64_t shape_volume(int32_t rank, const int64_t *dims) {
    int64_t volume = 1;
    for (int32_t i = 0; i < rank; i++) {
        if (dims[i] < 0) return -1;
        if (dims[i] != 0 && volume > INT64_MAX / dims[i]) return -1;
        volume *= dims[i];
    }
    return volume;
}
