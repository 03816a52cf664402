/**
 * Build-time evaluation of operators whose inputs are all constants (shape arithmetic, Cast, Transpose
 * or Reshape of initializers, ...). Values are computed in float64 and stored in the output dtype, which
 * rounds float32 results once, as a float32 kernel would for these simple operations.
 * An evaluator returns undefined when it does not handle a case; the node then stays in the graph.
 */
import { allocate, elementCount, isFloat, tensorOf, toNumbers, type DType, type Node, type Tensor, type TensorType } from './ir.js';
import { attrFloat, attrInt, attrInts, normalizeAxis, resolveSlice, resolveSplit } from './shapes.js';

export type Evaluator = (node: Node, inputs: readonly (Tensor | undefined)[], outputs: readonly TensorType[], opset: number) => Tensor[] | undefined;

const strides = (shape: readonly number[]): number[] => {
  const out = new Array<number>(shape.length);
  let s = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    out[i] = s;
    s *= shape[i];
  }
  return out;
};

/** For each output element (row-major over `outShape`), the offset of the broadcast input element. */
const broadcastOffsets = (inShape: readonly number[], outShape: readonly number[]): Int32Array => {
  const n = elementCount(outShape);
  const offsets = new Int32Array(n);
  const rank = outShape.length;
  const inStrides = strides(inShape);
  const step = outShape.map((d, i) => {
    const k = i - (rank - inShape.length);
    return k < 0 || inShape[k] === 1 ? 0 : inStrides[k];
  });
  const index = new Array<number>(rank).fill(0);
  let offset = 0;
  for (let e = 0; e < n; e++) {
    offsets[e] = offset;
    for (let i = rank - 1; i >= 0; i--) {
      index[i]++;
      offset += step[i];
      if (index[i] < outShape[i]) break;
      offset -= step[i] * index[i];
      index[i] = 0;
    }
  }
  return offsets;
};

const make = (dtype: DType, shape: readonly number[], values: ArrayLike<number>): Tensor => tensorOf(dtype, shape, values);

/** Same values in another shape: Reshape, Flatten, Squeeze, Unsqueeze, Identity. */
const relabel: Evaluator = (_node, [x], [out]) => (x === undefined ? undefined : [{ dtype: x.dtype, shape: out.shape, data: x.data }]);

const mapElements = (f: (v: number) => number, onlyFloat = false): Evaluator => (_node, [x], [out]) => {
  if (x === undefined || (onlyFloat && !isFloat(x.dtype))) return undefined;
  return [make(out.dtype, out.shape, toNumbers(x).map(f))];
};

const combine = (f: (...v: number[]) => number): Evaluator => (_node, inputs, [out]) => {
  if (inputs.some((t) => t === undefined)) return undefined;
  const tensors = inputs as Tensor[];
  const values = tensors.map(toNumbers);
  const offsets = tensors.map((t) => broadcastOffsets(t.shape, out.shape));
  const n = elementCount(out.shape);
  const result = new Float64Array(n);
  const args = new Array<number>(tensors.length);
  for (let e = 0; e < n; e++) {
    for (let k = 0; k < tensors.length; k++) args[k] = values[k][offsets[k][e]];
    result[e] = f(...args);
  }
  return [make(out.dtype, out.shape, result)];
};

/** Integer division truncates toward zero, as ONNX Runtime does. */
const divide: Evaluator = (node, inputs, outputs, opset) => {
  const intDiv = inputs[0] !== undefined && !isFloat(inputs[0].dtype);
  return combine((a, b) => (intDiv ? Math.trunc(a / b) : a / b))(node, inputs, outputs, opset);
};

const gatherAxis = (x: Tensor, axis: number, picks: readonly number[], outShape: readonly number[]): Tensor => {
  const outer = elementCount(x.shape.slice(0, axis));
  const inner = elementCount(x.shape.slice(axis + 1));
  const dim = x.shape[axis];
  const out = allocate(x.dtype, outer * picks.length * inner);
  const src = x.data as unknown as { [i: number]: number | bigint };
  const dst = out as unknown as { [i: number]: number | bigint };
  let o = 0;
  for (let a = 0; a < outer; a++) {
    for (const p of picks) {
      const base = (a * dim + p) * inner;
      for (let i = 0; i < inner; i++) dst[o++] = src[base + i];
    }
  }
  return { dtype: x.dtype, shape: outShape, data: out };
};

