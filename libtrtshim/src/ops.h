/* ops.h: scalar definitions of the unary and elementwise functions, shared by the standalone kernels
   and the fused epilogues so that a fused and an unfused activation compute the same values. */
#ifndef TRTSHIM_OPS_H
#define TRTSHIM_OPS_H

#include "trtshim.h"

float unary_apply(trtshim_unary_op op, float x);
/* Applies op in place to n values. */
void unary_apply_n(trtshim_unary_op op, float *x, int64_t n);
float elementwise_apply(trtshim_elementwise_op op, float a, float b);
/* 1 for a valid enum value. */
int unary_op_valid(int op);
int elementwise_op_valid(int op);

#endif
