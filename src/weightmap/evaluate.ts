/**
 * The TypeScript reference evaluator of weight-map expressions over float32 tensors. Plain loops; float32
 * semantics (every arithmetic result rounded with Math.fround, in the order the exporters compute folds).
 * The native transform kernels of the effect layer are checked against it.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { Expr } from './expr.js';

export interface F32Tensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

export type EvalError =
  | { readonly _tag: 'MissingSource'; readonly name: string }
  | { readonly _tag: 'InvalidExpression'; readonly op: string; readonly reason: string };

export type SourceLookup = (name: string) => F32Tensor | undefined;

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

class Failure {
  constructor(readonly error: EvalError) {}
}
const fail = (op: string, reason: string): never => {
  throw new Failure({ _tag: 'InvalidExpression', op, reason });
};

export const transposeF32 = (x: F32Tensor, perm: readonly number[]): F32Tensor => {
  const rank = x.shape.length;
  if (perm.length !== rank || [...perm].sort((a, b) => a - b).some((p, i) => p !== i)) fail('transpose', `perm [${perm}] is not a permutation of rank ${rank}`);
  const outShape = perm.map((p) => x.shape[p]);
  const strides = new Array<number>(rank);
  for (let i = rank - 1, s = 1; i >= 0; i--) {
    strides[i] = s;
    s *= x.shape[i];
  }
  const step = perm.map((p) => strides[p]);
  const n = x.data.length;
  const out = new Float32Array(n);
  if (rank === 2) {
    const [r, c] = outShape;
    for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[i * c + j] = x.data[i * step[0] + j * step[1]];
    return { shape: outShape, data: out };
  }
  const index = new Array<number>(rank).fill(0);
  let offset = 0;
  for (let e = 0; e < n; e++) {
    out[e] = x.data[offset];
    for (let i = rank - 1; i >= 0; i--) {
      index[i]++;
      offset += step[i];
      if (index[i] < outShape[i]) break;
      offset -= step[i] * index[i];
      index[i] = 0;
    }
  }
  return { shape: outShape, data: out };
};

const halfRound = (v: number): number => {
  // Round to the nearest float16 value (ties to even), as a cast to float16 and back would.
  if (!Number.isFinite(v) || v === 0) return v;
  const a = Math.abs(v);
  if (a >= 65520) return Math.sign(v) * Infinity;
  const exp = Math.max(Math.floor(Math.log2(a)), -14);
  const quantum = 2 ** (exp - 10);
  const q = a / quantum;
  let r = Math.round(q);
  if (Math.abs(q - Math.trunc(q) - 0.5) < 1e-12 && r % 2 === 1) r -= 1;
  return Math.fround(Math.sign(v) * r * quantum);
};

const bfloatRound = (v: number): number => {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer);
  if (Number.isNaN(v)) return v;
  const lsb = (u[0] >>> 16) & 1;
  u[0] = ((u[0] + 0x7fff + lsb) >>> 16) << 16;
  return f[0];
};

export const roundTo = (to: 'float32' | 'float16' | 'bfloat16'): ((v: number) => number) =>
  to === 'float16' ? halfRound : to === 'bfloat16' ? bfloatRound : Math.fround;

export const sliceF32 = (x: F32Tensor, axis: number, start: number, end: number): F32Tensor => {
  if (axis < 0 || axis >= x.shape.length || start < 0 || end > x.shape[axis] || start > end) {
    fail('slice', `[${start}, ${end}) along axis ${axis} of [${x.shape}]`);
  }
  const outer = count(x.shape.slice(0, axis));
  const inner = count(x.shape.slice(axis + 1));
  const dim = x.shape[axis];
  const len = end - start;
  const out = new Float32Array(outer * len * inner);
  for (let o = 0; o < outer; o++) out.set(x.data.subarray((o * dim + start) * inner, (o * dim + end) * inner), o * len * inner);
  return { shape: x.shape.map((d, i) => (i === axis ? len : d)), data: out };
};

export const concatF32 = (xs: readonly F32Tensor[], axis: number): F32Tensor => {
  if (xs.length === 0) fail('concat', 'no inputs');
  const rank = xs[0].shape.length;
  for (const x of xs) {
    if (x.shape.length !== rank || x.shape.some((d, i) => i !== axis && d !== xs[0].shape[i])) fail('concat', `shapes ${xs.map((y) => `[${y.shape}]`).join(' ')} along axis ${axis}`);
  }
  const outer = count(xs[0].shape.slice(0, axis));
  const chunks = xs.map((x) => count(x.shape.slice(axis)));
  const total = chunks.reduce((a, b) => a + b, 0);
  const out = new Float32Array(outer * total);
  let o = 0;
  for (let a = 0; a < outer; a++) {
    xs.forEach((x, k) => {
      out.set(x.data.subarray(a * chunks[k], (a + 1) * chunks[k]), o);
      o += chunks[k];
    });
  }
  return { shape: xs[0].shape.map((d, i) => (i === axis ? xs.reduce((s, x) => s + x.shape[axis], 0) : d)), data: out };
};

const isCount = (d: number): boolean => Number.isInteger(d) && d >= 0;

/** ONNX Gather along one axis with constant indices (see the `gather` expression). Values are copied. */
export const gatherF32 = (x: F32Tensor, axis: number, indicesShape: readonly number[], indices: readonly number[]): F32Tensor => {
  const rank = x.shape.length;
  const a = axis < 0 ? axis + rank : axis;
  if (!Number.isInteger(a) || a < 0 || a >= rank) fail('gather', `axis ${axis} is out of range for [${x.shape}]`);
  if (!indicesShape.every(isCount) || count(indicesShape) !== indices.length) fail('gather', `${indices.length} indices for indices shape [${indicesShape}]`);
  const dim = x.shape[a];
  const picks = indices.map((i) => (i < 0 ? i + dim : i));
  const bad = picks.findIndex((p) => !Number.isInteger(p) || p < 0 || p >= dim);
  if (bad >= 0) fail('gather', `index ${indices[bad]} is out of range for axis ${a} of [${x.shape}]`);
  const outer = count(x.shape.slice(0, a));
  const inner = count(x.shape.slice(a + 1));
  const out = new Float32Array(outer * picks.length * inner);
  let o = 0;
  for (let b = 0; b < outer; b++) {
    for (const p of picks) {
      const base = (b * dim + p) * inner;
      for (let i = 0; i < inner; i++) out[o++] = x.data[base + i];
    }
  }
  return { shape: [...x.shape.slice(0, a), ...indicesShape, ...x.shape.slice(a + 1)], data: out };
};

