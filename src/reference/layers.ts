/**
 * One function per layer kind: plain loops over typed arrays, sums in float64, results rounded to float32.
 * Semantics follow libtrtshim/include/trtshim.h; where the header leaves a choice open, the comment on the
 * function says what is pinned down here.
 */
import type { ConvParams, ElementwiseOp, Layer, PoolOp, PoolParams, ReduceOp, UnaryOp, Weights } from '../network/types.js';
import { elementwise as elementwiseScalar, unary as unaryScalar } from './scalar.js';
import {
  broadcastIndex,
  broadcastShapes,
  elementCount,
  fail,
  floatTensor,
  normalizeAxis,
  numberAt,
  stridesOf,
  weightOfCount,
  weightValues,
  type FloatTensor,
  type Tensor,
} from './tensor.js';

type Of<K extends Layer['kind']> = Extract<Layer, { kind: K }>;

const asFloat = (layer: string, t: Tensor): FloatTensor =>
  t.dtype === 'float32' ? t : fail(layer, `expected a float32 tensor, found ${t.dtype}`);

/** y = x W^T + b over the last dimension; W is [outFeatures, inFeatures]. */
export const fullyConnected = (layer: Of<'fullyConnected'>, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  if (x.shape.length < 1) fail(layer.name, 'input must have rank >= 1');
  const inF = x.shape[x.shape.length - 1];
  const outF = layer.outFeatures;
  const w = weightOfCount(layer.name, 'kernel', layer.kernel, outF * inF);
  const b = layer.bias === undefined ? undefined : weightOfCount(layer.name, 'bias', layer.bias, outF);
  const rows = elementCount(x.shape) / inF;
  const out = new Float32Array(rows * outF);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outF; o++) {
      let sum = b === undefined ? 0 : b[o];
      for (let i = 0; i < inF; i++) sum += x.data[r * inF + i] * w[o * inF + i];
      out[r * outF + o] = sum;
    }
  }
  return floatTensor([...x.shape.slice(0, -1), outF], out);
};

/** Batched A·B with numpy broadcasting of the leading dimensions; rank >= 2 operands. */
export const matrixMultiply = (layer: Of<'matrixMultiply'>, aIn: Tensor, bIn: Tensor): FloatTensor => {
  const a = asFloat(layer.name, aIn);
  const b = asFloat(layer.name, bIn);
  if (a.shape.length < 2 || b.shape.length < 2) fail(layer.name, 'matrix multiply needs operands of rank >= 2');
  const [ar, ac] = a.shape.slice(-2);
  const [br, bc] = b.shape.slice(-2);
  const [m, k] = layer.transposeA ? [ac, ar] : [ar, ac];
  const [k2, n] = layer.transposeB ? [bc, br] : [br, bc];
  if (k !== k2) fail(layer.name, `inner dimensions differ: ${k} and ${k2}`);
  const batch = broadcastShapes(layer.name, a.shape.slice(0, -2), b.shape.slice(0, -2));
  const aBatch = broadcastIndex(a.shape.slice(0, -2), batch);
  const bBatch = broadcastIndex(b.shape.slice(0, -2), batch);
  const batches = elementCount(batch);
  const out = new Float32Array(batches * m * n);
  const aAt = (base: number, i: number, p: number) => a.data[base + (layer.transposeA ? p * m + i : i * k + p)];
  const bAt = (base: number, p: number, j: number) => b.data[base + (layer.transposeB ? j * k + p : p * n + j)];
  for (let t = 0; t < batches; t++) {
    const aBase = aBatch[t] * m * k;
    const bBase = bBatch[t] * k * n;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let sum = 0;
        for (let p = 0; p < k; p++) sum += aAt(aBase, i, p) * bAt(bBase, p, j);
        out[(t * m + i) * n + j] = sum;
      }
    }
  }
  return floatTensor([...batch, m, n], out);
};

