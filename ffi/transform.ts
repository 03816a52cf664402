/**
 * Native weight transforms for the refit effect layer: the weight map's expressions (src/weightmap/expr.ts)
 * and LoRA merges (src/lora/lora.ts) evaluated with libtrtshim's transform kernels.
 *
 * Results equal the TypeScript references (evaluateExpr, mergeAdapters) bit for bit, NaN payloads aside,
 * and so do the errors: the same Left for the same expression. Transpose, cast, BatchNorm folds and the
 * LoRA product run natively (threaded); reshape is a view; slice, concat, gather (constant indices) and
 * expand are copies done here, by the reference's own functions.
 *
 * Memory: a result is a fresh Float32Array. Intermediates this evaluator made itself are transformed in
 * place where the kernel allows it (cast, fold), and tensors from the lookup (possibly mapped files) are
 * never written, so evaluating one expression holds about its inputs plus one output at a time.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { Expr } from '../src/weightmap/expr.js';
import { concatF32, evaluateExpr, sliceF32, transposeF32, type EvalError, type F32Tensor, type SourceLookup } from '../src/weightmap/evaluate.js';
import { baseWeightOf, type LoraErrorDetail, type WeightedAdapter } from '../src/lora/lora.js';
import { overlayStore, readF32, type TensorStore } from '../src/weightmap/store.js';
import { call, DType, MAX_RANK } from './library.js';

export interface TransformOptions {
  /** Threads for one kernel call: 0 (default) one per core, 1 the calling thread only. */
  readonly numThreads?: number;
}

export type CastTarget = 'float32' | 'float16' | 'bfloat16';

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);
const threadsOf = (options?: TransformOptions): number => options?.numThreads ?? 0;

// ---- kernels, one tensor per call -------------------------------------------------------------------

/** x with its dimensions permuted (output dimension i is input dimension perm[i]). perm must be a
 *  permutation of x's rank; ranks above the native limit go through the TypeScript reference. `into` (not
 *  overlapping x) receives the result instead of a new array, so a caller can reuse one scratch buffer. */
export const permuteNative = (x: F32Tensor, perm: readonly number[], options?: TransformOptions & { into?: Float32Array }): F32Tensor => {
  const shape = perm.map((p) => x.shape[p]);
  if (options?.into !== undefined && options.into.length !== x.data.length) throw new RangeError(`permuteNative: destination of ${options.into.length} values for ${x.data.length}`);
  if (x.shape.length > MAX_RANK) {
    const t = transposeF32(x, perm);
    if (options?.into === undefined) return t;
    options.into.set(t.data);
    return { shape, data: options.into };
  }
  const out = options?.into ?? new Float32Array(x.data.length);
  if (out.length > 0) {
    const dims = BigInt64Array.from(x.shape.map((d) => BigInt(d)));
    call('trtshim_transform_permute', x.data, x.shape.length, dims, Int32Array.from(perm), out, threadsOf(options));
  }
  return { shape, data: out };
};

/** Values rounded to `to` and widened back to float32. `into` may be x.data itself (in place). */
export const castRoundNative = (x: F32Tensor, to: CastTarget, options?: TransformOptions & { into?: Float32Array }): F32Tensor => {
  const out = options?.into ?? new Float32Array(x.data.length);
  if (out.length !== x.data.length) throw new RangeError(`castRoundNative: destination of ${out.length} values for ${x.data.length}`);
  if (out.length > 0) call('trtshim_transform_cast_round', x.data, DType[to], out, out.length, threadsOf(options));
  return { shape: x.shape, data: out };
};

