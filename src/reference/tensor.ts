/**
 * Tensors of the reference evaluator: a dtype, a shape and row-major data. Activations are float32
 * (every layer rounds its results to float32, as the engine stores them); index tensors are int32/int64.
 */
import type { Weights } from '../network/types.js';
import { widen16 } from './half.js';

export type Tensor =
  | { readonly dtype: 'float32'; readonly shape: readonly number[]; readonly data: Float32Array }
  | { readonly dtype: 'int32'; readonly shape: readonly number[]; readonly data: Int32Array }
  | { readonly dtype: 'int64'; readonly shape: readonly number[]; readonly data: BigInt64Array };

export type FloatTensor = Extract<Tensor, { dtype: 'float32' }>;

/** Raised for a network or input the evaluator cannot evaluate; names the layer and what was wrong. */
export class ReferenceEvaluationError extends Error {
  override readonly name = 'ReferenceEvaluationError';
  readonly _tag = 'ReferenceEvaluationError' as const;
  constructor(
    readonly layer: string,
    readonly reason: string,
  ) {
    super(`${layer}: ${reason}`);
  }
}

export const fail = (layer: string, reason: string): never => {
  throw new ReferenceEvaluationError(layer, reason);
};

export const elementCount = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** Row-major strides. */
export const stridesOf = (shape: readonly number[]): number[] => {
  const strides = new Array<number>(shape.length);
  let s = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
};

/** An axis counted from the end when negative; fails unless it lies in [0, rank). */
export const normalizeAxis = (layer: string, axis: number, rank: number): number => {
  const a = axis < 0 ? axis + rank : axis;
  if (!Number.isInteger(a) || a < 0 || a >= rank) fail(layer, `axis ${axis} out of range for rank ${rank}`);
  return a;
};

export const floatTensor = (shape: readonly number[], data: Float32Array): FloatTensor => ({ dtype: 'float32', shape, data });

/** A weight's values as float32 (float16/bfloat16 widened), or fails for an index dtype. */
export const weightValues = (layer: string, w: Weights): Float32Array => {
  switch (w.dtype) {
    case 'float32':
      if (!(w.data instanceof Float32Array)) return fail(layer, 'float32 weights need a Float32Array');
      return w.data;
    case 'float16':
    case 'bfloat16':
      if (!(w.data instanceof Uint16Array)) return fail(layer, `${w.dtype} weights need a Uint16Array of bit patterns`);
      return widen16(w.dtype, w.data);
    default:
      return fail(layer, `weights of dtype ${w.dtype} where float weights were expected`);
  }
};

/** Float values of a weight with an expected element count. */
export const weightOfCount = (layer: string, role: string, w: Weights, count: number): Float32Array => {
  const values = weightValues(layer, w);
  if (values.length !== count) fail(layer, `${role} has ${values.length} elements, expected ${count}`);
  return values;
};

/** Numpy broadcasting of two shapes; fails when they do not broadcast. */
export const broadcastShapes = (layer: string, a: readonly number[], b: readonly number[]): number[] => {
  const rank = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < rank; i++) {
    const da = a[a.length - rank + i] ?? 1;
    const db = b[b.length - rank + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1) fail(layer, `shapes [${a}] and [${b}] do not broadcast`);
    out.push(da === 1 ? db : da);
  }
  return out;
};

/** For each flat index of `outShape`, the flat index into a tensor of `shape` broadcast to it. */
export const broadcastIndex = (shape: readonly number[], outShape: readonly number[]): Int32Array => {
  const total = elementCount(outShape);
  const out = new Int32Array(total);
  const rank = outShape.length;
  const padded = [...new Array<number>(rank - shape.length).fill(1), ...shape];
  const strides = stridesOf(padded).map((s, i) => (padded[i] === 1 ? 0 : s));
  const index = new Array<number>(rank).fill(0);
  for (let flat = 0; flat < total; flat++) {
    let src = 0;
    for (let d = 0; d < rank; d++) src += index[d] * strides[d];
    out[flat] = src;
    for (let d = rank - 1; d >= 0; d--) {
      if (++index[d] < outShape[d]) break;
      index[d] = 0;
    }
  }
  return out;
};

/** Values of a tensor as plain numbers (index tensors included). */
export const numberAt = (t: Tensor, i: number): number => (t.dtype === 'int64' ? Number(t.data[i]) : t.data[i]);