/** NCHW convolution; out size floor((H + pads - dilation*(k-1) - 1) / stride) + 1. */
export const convolution = (layer: Of<'convolution'>, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  if (x.shape.length !== 4) fail(layer.name, `convolution needs an NCHW input, found rank ${x.shape.length}`);
  const p: ConvParams = layer.params;
  const [N, C, H, W] = x.shape;
  const O = p.outChannels;
  const g = p.groups;
  if (C % g !== 0 || O % g !== 0) fail(layer.name, `channels ${C} -> ${O} not divisible by groups ${g}`);
  const cg = C / g;
  const og = O / g;
  const [kh, kw] = p.kernel;
  const [sh, sw] = p.stride;
  const [pt, pl, pb, pr] = p.padding;
  const [dh, dw] = p.dilation;
  const OH = Math.floor((H + pt + pb - dh * (kh - 1) - 1) / sh) + 1;
  const OW = Math.floor((W + pl + pr - dw * (kw - 1) - 1) / sw) + 1;
  if (OH < 1 || OW < 1) fail(layer.name, 'output would be empty');
  const w = weightOfCount(layer.name, 'kernel', layer.kernel, O * cg * kh * kw);
  const b = layer.bias === undefined ? undefined : weightOfCount(layer.name, 'bias', layer.bias, O);
  const out = new Float32Array(N * O * OH * OW);
  for (let n = 0; n < N; n++) {
    for (let o = 0; o < O; o++) {
      const group = Math.floor(o / og);
      for (let oy = 0; oy < OH; oy++) {
        for (let ox = 0; ox < OW; ox++) {
          let sum = b === undefined ? 0 : b[o];
          for (let c = 0; c < cg; c++) {
            const ci = group * cg + c;
            for (let ky = 0; ky < kh; ky++) {
              const iy = oy * sh - pt + ky * dh;
              if (iy < 0 || iy >= H) continue;
              for (let kx = 0; kx < kw; kx++) {
                const ix = ox * sw - pl + kx * dw;
                if (ix < 0 || ix >= W) continue;
                sum += x.data[((n * C + ci) * H + iy) * W + ix] * w[((o * cg + c) * kh + ky) * kw + kx];
              }
            }
          }
          out[((n * O + o) * OH + oy) * OW + ox] = sum;
        }
      }
    }
  }
  return floatTensor([N, O, OH, OW], out);
};

/** Numpy-broadcast binary operation. */
export const elementwise = (layer: { name: string; op: ElementwiseOp }, aIn: Tensor, bIn: Tensor): FloatTensor => {
  const a = asFloat(layer.name, aIn);
  const b = asFloat(layer.name, bIn);
  const shape = broadcastShapes(layer.name, a.shape, b.shape);
  const ai = broadcastIndex(a.shape, shape);
  const bi = broadcastIndex(b.shape, shape);
  const out = new Float32Array(ai.length);
  for (let i = 0; i < out.length; i++) out[i] = elementwiseScalar(layer.op, a.data[ai[i]], b.data[bi[i]]);
  return floatTensor(shape, out);
};

export const unary = (layer: { name: string; op: UnaryOp }, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  const out = new Float32Array(x.data.length);
  for (let i = 0; i < out.length; i++) out[i] = unaryScalar(layer.op, x.data[i]);
  return floatTensor(x.shape, out);
};

/** Visits every 1-D line along `axis`: calls fn(base, stride, length) with flat offsets. */
const forEachLine = (shape: readonly number[], axis: number, fn: (base: number, stride: number, length: number) => void) => {
  const length = shape[axis];
  const inner = elementCount(shape.slice(axis + 1));
  const outer = elementCount(shape.slice(0, axis));
  for (let o = 0; o < outer; o++) for (let i = 0; i < inner; i++) fn(o * length * inner + i, inner, length);
};

/** exp(x - max) / sum over the axis. */
export const softmax = (layer: Of<'softmax'>, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  const axis = normalizeAxis(layer.name, layer.axis, x.shape.length);
  const out = new Float32Array(x.data.length);
  forEachLine(x.shape, axis, (base, stride, length) => {
    let max = -Infinity;
    for (let j = 0; j < length; j++) max = Math.max(max, x.data[base + j * stride]);
    let sum = 0;
    const e = new Float64Array(length);
    for (let j = 0; j < length; j++) sum += e[j] = Math.exp(x.data[base + j * stride] - max);
    for (let j = 0; j < length; j++) out[base + j * stride] = e[j] / sum;
  });
  return floatTensor(x.shape, out);
};

/** Normalizes each group of the trailing dimensions (from `axis`) with its mean and biased variance. */
export const layerNorm = (layer: Of<'layerNorm'>, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  const axis = normalizeAxis(layer.name, layer.axis, x.shape.length);
  const inner = elementCount(x.shape.slice(axis));
  const scale = layer.scale === undefined ? undefined : weightOfCount(layer.name, 'scale', layer.scale, inner);
  const shift = layer.shift === undefined ? undefined : weightOfCount(layer.name, 'shift', layer.shift, inner);
  const eps = Math.fround(layer.epsilon); // the C API takes a float
  const out = new Float32Array(x.data.length);
  for (let base = 0; base < x.data.length; base += inner) {
    let mean = 0;
    for (let j = 0; j < inner; j++) mean += x.data[base + j];
    mean /= inner;
    let variance = 0;
    for (let j = 0; j < inner; j++) variance += (x.data[base + j] - mean) ** 2;
    variance /= inner;
    const inv = 1 / Math.sqrt(variance + eps);
    for (let j = 0; j < inner; j++) {
      out[base + j] = (x.data[base + j] - mean) * inv * (scale?.[j] ?? 1) + (shift?.[j] ?? 0);
    }
  }
  return floatTensor(x.shape, out);
};