/** weight * gamma / sqrt(variance + epsilon) per output channel (axis 0); `into` may be weight.data. */
export const bnFoldWeightNative = (
  weight: F32Tensor,
  gamma: Float32Array,
  variance: Float32Array,
  epsilon: number,
  options?: TransformOptions & { into?: Float32Array },
): F32Tensor => {
  if (variance.length < gamma.length) throw new RangeError(`bnFoldWeightNative: ${variance.length} variances for ${gamma.length} channels`);
  const channels = gamma.length;
  const inner = channels === 0 ? 0 : weight.data.length / channels;
  if (!Number.isInteger(inner)) throw new RangeError(`bnFoldWeightNative: ${weight.data.length} values are not ${channels} channels`);
  const out = options?.into ?? new Float32Array(weight.data.length);
  if (out.length > 0) call('trtshim_transform_bn_fold_weight', weight.data, channels, inner, gamma, variance, epsilon, out, threadsOf(options));
  return { shape: weight.shape, data: out };
};

/** (bias - mean) * gamma / sqrt(variance + epsilon) + beta per channel; no bias folds as 0. */
export const bnFoldBiasNative = (
  bias: Float32Array | undefined,
  gamma: Float32Array,
  beta: Float32Array,
  mean: Float32Array,
  variance: Float32Array,
  epsilon: number,
): F32Tensor => {
  const channels = gamma.length;
  if ([beta, mean, variance, ...(bias ? [bias] : [])].some((v) => v.length < channels)) throw new RangeError('bnFoldBiasNative: per-channel vectors shorter than gamma');
  const out = new Float32Array(channels);
  if (channels > 0) call('trtshim_transform_bn_fold_bias', bias ?? null, gamma, beta, mean, variance, channels, epsilon, out);
  return { shape: [channels], data: out };
};

/**
 * weight += scale * (up @ down), in place. up is [out, rank] (row-major), down [rank, inFeatures]; the
 * weight is [out, inFeatures], or [inFeatures, out] when fanInFanOut (the delta goes in transposed).
 * Numerics of src/lora's loraDelta + merge: float64 sums in increasing rank order, rounded once.
 */
export const loraAddNative = (
  weight: Float32Array,
  up: Float32Array,
  down: Float32Array,
  dims: { readonly outFeatures: number; readonly inFeatures: number; readonly rank: number },
  scale: number,
  fanInFanOut: boolean,
  options?: TransformOptions,
): void => {
  const { outFeatures, inFeatures, rank } = dims;
  if (weight.length !== outFeatures * inFeatures || up.length < outFeatures * rank || down.length < rank * inFeatures) {
    throw new RangeError(`loraAddNative: weight of ${weight.length}, up of ${up.length}, down of ${down.length} values for [${outFeatures}, ${inFeatures}] rank ${rank}`);
  }
  if (weight.length === 0) return;
  call('trtshim_transform_lora_add', weight, outFeatures, inFeatures, fanInFanOut ? 1 : 0, up.length > 0 ? up : null, down.length > 0 ? down : null, rank, scale, threadsOf(options));
};

// ---- expressions ------------------------------------------------------------------------------------

/** A value during evaluation; `owned` when this evaluator allocated it (so it may be changed in place). */
interface Value {
  readonly t: F32Tensor;
  readonly owned: boolean;
}

class Failure {
  constructor(readonly error: EvalError) {}
}
const fail = (op: string, reason: string): never => {
  throw new Failure({ _tag: 'InvalidExpression', op, reason });
};

/** Per-channel vectors shorter than gamma read as NaN past their end, as the reference's loop does. */
const padNaN = (v: Float32Array, length: number): Float32Array => {
  if (v.length >= length) return v;
  const out = new Float32Array(length).fill(NaN);
  out.set(v);
  return out;
};

const isPermutation = (perm: readonly number[], rank: number): boolean =>
  perm.length === rank && [...perm].sort((a, b) => a - b).every((p, i) => p === i);

/** One operation of the reference evaluator applied to an evaluated input: its value and its Left. */
const viaReference = (e: Extract<Expr, { op: 'gather' | 'expand' }>, x: F32Tensor): F32Tensor => {
  const r = evaluateExpr({ ...e, x: { op: 'source', name: '' } }, () => x);
  if (E.isLeft(r)) throw new Failure(r.left);
  return r.right;
};