const transpose = (x: Tensor, perm: readonly number[]): Tensor => {
  const outShape = perm.map((p) => x.shape[p]);
  const inStrides = strides(x.shape);
  const permuted = perm.map((p) => inStrides[p]);
  const n = elementCount(outShape);
  const out = allocate(x.dtype, n);
  const src = x.data as unknown as { [i: number]: number | bigint };
  const dst = out as unknown as { [i: number]: number | bigint };
  const index = new Array<number>(outShape.length).fill(0);
  let offset = 0;
  for (let e = 0; e < n; e++) {
    dst[e] = src[offset];
    for (let i = outShape.length - 1; i >= 0; i--) {
      index[i]++;
      offset += permuted[i];
      if (index[i] < outShape[i]) break;
      offset -= permuted[i] * index[i];
      index[i] = 0;
    }
  }
  return { dtype: x.dtype, shape: outShape, data: out };
};

export const transposeTensor = transpose;

/** Integer ranges of the integer dtypes: [min, max]. */
const integerRange: Partial<Record<DType, readonly [number, number]>> = {
  int8: [-128, 127], uint8: [0, 255], int16: [-32768, 32767], uint16: [0, 65535],
  int32: [-(2 ** 31), 2 ** 31 - 1], uint32: [0, 2 ** 32 - 1], int64: [-(2 ** 63), 2 ** 63 - 1024], uint64: [0, 2 ** 64 - 2048], // the largest doubles below 2^63 and 2^64
};

const castTo = (target: DType) => (x: Tensor, shape: readonly number[]): Tensor | undefined => {
  if (target === 'float16' || target === 'bfloat16' || x.dtype === 'float16' || x.dtype === 'bfloat16') return undefined;
  if (target === x.dtype) return { ...x, shape };
  const values = toNumbers(x);
  if (isFloat(target)) return make(target, shape, values);
  if (target === 'bool') return make(target, shape, values.map((v) => (v !== 0 ? 1 : 0)));
  const [lo, hi] = integerRange[target]!;
  const converted = values.map(Math.trunc);
  if (converted.every((v) => v >= lo && v <= hi)) return make(target, shape, converted);
  // NaN, infinities and out-of-range values: ONNX leaves the result undefined. ONNX Runtime and PyTorch on
  // x86 give the "integer indefinite" value (the most negative int32 / int64) there; other targets stay run time.
  // (T5's relative-position buckets cast log(0) = -inf to int64, then discard it with a Where.)
  if (target !== 'int32' && target !== 'int64') return undefined;
  return make(target, shape, converted.map((v) => (v >= lo && v <= hi ? v : lo)));
};

const erf = (x: number): number => {
  // Abramowitz-Stegun 7.1.26 is too coarse for weights; use a series / continued fraction split.
  const t = Math.abs(x);
  if (t < 2.5) {
    let sum = t, term = t, k = 0;
    while (Math.abs(term) > 1e-17 * Math.abs(sum) && k < 200) {
      k++;
      term *= (-t * t) / k;
      sum += term / (2 * k + 1);
    }
    return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * sum;
  }
  let f = 0;
  for (let k = 60; k >= 1; k--) f = (k / 2) / (t + f);
  return Math.sign(x) * (1 - Math.exp(-t * t) / Math.sqrt(Math.PI) / (t + f));
};