/** x / sqrt(mean(x^2) + eps) * scale over the last dimension. */
export const rmsNorm = (layer: Of<'rmsNorm'>, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  const inner = x.shape[x.shape.length - 1];
  const scale = layer.scale === undefined ? undefined : weightOfCount(layer.name, 'scale', layer.scale, inner);
  const eps = Math.fround(layer.epsilon);
  const out = new Float32Array(x.data.length);
  for (let base = 0; base < x.data.length; base += inner) {
    let squares = 0;
    for (let j = 0; j < inner; j++) squares += x.data[base + j] ** 2;
    const inv = 1 / Math.sqrt(squares / inner + eps);
    for (let j = 0; j < inner; j++) out[base + j] = x.data[base + j] * inv * (scale?.[j] ?? 1);
  }
  return floatTensor(x.shape, out);
};

/** Inference batch norm over dimension 1. */
export const batchNorm = (layer: Of<'batchNorm'>, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  if (x.shape.length < 2) fail(layer.name, 'batch norm needs rank >= 2');
  const C = x.shape[1];
  const inner = elementCount(x.shape.slice(2));
  const scale = weightOfCount(layer.name, 'scale', layer.scale, C);
  const shift = weightOfCount(layer.name, 'shift', layer.shift, C);
  const mean = weightOfCount(layer.name, 'mean', layer.mean, C);
  const variance = weightOfCount(layer.name, 'variance', layer.variance, C);
  const eps = Math.fround(layer.epsilon);
  const out = new Float32Array(x.data.length);
  for (let i = 0; i < x.data.length; i++) {
    const c = Math.floor(i / inner) % C;
    out[i] = ((x.data[i] - mean[c]) / Math.sqrt(variance[c] + eps)) * scale[c] + shift[c];
  }
  return floatTensor(x.shape, out);
};

/** Reduces the listed axes (negative counted from the end); keepDims leaves them as 1. */
export const reduce = (layer: { name: string; op: ReduceOp; axes: readonly number[]; keepDims: boolean }, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  const rank = x.shape.length;
  const reduced = new Set(layer.axes.map((a) => normalizeAxis(layer.name, a, rank)));
  const kept = x.shape.map((d, i) => (reduced.has(i) ? 1 : d));
  const count = elementCount(x.shape) / elementCount(kept);
  const total = elementCount(kept);
  const acc = new Float64Array(total).fill(layer.op === 'max' ? -Infinity : 0);
  const target = broadcastIndex(kept, x.shape); // where each input element lands
  for (let i = 0; i < x.data.length; i++) {
    const t = target[i];
    acc[t] = layer.op === 'max' ? Math.max(acc[t], x.data[i]) : acc[t] + x.data[i];
  }
  const out = new Float32Array(total);
  for (let i = 0; i < total; i++) out[i] = layer.op === 'mean' ? acc[i] / count : acc[i];
  const shape = layer.keepDims ? kept : x.shape.filter((_, i) => !reduced.has(i));
  return floatTensor(shape, out);
};

/**
 * NCHW pooling. Output size floor((H + pad_top + pad_bottom - k) / s) + 1. Max ignores padding; average
 * divides by the full window with countIncludePad, else by the window's elements inside the input.
 */
