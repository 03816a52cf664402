/**
 * Scalar functions of the unary and elementwise layers, in float64, following trtshim.h's definitions.
 * Results are rounded to float32 by the caller.
 */
import type { ElementwiseOp, UnaryOp } from '../network/types.js';

/** erf(x) to about 1e-13: its Taylor series for |x| < 4, the continued fraction of erfc beyond. */
export const erf = (x: number): number => {
  if (Number.isNaN(x)) return NaN;
  const ax = Math.abs(x);
  if (ax < 4) {
    let term = x;
    let sum = x;
    for (let n = 1; n < 200; n++) {
      term *= (-x * x) / n;
      const next = term / (2 * n + 1);
      sum += next;
      if (Math.abs(next) < 1e-17 * Math.abs(sum)) break;
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  }
  // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + (2/2)/(x + (3/2)/(x + ...)))), evaluated bottom-up.
  let fraction = ax;
  for (let k = 60; k >= 1; k--) fraction = ax + k / 2 / fraction;
  const erfc = Math.exp(-ax * ax) / Math.sqrt(Math.PI) / fraction;
  return Math.sign(x) * (1 - erfc);
};

export const unary = (op: UnaryOp, x: number): number => {
  switch (op) {
    case 'identity':
      return x;
    case 'relu':
      return x > 0 ? x : 0;
    case 'gelu_erf':
      return x * 0.5 * (1 + erf(x / Math.SQRT2));
    case 'gelu_tanh':
      return x * 0.5 * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));
    case 'silu':
      return x / (1 + Math.exp(-x));
    case 'sigmoid':
      return 1 / (1 + Math.exp(-x));
    case 'tanh':
      return Math.tanh(x);
    case 'hardswish':
      return (x * Math.min(Math.max(x + 3, 0), 6)) / 6;
    case 'hardsigmoid':
      return Math.max(0, Math.min(1, x / 6 + 0.5));
    case 'exp':
      return Math.exp(x);
    case 'sqrt':
      return Math.sqrt(x);
    case 'reciprocal':
      return 1 / x;
    case 'neg':
      return -x;
    case 'erf':
      return erf(x);
    case 'abs':
      return Math.abs(x);
    case 'log':
      return Math.log(x);
  }
};

export const elementwise = (op: ElementwiseOp, a: number, b: number): number => {
  switch (op) {
    case 'add':
      return a + b;
    case 'sub':
      return a - b;
    case 'mul':
      return a * b;
    case 'div':
      return a / b;
    case 'pow':
      return Math.pow(a, b);
    case 'min':
      return Math.min(a, b);
    case 'max':
      return Math.max(a, b);
  }
};