export const evaluators: Readonly<Record<string, Evaluator>> = {
  Identity: relabel, Reshape: relabel, Flatten: relabel, Squeeze: relabel, Unsqueeze: relabel,
  Neg: mapElements((v) => -v),
  Abs: mapElements(Math.abs),
  Sqrt: mapElements(Math.sqrt, true),
  Reciprocal: mapElements((v) => 1 / v, true),
  Exp: mapElements(Math.exp, true),
  Log: mapElements(Math.log, true),
  Tanh: mapElements(Math.tanh, true),
  Erf: mapElements(erf, true),
  Relu: mapElements((v) => Math.max(0, v)),
  Sigmoid: mapElements((v) => 1 / (1 + Math.exp(-v)), true),
  Not: mapElements((v) => (v ? 0 : 1)),
  IsNaN: mapElements((v) => (Number.isNaN(v) ? 1 : 0)),
  IsInf: mapElements((v) => (v === Infinity || v === -Infinity ? 1 : 0)),
  Add: combine((a, b) => a + b),
  Sub: combine((a, b) => a - b),
  Mul: combine((a, b) => a * b),
  Div: divide,
  Pow: combine((a, b) => Math.pow(a, b)),
  Max: combine((...v) => Math.max(...v)),
  Min: combine((...v) => Math.min(...v)),
  Equal: combine((a, b) => (a === b ? 1 : 0)),
  Less: combine((a, b) => (a < b ? 1 : 0)),
  Greater: combine((a, b) => (a > b ? 1 : 0)),
  LessOrEqual: combine((a, b) => (a <= b ? 1 : 0)),
  GreaterOrEqual: combine((a, b) => (a >= b ? 1 : 0)),
  And: combine((a, b) => (a && b ? 1 : 0)),
  Or: combine((a, b) => (a || b ? 1 : 0)),
  Where: combine((c, a, b) => (c ? a : b)),
  Expand: (node, [x], outputs, opset) => (x === undefined ? undefined : combine((v) => v)(node, [x], outputs, opset)),
  Cast: (node, [x], [out]) => {
    if (x === undefined) return undefined;
    const t = castTo(out.dtype)(x, out.shape);
    return t === undefined ? undefined : [t];
  },
  ConstantOfShape: (node, _inputs, [out]) => {
    const value = node.attributes['value'];
    const fill = value?.kind === 'tensor' ? toNumbers(value.value)[0] ?? 0 : 0;
    if (out.dtype === 'float16' || out.dtype === 'bfloat16') return undefined;
    return [make(out.dtype, out.shape, new Float64Array(elementCount(out.shape)).fill(fill))];
  },
  Transpose: (node, [x]) => {
    if (x === undefined) return undefined;
    return [transpose(x, attrInts(node, 'perm') ?? x.shape.map((_, i) => x.shape.length - 1 - i))];
  },
  Concat: (node, inputs, [out]) => {
    if (inputs.some((t) => t === undefined)) return undefined;
    const tensors = inputs as Tensor[];
    const axis = normalizeAxis(node, attrInt(node, 'axis', 0), out.shape.length);
    const outer = elementCount(out.shape.slice(0, axis));
    const data = allocate(out.dtype, elementCount(out.shape));
    const dst = data as unknown as { [i: number]: number | bigint };
    let o = 0;
    for (let a = 0; a < outer; a++) {
      for (const t of tensors) {
        const chunk = elementCount(t.shape.slice(axis));
        const src = t.data as unknown as { [i: number]: number | bigint };
        for (let i = 0; i < chunk; i++) dst[o++] = src[a * chunk + i];
      }
    }
    return [{ dtype: out.dtype, shape: out.shape, data }];
  },
  Gather: (node, [x, indices], [out]) => {
    if (x === undefined || indices === undefined) return undefined;
    const axis = normalizeAxis(node, attrInt(node, 'axis', 0), x.shape.length);
    const dim = x.shape[axis];
    const picks = toNumbers(indices).map((i) => (i < 0 ? i + dim : i));
    if (picks.some((p) => p < 0 || p >= dim)) return undefined;
    return [gatherAxis(x, axis, picks, out.shape)];
  },
  GatherElements: (node, [x, indices], [out]) => {
    if (x === undefined || indices === undefined) return undefined;
    const rank = x.shape.length;
    const axis = normalizeAxis(node, attrInt(node, 'axis', 0), rank);
    const dim = x.shape[axis];
    const xStrides = strides(x.shape);
    const picks = toNumbers(indices);
    const n = elementCount(out.shape);
    const data = allocate(x.dtype, n);
    const src = x.data as unknown as { [i: number]: number | bigint };
    const dst = data as unknown as { [i: number]: number | bigint };
    const index = new Array<number>(rank).fill(0);
    for (let e = 0; e < n; e++) {
      const p = picks[e] < 0 ? picks[e] + dim : picks[e];
      if (!(p >= 0 && p < dim)) return undefined; // out of range: left to run time, which reports it
      let offset = 0;
      for (let d = 0; d < rank; d++) {
        // Every dimension but the axis indexes data at the output's own position (indices may be smaller).
        if (d !== axis && index[d] >= x.shape[d]) return undefined;
        offset += (d === axis ? p : index[d]) * xStrides[d];
      }
      dst[e] = src[offset];
      for (let d = rank - 1; d >= 0; d--) {
        if (++index[d] < out.shape[d]) break;
        index[d] = 0;
      }
    }
    return [{ dtype: x.dtype, shape: out.shape, data }];
  },
  GatherND: (node, [x, indices], [out]) => {
    if (x === undefined || indices === undefined) return undefined;
    const batchDims = attrInt(node, 'batch_dims', 0);
    const depth = indices.shape[indices.shape.length - 1];
    const xStrides = strides(x.shape);
    const slice = elementCount(x.shape.slice(batchDims + depth));
    const batch = elementCount(x.shape.slice(0, batchDims));
    const perBatch = elementCount(indices.shape.slice(batchDims, -1));
    const picks = toNumbers(indices);
    const data = allocate(x.dtype, elementCount(out.shape));
    const src = x.data as unknown as { [i: number]: number | bigint };
    const dst = data as unknown as { [i: number]: number | bigint };
    const batchStride = batchDims === 0 ? 0 : xStrides[batchDims - 1];
    let o = 0;
    for (let b = 0; b < batch; b++) {
      for (let t = 0; t < perBatch; t++) {
        let offset = b * batchStride;
        for (let k = 0; k < depth; k++) {
          const dim = x.shape[batchDims + k];
          const raw = picks[(b * perBatch + t) * depth + k];
          const p = raw < 0 ? raw + dim : raw;
          if (!(p >= 0 && p < dim)) return undefined;
          offset += p * xStrides[batchDims + k];
        }
        for (let i = 0; i < slice; i++) dst[o++] = src[offset + i];
      }
    }
    return [{ dtype: x.dtype, shape: out.shape, data }];
  },
  Slice: (node, inputs, [out]) => {
    const [x, starts, ends, axes, steps] = inputs;
    if (x === undefined || starts === undefined || ends === undefined) return undefined;
    if (node.inputs[3] && axes === undefined) return undefined;
    if (node.inputs[4] && steps === undefined) return undefined;
    const s = resolveSlice(node, x.shape, toNumbers(starts), toNumbers(ends), axes && toNumbers(axes), steps && toNumbers(steps));
    let t: Tensor = x;
    for (let a = 0; a < x.shape.length; a++) {
      const picks = Array.from({ length: s.count[a] }, (_, i) => s.start[a] + i * s.step[a]);
      t = gatherAxis(t, a, picks, t.shape.map((d, k) => (k === a ? picks.length : d)));
    }
    return [{ ...t, shape: out.shape }];
  },
  Split: (node, inputs, outputs, opset) => {
    const [x] = inputs;
    if (x === undefined) return undefined;
    const { axis, sizes } = resolveSplit({ node, opset, types: inputs.map((t) => t && { dtype: t.dtype, shape: t.shape }), values: inputs });
    let begin = 0;
    return sizes.map((size, k) => {
      const picks = Array.from({ length: size }, (_, i) => begin + i);
      begin += size;
      return gatherAxis(x, axis, picks, outputs[k].shape);
    });
  },
  Range: (_node, [start, , delta], [out]) => {
    if (start === undefined || delta === undefined) return undefined;
    const s = toNumbers(start)[0];
    const d = toNumbers(delta)[0];
    return [make(out.dtype, out.shape, Array.from({ length: out.shape[0] }, (_, i) => s + i * d))];
  },
  HardSigmoid: (node, [x], [out]) => {
    if (x === undefined || !isFloat(x.dtype)) return undefined;
    const alpha = attrFloat(node, 'alpha', 0.2);
    const beta = attrFloat(node, 'beta', 0.5);
    return [make(out.dtype, out.shape, toNumbers(x).map((v) => Math.max(0, Math.min(1, alpha * v + beta))))];
  },
};

