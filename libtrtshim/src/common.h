/* common.h: what every source file of libtrtshim shares: error reporting and small helpers. */
#ifndef TRTSHIM_COMMON_H
#define TRTSHIM_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include "trtshim.h"

/* Records a formatted message as the last error and returns `status`, so a failing call can end with
   `return set_error(TRTSHIM_ERR_ARGUMENT, "layer '%s': ...", name);`. */
trtshim_status set_error(trtshim_status status, const char *format, ...) __attribute__((format(printf, 2, 3)));

/* Name of a dtype or role for messages ("float32", "kernel"); "?" for an invalid value. */
const char *dtype_name(trtshim_dtype dtype);
const char *role_name(trtshim_role role);
int dtype_valid(int dtype);
int role_valid(int role);

/* Product of dims, or -1 when a dimension is negative or the product overflows int64. */
int64_t shape_volume(int32_t rank, const int64_t *dims);

#endif