const evalValue = (e: Expr, lookup: SourceLookup, options: TransformOptions | undefined): Value => {
  const ev = (x: Expr) => evalValue(x, lookup, options);
  switch (e.op) {
    case 'source': {
      const t = lookup(e.name);
      if (t === undefined) throw new Failure({ _tag: 'MissingSource', name: e.name });
      // The kernels read count(shape) values: a lookup that disagrees with itself must not reach them.
      if (t.data.length !== count(t.shape)) fail('source', `'${e.name}' has ${t.data.length} values for shape [${t.shape}]`);
      return { t, owned: false };
    }
    case 'transpose': {
      const x = ev(e.x);
      const rank = x.t.shape.length;
      if (!isPermutation(e.perm, rank)) fail('transpose', `perm [${e.perm}] is not a permutation of rank ${rank}`);
      if (e.perm.every((p, i) => p === i)) return x;
      return { t: permuteNative(x.t, e.perm, options), owned: true };
    }
    case 'reshape': {
      const x = ev(e.x);
      if (count(e.shape) !== x.t.data.length) fail('reshape', `[${x.t.shape}] has ${x.t.data.length} elements; [${e.shape}] needs ${count(e.shape)}`);
      return { t: { shape: e.shape, data: x.t.data }, owned: x.owned };
    }
    case 'cast': {
      const x = ev(e.x);
      // Rounding float32 values to float32 changes nothing.
      if (e.to === 'float32') return x;
      return { t: castRoundNative(x.t, e.to, { ...options, ...(x.owned ? { into: x.t.data } : {}) }), owned: true };
    }
    case 'slice': {
      const x = ev(e.x).t;
      const { axis, start, end } = e;
      if (axis < 0 || axis >= x.shape.length || start < 0 || end > x.shape[axis] || start > end) fail('slice', `[${start}, ${end}) along axis ${axis} of [${x.shape}]`);
      return { t: sliceF32(x, axis, start, end), owned: true };
    }
    case 'concat': {
      const xs = e.xs.map((x) => ev(x).t);
      if (xs.length === 0) fail('concat', 'no inputs');
      const rank = xs[0].shape.length;
      for (const x of xs) {
        if (x.shape.length !== rank || x.shape.some((d, i) => i !== e.axis && d !== xs[0].shape[i])) fail('concat', `shapes ${xs.map((y) => `[${y.shape}]`).join(' ')} along axis ${e.axis}`);
      }
      return { t: concatF32(xs, e.axis), owned: true };
    }
    case 'gather': case 'expand': return { t: viaReference(e, ev(e.x).t), owned: true };
    case 'bnFoldWeight': {
      const w = ev(e.weight);
      const gamma = ev(e.gamma).t.data;
      const variance = padNaN(ev(e.variance).t.data, gamma.length);
      if (w.t.shape[0] !== gamma.length) fail('bnFoldWeight', `weight [${w.t.shape}] has ${w.t.shape[0]} output channels; the BatchNorm has ${gamma.length}`);
      return { t: bnFoldWeightNative(w.t, gamma, variance, e.epsilon, { ...options, ...(w.owned ? { into: w.t.data } : {}) }), owned: true };
    }
    case 'bnFoldBias': {
      const gamma = ev(e.gamma).t.data;
      const beta = ev(e.beta).t.data;
      const mean = ev(e.mean).t.data;
      const variance = padNaN(ev(e.variance).t.data, gamma.length);
      const bias = e.bias ? ev(e.bias).t.data : undefined;
      if ([beta, mean, bias ?? gamma].some((v) => v.length !== gamma.length)) fail('bnFoldBias', 'per-channel vectors of different lengths');
      return { t: bnFoldBiasNative(bias, gamma, beta, mean, variance, e.epsilon), owned: true };
    }
    case 'constant':
      return fail('constant', `no checkpoint source (${e.reason})`);
  }
};