/** Resolved parameters a folded operation applied, beyond its attributes: what the weight map needs to
 *  turn the provenance into an expression without the graph (resolved axes, permutations, index shapes). */
export type ProvenanceDetail = (
  node: Node,
  inputs: readonly (TensorType | undefined)[],
  values: readonly (Tensor | undefined)[],
  outputs: readonly TensorType[],
) => Record<string, number | readonly number[]>;

const noDetail: Record<string, number | readonly number[]> = {};

export const provenanceDetails: Readonly<Record<string, ProvenanceDetail>> = {
  /** `axis` resolved against the data's rank; `indicesShape` (the indices themselves are recorded as input1). */
  Gather: (node, [x, indices]) => (x === undefined || indices === undefined ? noDetail : { axis: normalizeAxis(node, attrInt(node, 'axis', 0), x.shape.length), indicesShape: indices.shape }),
  /** `perm` resolved (reversed dimensions when the attribute is absent). */
  Transpose: (node, [x]) => (x === undefined ? noDetail : { perm: attrInts(node, 'perm') ?? x.shape.map((_, i) => x.shape.length - 1 - i) }),
  /** Per input dimension: first index, step and count, resolved and clamped; and the input's shape. */
  Slice: (node, [x], values) => {
    const [, starts, ends, axes, steps] = values;
    if (x === undefined || starts === undefined || ends === undefined) return noDetail;
    if ((node.inputs[3] && axes === undefined) || (node.inputs[4] && steps === undefined)) return noDetail;
    const r = resolveSlice(node, x.shape, toNumbers(starts), toNumbers(ends), axes && toNumbers(axes), steps && toNumbers(steps));
    return { inputShape: x.shape, sliceStart: r.start, sliceStep: r.step, sliceCount: r.count };
  },
};

/** Most elements a folded constant may have: larger results stay as run-time nodes. */
export const MAX_FOLDED_ELEMENTS = 1 << 24;