export const pooling = (layer: { name: string; op: PoolOp; params?: PoolParams }, input: Tensor): FloatTensor => {
  const x = asFloat(layer.name, input);
  if (x.shape.length !== 4) fail(layer.name, `pooling needs an NCHW input, found rank ${x.shape.length}`);
  const [N, C, H, W] = x.shape;
  if (layer.op === 'global_average') {
    const out = new Float32Array(N * C);
    for (let i = 0; i < N * C; i++) {
      let sum = 0;
      for (let j = 0; j < H * W; j++) sum += x.data[i * H * W + j];
      out[i] = sum / (H * W);
    }
    return floatTensor([N, C, 1, 1], out);
  }
  const p = layer.params ?? fail(layer.name, `${layer.op} pooling needs params`);
  const [kh, kw] = p.kernel;
  const [sh, sw] = p.stride;
  const [pt, pl, pb, pr] = p.padding;
  const OH = Math.floor((H + pt + pb - kh) / sh) + 1;
  const OW = Math.floor((W + pl + pr - kw) / sw) + 1;
  if (OH < 1 || OW < 1) fail(layer.name, 'output would be empty');
  const out = new Float32Array(N * C * OH * OW);
  for (let nc = 0; nc < N * C; nc++) {
    for (let oy = 0; oy < OH; oy++) {
      for (let ox = 0; ox < OW; ox++) {
        let acc = layer.op === 'max' ? -Infinity : 0;
        let inside = 0;
        for (let ky = 0; ky < kh; ky++) {
          const iy = oy * sh - pt + ky;
          if (iy < 0 || iy >= H) continue;
          for (let kx = 0; kx < kw; kx++) {
            const ix = ox * sw - pl + kx;
            if (ix < 0 || ix >= W) continue;
            const v = x.data[(nc * H + iy) * W + ix];
            acc = layer.op === 'max' ? Math.max(acc, v) : acc + v;
            inside++;
          }
        }
        if (layer.op === 'average') acc /= p.countIncludePad ? kh * kw : inside;
        out[(nc * OH + oy) * OW + ox] = acc;
      }
    }
  }
  return floatTensor([N, C, OH, OW], out);
};

/** Same data, new shape; one dimension may be -1. */
export const reshape = (layer: Of<'reshape'>, x: Tensor): Tensor => {
  const total = elementCount(x.shape);
  const known = layer.shape.filter((d) => d !== -1);
  if (layer.shape.length - known.length > 1) fail(layer.name, 'at most one dimension may be -1');
  const knownCount = elementCount(known);
  const shape = layer.shape.map((d) => (d === -1 ? total / knownCount : d));
  if (elementCount(shape) !== total || !shape.every(Number.isInteger)) {
    fail(layer.name, `cannot reshape [${x.shape}] to [${layer.shape}]`);
  }
  return { ...x, shape } as Tensor;
};

/** Gathers `count` elements: out[i] = data[indexOf(i)], keeping the dtype. */
const remap = (x: Tensor, shape: number[], indexOf: (flat: number) => number): Tensor => {
  const total = elementCount(shape);
  const pick = <A extends { length: number; [i: number]: unknown }>(src: A, dst: A): A => {
    for (let i = 0; i < total; i++) dst[i] = src[indexOf(i)];
    return dst;
  };
  switch (x.dtype) {
    case 'float32':
      return { dtype: 'float32', shape, data: pick(x.data, new Float32Array(total)) };
    case 'int32':
      return { dtype: 'int32', shape, data: pick(x.data, new Int32Array(total)) };
    case 'int64':
      return { dtype: 'int64', shape, data: pick(x.data, new BigInt64Array(total)) };
  }
};

/** Multi-index of a flat index. */
const unravel = (flat: number, shape: readonly number[], into: number[]): number[] => {
  for (let d = shape.length - 1; d >= 0; d--) {
    into[d] = flat % shape[d];
    flat = Math.floor(flat / shape[d]);
  }
  return into;
};

/** Output dimension i is input dimension perm[i]. */
export const transpose = (layer: Of<'transpose'>, x: Tensor): Tensor => {
  const rank = x.shape.length;
  const perm = layer.perm;
  if (perm.length !== rank || [...perm].sort((a, b) => a - b).some((p, i) => p !== i)) {
    fail(layer.name, `perm [${perm}] is not a permutation of ${rank} axes`);
  }
  const shape = perm.map((p) => x.shape[p]);
  const inStrides = stridesOf(x.shape);
  const index: number[] = new Array(rank);
  return remap(x, shape, (flat) => {
    unravel(flat, shape, index);
    let src = 0;
    for (let d = 0; d < rank; d++) src += index[d] * inStrides[perm[d]];
    return src;
  });
};