/** x broadcast to exactly `shape` (numpy rules: dimensions aligned right, each 1 or equal). Values are copied. */
export const expandF32 = (x: F32Tensor, shape: readonly number[]): F32Tensor => {
  const rank = shape.length;
  const offset = rank - x.shape.length;
  if (!shape.every(isCount) || offset < 0 || x.shape.some((d, i) => d !== 1 && d !== shape[offset + i])) fail('expand', `[${x.shape}] does not broadcast to [${shape}]`);
  const n = count(shape);
  const out = new Float32Array(n);
  if (n === 0) return { shape, data: out };
  // Input stride per output dimension: 0 where the input is broadcast (missing or 1).
  const step = new Array<number>(rank).fill(0);
  for (let i = x.shape.length - 1, s = 1; i >= 0; i--) {
    if (x.shape[i] !== 1) step[offset + i] = s;
    s *= x.shape[i];
  }
  const index = new Array<number>(rank).fill(0);
  let from = 0;
  for (let e = 0; e < n; e++) {
    out[e] = x.data[from];
    for (let i = rank - 1; i >= 0; i--) {
      index[i]++;
      from += step[i];
      if (index[i] < shape[i]) break;
      from -= step[i] * index[i];
      index[i] = 0;
    }
  }
  return { shape, data: out };
};

/** gamma / sqrt(var + eps) per channel, each step rounded to float32. */
export const bnScale = (gamma: Float32Array, variance: Float32Array, epsilon: number): Float32Array => {
  const out = new Float32Array(gamma.length);
  const eps = Math.fround(epsilon);
  for (let c = 0; c < gamma.length; c++) out[c] = Math.fround(gamma[c] / Math.fround(Math.sqrt(Math.fround(variance[c] + eps))));
  return out;
};

const evalOrThrow = (e: Expr, lookup: SourceLookup): F32Tensor => {
  const ev = (x: Expr) => evalOrThrow(x, lookup);
  switch (e.op) {
    case 'source': {
      const t = lookup(e.name);
      if (t === undefined) throw new Failure({ _tag: 'MissingSource', name: e.name });
      return t;
    }
    case 'transpose': return transposeF32(ev(e.x), e.perm);
    case 'reshape': {
      const x = ev(e.x);
      if (count(e.shape) !== x.data.length) fail('reshape', `[${x.shape}] has ${x.data.length} elements; [${e.shape}] needs ${count(e.shape)}`);
      return { shape: e.shape, data: x.data };
    }
    case 'cast': {
      const x = ev(e.x);
      return { shape: x.shape, data: x.data.map(roundTo(e.to)) };
    }
    case 'slice': return sliceF32(ev(e.x), e.axis, e.start, e.end);
    case 'concat': return concatF32(e.xs.map(ev), e.axis);
    case 'gather': return gatherF32(ev(e.x), e.axis, e.indicesShape, e.indices);
    case 'expand': return expandF32(ev(e.x), e.shape);
    case 'bnFoldWeight': {
      const w = ev(e.weight);
      const s = bnScale(ev(e.gamma).data, ev(e.variance).data, e.epsilon);
      if (w.shape[0] !== s.length) fail('bnFoldWeight', `weight [${w.shape}] has ${w.shape[0]} output channels; the BatchNorm has ${s.length}`);
      const inner = w.data.length / Math.max(1, s.length);
      const out = new Float32Array(w.data.length);
      for (let c = 0; c < s.length; c++) for (let i = 0; i < inner; i++) out[c * inner + i] = Math.fround(w.data[c * inner + i] * s[c]);
      return { shape: w.shape, data: out };
    }
    case 'bnFoldBias': {
      const gamma = ev(e.gamma).data;
      const beta = ev(e.beta).data;
      const mean = ev(e.mean).data;
      const s = bnScale(gamma, ev(e.variance).data, e.epsilon);
      const bias = e.bias ? ev(e.bias).data : new Float32Array(s.length);
      if ([beta, mean, bias].some((v) => v.length !== s.length)) fail('bnFoldBias', 'per-channel vectors of different lengths');
      const out = new Float32Array(s.length);
      for (let c = 0; c < s.length; c++) out[c] = Math.fround(Math.fround(Math.fround(bias[c] - mean[c]) * s[c]) + beta[c]);
      return { shape: [s.length], data: out };
    }
    case 'constant':
      return fail('constant', `no checkpoint source (${e.reason})`);
  }
};

/** Evaluates an expression; Left names the missing source or the inconsistent operation. */
export const evaluateExpr = (e: Expr, lookup: SourceLookup): E.Either<EvalError, F32Tensor> => {
  try {
    return E.right(evalOrThrow(e, lookup));
  } catch (x) {
    if (x instanceof Failure) return E.left(x.error);
    throw x;
  }
};