/**
 * evaluateExpr (src/weightmap/evaluate.ts) on the native kernels: the same Right bit for bit and the same
 * Left. The result may share memory with a looked-up tensor (a source, or a reshape or float32 cast of
 * one); it is never written by this function. A failing native call (a library that cannot be loaded)
 * throws its NativeError / LibraryLoadError.
 */
export const evaluateExprNative = (e: Expr, lookup: SourceLookup, options?: TransformOptions): E.Either<EvalError, F32Tensor> => {
  try {
    return E.right(evalValue(e, lookup, options).t);
  } catch (x) {
    if (x instanceof Failure) return E.left(x.error);
    throw x;
  }
};

// ---- LoRA -------------------------------------------------------------------------------------------

/**
 * mergeAdapters (src/lora/lora.ts) with the delta computed and added natively: the same store bit for
 * bit and the same errors. Each target weight is copied once, and every adapter touching it is added to
 * that copy in place, in the order given.
 */
const countNonFinite = (data: Float32Array): number => {
  let n = 0;
  for (let k = 0; k < data.length; k++) if (!Number.isFinite(data[k])) n++;
  return n;
};

export const mergeLoraNative = (
  base: TensorStore,
  adapters: readonly WeightedAdapter[],
  options?: TransformOptions,
): E.Either<LoraErrorDetail, TensorStore> => {
  if (adapters.length === 0) return E.right(base);
  const merged = new Map<string, F32Tensor>();
  for (const { adapter, weight } of adapters) {
    for (const m of adapter.modules) {
      const target = baseWeightOf(m, adapter.format, base);
      if (target === undefined) return E.left({ _tag: 'NoBaseWeight', module: m.module, detail: 'no base checkpoint weight of that module (or more than one)' });
      const already = merged.get(target);
      const current = already ?? readF32(base, target);
      if (current === undefined) return E.left({ _tag: 'NoBaseWeight', module: m.module, detail: `base tensor '${target}' is not a float tensor` });
      const up = readF32(adapter.tensors, m.up)!;
      const down = readF32(adapter.tensors, m.down)!;
      const rows = up.shape[0];
      const rank = up.shape[1];
      const cols = count(down.shape) / rank;
      const expected = m.fanInFanOut ? [cols, rows] : [rows, cols];
      if (count(current.shape) !== rows * cols || (m.fanInFanOut ? current.shape[0] !== cols : current.shape[0] !== rows)) {
        return E.left({ _tag: 'DeltaShapeMismatch', module: m.module, base: target, expected: current.shape, found: expected });
      }
      // The reference reads up[o, r] at o * count(up.shape[1:]) + r * count(up.shape[2:]) ([out, r, 1, 1] for a
      // convolution): gather those into a dense [out, rank].
      const rowStride = count(up.shape.slice(1));
      const rankStride = count(up.shape.slice(2));
      const upDense = rowStride === rank && rankStride === 1 ? up.data : Float32Array.from({ length: rows * rank }, (_, k) => up.data[Math.floor(k / rank) * rowStride + (k % rank) * rankStride]);
      const data = already?.data ?? Float32Array.from(current.data);
      // A non-finite value stays non-finite under addition, so the new ones are the difference of the counts.
      const nonFiniteBefore = countNonFinite(data);
      loraAddNative(data, upDense, down.data, { outFeatures: rows, inFeatures: cols, rank }, m.scaling * weight, m.fanInFanOut, options);
      const bad = countNonFinite(data) - nonFiniteBefore;
      if (bad > 0) return E.left({ _tag: 'NonFiniteMerge', module: m.module, base: target, count: bad, scale: m.scaling * weight });
      merged.set(target, { shape: current.shape, data });
    }
  }
  return E.right(overlayStore(base, merged));
};