export const concatenation = (layer: Of<'concatenation'>, inputs: Tensor[]): Tensor => {
  const first = inputs[0] ?? fail(layer.name, 'no inputs');
  const rank = first.shape.length;
  const axis = normalizeAxis(layer.name, layer.axis, rank);
  for (const t of inputs) {
    if (t.dtype !== first.dtype) fail(layer.name, `dtypes differ: ${first.dtype} and ${t.dtype}`);
    if (t.shape.length !== rank || t.shape.some((d, i) => i !== axis && d !== first.shape[i])) {
      fail(layer.name, `shapes [${first.shape}] and [${t.shape}] differ outside axis ${axis}`);
    }
  }
  const shape = first.shape.map((d, i) => (i === axis ? inputs.reduce((s, t) => s + t.shape[axis], 0) : d));
  const outer = elementCount(shape.slice(0, axis));
  const inner = elementCount(shape.slice(axis + 1));
  // Flat source of each output element: (input, offset).
  const source: Array<[number, number]> = [];
  for (let o = 0; o < outer; o++) {
    inputs.forEach((t, k) => {
      const run = t.shape[axis] * inner;
      for (let j = 0; j < run; j++) source.push([k, o * run + j]);
    });
  }
  const total = source.length;
  switch (first.dtype) {
    case 'float32': {
      const data = new Float32Array(total);
      source.forEach(([k, i], j) => (data[j] = (inputs[k].data as Float32Array)[i]));
      return { dtype: 'float32', shape, data };
    }
    case 'int32': {
      const data = new Int32Array(total);
      source.forEach(([k, i], j) => (data[j] = (inputs[k].data as Int32Array)[i]));
      return { dtype: 'int32', shape, data };
    }
    case 'int64': {
      const data = new BigInt64Array(total);
      source.forEach(([k, i], j) => (data[j] = (inputs[k].data as BigInt64Array)[i]));
      return { dtype: 'int64', shape, data };
    }
  }
};

/** Per dimension: elements start, start + stride, ... (size of them); all must lie inside the input. */
export const slice = (layer: Of<'slice'>, x: Tensor): Tensor => {
  const rank = x.shape.length;
  if (layer.start.length !== rank || layer.size.length !== rank || layer.stride.length !== rank) {
    fail(layer.name, `start/size/stride need ${rank} entries`);
  }
  for (let d = 0; d < rank; d++) {
    const { [d]: s } = layer.start;
    const { [d]: n } = layer.size;
    const { [d]: st } = layer.stride;
    if (s < 0 || n < 0 || st < 1 || (n > 0 && s + (n - 1) * st >= x.shape[d]) || (n === 0 && s > x.shape[d])) {
      fail(layer.name, `dimension ${d}: start ${s} size ${n} stride ${st} outside extent ${x.shape[d]}`);
    }
  }
  const shape = [...layer.size];
  const inStrides = stridesOf(x.shape);
  const index: number[] = new Array(rank);
  return remap(x, shape, (flat) => {
    unravel(flat, shape, index);
    let src = 0;
    for (let d = 0; d < rank; d++) src += (layer.start[d] + index[d] * layer.stride[d]) * inStrides[d];
    return src;
  });
};

/** ONNX Gather: data.shape[:axis] + indices.shape + data.shape[axis+1:]; negative indices count from the end. */
export const gather = (layer: Of<'gather'>, data: Tensor, indices: Tensor): Tensor => {
  if (indices.dtype === 'float32') fail(layer.name, 'indices must be int32 or int64');
  const axis = normalizeAxis(layer.name, layer.axis, data.shape.length);
  const extent = data.shape[axis];
  const outer = elementCount(data.shape.slice(0, axis));
  const inner = elementCount(data.shape.slice(axis + 1));
  const count = elementCount(indices.shape);
  const resolved = new Int32Array(count);
  for (let i = 0; i < count; i++) {
    const raw = numberAt(indices, i);
    const idx = raw < 0 ? raw + extent : raw;
    if (idx < 0 || idx >= extent) fail(layer.name, `index ${raw} out of range for extent ${extent}`);
    resolved[i] = idx;
  }
  const shape = [...data.shape.slice(0, axis), ...indices.shape, ...data.shape.slice(axis + 1)];
  return remap(data, shape, (flat) => {
    const j = flat % inner;
    const i = Math.floor(flat / inner) % count;
    const o = Math.floor(flat / (inner * count));
    return (o * extent + resolved[i]) * inner + j;
  });
};

/** The constant's values: float weights as float32, index weights as they are. */
export const constant = (layer: { name: string; weights: Weights }): Tensor => {
  const w = layer.weights;
  const count = elementCount(w.shape);
  if (w.data.length !== count) fail(layer.name, `constant has ${w.data.length} elements, shape [${w.shape}] needs ${count}`);
  if (w.dtype === 'int32') {
    if (!(w.data instanceof Int32Array)) fail(layer.name, 'int32 weights need an Int32Array');
    return { dtype: 'int32', shape: [...w.shape], data: w.data as Int32Array };
  }
  if (w.dtype === 'int64') {
    if (!(w.data instanceof BigInt64Array)) fail(layer.name, 'int64 weights need a BigInt64Array');
    return { dtype: 'int64', shape: [...w.shape], data: w.data as BigInt64Array };
  }
  return floatTensor([...w.shape], weightValues(layer.name, w));
};
