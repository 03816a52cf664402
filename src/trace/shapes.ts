/**
 * Static shape and dtype rules, one per ONNX operator, for the default domain at opsets 13 to 21.
 * A rule sees the node, its inputs' types, the constant values of inputs known at build time, and the
 * opset; it returns the output types or the reason they cannot be found.
 */
import * as E from 'fp-ts/lib/Either.js';
import { elementCount, toNumbers, type Attribute, type DType, type Node, type Tensor, type TensorType } from './ir.js';
import { dtypeFromOnnx } from './decode.js';
import { invalid, type TraceErrorDetail } from './errors.js';

export interface RuleContext {
  readonly node: Node;
  readonly opset: number;
  /** Undefined for an omitted optional input (''). */
  readonly types: readonly (TensorType | undefined)[];
  readonly values: readonly (Tensor | undefined)[];
}
export type ShapeRule = (ctx: RuleContext) => E.Either<TraceErrorDetail, TensorType[]>;

// ---- attribute access -------------------------------------------------------------------------------

export const attrInt = (node: Node, name: string, fallback: number): number => {
  const a: Attribute | undefined = node.attributes[name];
  return a?.kind === 'int' ? a.value : fallback;
};
export const attrFloat = (node: Node, name: string, fallback: number): number => {
  const a = node.attributes[name];
  return a?.kind === 'float' ? a.value : a?.kind === 'int' ? a.value : fallback;
};
export const attrInts = (node: Node, name: string): readonly number[] | undefined => {
  const a = node.attributes[name];
  return a?.kind === 'ints' ? a.value : undefined;
};
export const attrString = (node: Node, name: string, fallback: string): string => {
  const a = node.attributes[name];
  return a?.kind === 'string' ? a.value : fallback;
};

// ---- helpers ----------------------------------------------------------------------------------------

class RuleFailure {
  constructor(readonly detail: TraceErrorDetail) {}
}
const bad = (node: Node, reason: string): never => {
  throw new RuleFailure(invalid(node, reason));
};
const rule = (f: (ctx: RuleContext) => TensorType[]): ShapeRule => (ctx) => {
  try {
    return E.right(f(ctx));
  } catch (e) {
    if (e instanceof RuleFailure) return E.left(e.detail);
    throw e;
  }
};

const input = (ctx: RuleContext, i: number): TensorType => {
  const t = ctx.types[i];
  if (t === undefined) return bad(ctx.node, `input ${i} is required but missing`);
  return t;
};

/** The constant value of input i, required to be known at build time. */
const constInput = (ctx: RuleContext, i: number, what: string): number[] => {
  const v = ctx.values[i];
  if (v === undefined) {
    throw new RuleFailure({ _tag: 'UnresolvedShape', tensor: ctx.node.outputs[0] ?? ctx.node.name, reason: `node '${ctx.node.name}' (${ctx.node.opType}) needs its ${what} (input ${i}, '${ctx.node.inputs[i]}') at build time, but it is computed at run time` });
  }
  return toNumbers(v);
};
const optionalConstInput = (ctx: RuleContext, i: number, what: string): number[] | undefined =>
  ctx.node.inputs[i] === undefined || ctx.node.inputs[i] === '' ? undefined : constInput(ctx, i, what);

export const normalizeAxis = (node: Node, axis: number, rank: number): number => {
  const a = axis < 0 ? axis + rank : axis;
  if (!Number.isInteger(a) || a < 0 || a >= rank) return bad(node, `axis ${axis} is out of range for rank ${rank}`);
  return a;
};

export const broadcast = (shapes: readonly (readonly number[])[]): number[] | undefined => {
  const rank = Math.max(0, ...shapes.map((s) => s.length));
  const out: number[] = [];
  for (let i = 0; i < rank; i++) {
    let d = 1;
    for (const s of shapes) {
      const k = s.length - rank + i;
      const v = k < 0 ? 1 : s[k];
      if (v === 1) continue;
      if (d !== 1 && d !== v) return undefined;
      d = v;
    }
    // A zero-sized dimension broadcasts against 1 only.
    if (shapes.some((s) => s.length - rank + i >= 0 && s[s.length - rank + i] === 0)) d = 0;
    out.push(d);
  }
  return out;
};

const same = (dtype?: DType): ShapeRule => rule((ctx) => {
  const x = input(ctx, 0);
  return [{ dtype: dtype ?? x.dtype, shape: x.shape }];
});

const elementwise = (result: 'first' | 'bool', first = 0): ShapeRule => rule((ctx) => {
  const types = ctx.node.inputs.map((_, i) => input(ctx, i));
  if (types.length < 2) bad(ctx.node, `expects at least 2 inputs, found ${types.length}`);
  const shape = broadcast(types.map((t) => t.shape)) ?? bad(ctx.node, `inputs of shapes ${types.map((t) => `[${t.shape}]`).join(', ')} do not broadcast`);
  return [{ dtype: result === 'bool' ? 'bool' : types[first].dtype, shape }];
});

const reduceAxes = (ctx: RuleContext, axesFromInput: boolean): { axes: number[]; noop: boolean } => {
  const x = input(ctx, 0);
  const raw = axesFromInput ? optionalConstInput(ctx, 1, 'axes') : attrInts(ctx.node, 'axes');
  const noopWhenEmpty = attrInt(ctx.node, 'noop_with_empty_axes', 0) === 1;
  if (raw === undefined || raw.length === 0) {
    return noopWhenEmpty ? { axes: [], noop: true } : { axes: x.shape.map((_, i) => i), noop: false };
  }
  return { axes: raw.map((a) => normalizeAxis(ctx.node, a, x.shape.length)), noop: false };
};

const reduce = (inputSinceOpset: number): ShapeRule => rule((ctx) => {
  const x = input(ctx, 0);
  const { axes } = reduceAxes(ctx, ctx.opset >= inputSinceOpset);
  const keep = attrInt(ctx.node, 'keepdims', 1) === 1;
  const shape: number[] = [];
  x.shape.forEach((d, i) => {
    if (!axes.includes(i)) shape.push(d);
    else if (keep) shape.push(1);
  });
  return [{ dtype: x.dtype, shape }];
});

/** Output spatial sizes of a convolution or pooling window. */
const windowed = (ctx: RuleContext, x: TensorType, kernel: readonly number[], ceil: boolean): number[] => {
  const node = ctx.node;
  const n = kernel.length;
  const strides = attrInts(node, 'strides') ?? kernel.map(() => 1);
  const dilations = attrInts(node, 'dilations') ?? kernel.map(() => 1);
  const autoPad = attrString(node, 'auto_pad', 'NOTSET');
  const pads = attrInts(node, 'pads') ?? new Array(2 * n).fill(0);
  if (strides.length !== n || dilations.length !== n || pads.length !== 2 * n) {
    bad(node, `strides, dilations and pads must have ${n}, ${n} and ${2 * n} values; found ${strides.length}, ${dilations.length}, ${pads.length}`);
  }
  return kernel.map((k, i) => {
    const size = x.shape[2 + i];
    const effective = (k - 1) * dilations[i] + 1;
    if (autoPad === 'SAME_UPPER' || autoPad === 'SAME_LOWER') return Math.ceil(size / strides[i]);
    if (autoPad === 'VALID') return Math.floor((size - effective) / strides[i]) + 1;
    const span = size + pads[i] + pads[i + n] - effective;
    if (span < 0) bad(node, `window of ${effective} does not fit spatial size ${size} with padding`);
    return (ceil ? Math.ceil(span / strides[i]) : Math.floor(span / strides[i])) + 1;
  });
};

const matmulShape = (node: Node, a: readonly number[], b: readonly number[]): number[] => {
  if (a.length === 0 || b.length === 0) bad(node, 'MatMul operands must have rank at least 1');
  const a2 = a.length === 1 ? [1, a[0]] : a;
  const b2 = b.length === 1 ? [b[0], 1] : b;
  const k1 = a2[a2.length - 1];
  const k2 = b2[b2.length - 2];
  if (k1 !== k2) bad(node, `inner dimensions differ: A is [${a}], B is [${b}]`);
  const batch = broadcast([a2.slice(0, -2), b2.slice(0, -2)]) ?? bad(node, `batch dimensions of [${a}] and [${b}] do not broadcast`);
  const out = [...batch, a2[a2.length - 2], b2[b2.length - 1]];
  if (a.length === 1) out.splice(out.length - 2, 1);
  if (b.length === 1) out.splice(out.length - 1, 1);
  return out;
};

/** ONNX Slice semantics, resolved to per-axis start, step and count (also used by folding and lowering). */
export const resolveSlice = (
  node: Node,
  shape: readonly number[],
  starts: readonly number[],
  ends: readonly number[],
  axes: readonly number[] | undefined,
  steps: readonly number[] | undefined,
): { start: number[]; step: number[]; count: number[] } => {
  const rank = shape.length;
  const start = shape.map(() => 0);
  const step = shape.map(() => 1);
  const count = [...shape];
  if (starts.length !== ends.length) bad(node, `starts has ${starts.length} values and ends ${ends.length}`);
  const ax = axes ?? starts.map((_, i) => i);
  if (ax.length !== starts.length || (steps !== undefined && steps.length !== starts.length)) bad(node, 'starts, ends, axes and steps differ in length');
  ax.forEach((rawAxis, i) => {
    const a = normalizeAxis(node, rawAxis, rank);
    const dim = shape[a];
    const s = steps?.[i] ?? 1;
    if (s === 0) bad(node, `step 0 on axis ${a}`);
    const clamp = (v: number, lo: number, hi: number) => Math.min(Math.max(v, lo), hi);
    let b = starts[i] < 0 ? starts[i] + dim : starts[i];
    let e = ends[i] < 0 ? ends[i] + dim : ends[i];
    if (s > 0) {
      b = clamp(b, 0, dim);
      e = clamp(e, 0, dim);
      count[a] = Math.max(0, Math.ceil((e - b) / s));
    } else {
      b = clamp(b, 0, dim - 1);
      e = clamp(e, -1, dim - 1);
      count[a] = Math.max(0, Math.ceil((e - b) / s));
    }
    start[a] = b;
    step[a] = s;
  });
  return { start, step, count };
};

/** Resolves ONNX Reshape's target (0 copies a dimension unless allowzero, -1 is inferred). */
export const resolveReshape = (node: Node, from: readonly number[], target: readonly number[], allowZero: boolean): number[] => {
  const out = target.map((d, i) => (d === 0 && !allowZero ? (i < from.length ? from[i] : bad(node, `shape value 0 at ${i} copies a dimension the input [${from}] lacks`)) : d));
  const unknown = out.filter((d) => d === -1).length;
  if (unknown > 1 || out.some((d) => d < -1 || !Number.isInteger(d))) bad(node, `invalid target shape [${target}]`);
  const total = elementCount(from);
  if (unknown === 1) {
    const known = out.filter((d) => d !== -1).reduce((a, b) => a * b, 1);
    if (known === 0 || total % known !== 0) bad(node, `cannot reshape [${from}] (${total} elements) to [${target}]`);
    out[out.indexOf(-1)] = total / known;
  }
  if (elementCount(out) !== total) bad(node, `cannot reshape [${from}] (${total} elements) to [${target}]`);
  return out;
};

/** Split sizes along the axis, from the split input (opset >= 13), num_outputs (>= 18), or equal parts. */
export const resolveSplit = (ctx: RuleContext): { axis: number; sizes: number[] } => {
  const x = input(ctx, 0);
  const axis = normalizeAxis(ctx.node, attrInt(ctx.node, 'axis', 0), x.shape.length);
  const dim = x.shape[axis];
  const given = optionalConstInput(ctx, 1, 'split sizes');
  const outputs = ctx.node.outputs.length;
  let sizes: number[];
  if (given !== undefined) {
    sizes = given;
  } else {
    const parts = ctx.node.attributes['num_outputs'] !== undefined ? attrInt(ctx.node, 'num_outputs', outputs) : outputs;
    const chunk = Math.ceil(dim / parts);
    sizes = Array.from({ length: parts }, (_, i) => Math.max(0, Math.min(chunk, dim - i * chunk)));
  }
  if (sizes.length !== outputs) bad(ctx.node, `${sizes.length} split sizes for ${outputs} outputs`);
  if (sizes.reduce((a, b) => a + b, 0) !== dim || sizes.some((s) => s < 0)) bad(ctx.node, `split sizes [${sizes}] do not add up to dimension ${dim}`);
  return { axis, sizes };
};

const castTarget = (node: Node): DType => {
  const code = attrInt(node, 'to', 0);
  return dtypeFromOnnx(code) ?? bad(node, `cast to ONNX data type ${code} is not supported`);
};

// ---- the rules --------------------------------------------------------------------------------------

const unary = same();
const binary = elementwise('first');
const compare = elementwise('bool');

export const shapeRules: Readonly<Record<string, ShapeRule>> = {
  Identity: unary, Neg: unary, Sqrt: unary, Reciprocal: unary, Erf: unary, Tanh: unary, Relu: unary,
  Sigmoid: unary, HardSwish: unary, HardSigmoid: unary, Exp: unary, Log: unary, Abs: unary, Gelu: unary,
  Softmax: rule((ctx) => {
    const x = input(ctx, 0);
    normalizeAxis(ctx.node, attrInt(ctx.node, 'axis', -1), x.shape.length);
    return [x];
  }),
  Not: same('bool'),
  IsNaN: same('bool'),
  IsInf: same('bool'),
  Add: binary, Sub: binary, Mul: binary, Div: binary, Pow: binary, Max: binary, Min: binary,
  Equal: compare, Less: compare, Greater: compare, LessOrEqual: compare, GreaterOrEqual: compare, And: compare, Or: compare,
  Where: elementwise('first', 1),
  Cast: rule((ctx) => [{ dtype: castTarget(ctx.node), shape: input(ctx, 0).shape }]),
  Shape: rule((ctx) => {
    const rank = input(ctx, 0).shape.length;
    const clampAxis = (v: number) => Math.min(Math.max(v < 0 ? v + rank : v, 0), rank);
    const start = clampAxis(attrInt(ctx.node, 'start', 0));
    const end = clampAxis(attrInt(ctx.node, 'end', rank));
    return [{ dtype: 'int64', shape: [Math.max(0, end - start)] }];
  }),
  Size: rule(() => [{ dtype: 'int64', shape: [] }]),
  ConstantOfShape: rule((ctx) => {
    const shape = constInput(ctx, 0, 'shape');
    if (shape.some((d) => d < 0 || !Number.isInteger(d))) bad(ctx.node, `invalid shape [${shape}]`);
    const value = ctx.node.attributes['value'];
    return [{ dtype: value?.kind === 'tensor' ? value.value.dtype : 'float32', shape }];
  }),
  MatMul: rule((ctx) => {
    const a = input(ctx, 0);
    return [{ dtype: a.dtype, shape: matmulShape(ctx.node, a.shape, input(ctx, 1).shape) }];
  }),
  Gemm: rule((ctx) => {
    const a = input(ctx, 0);
    const b = input(ctx, 1);
    if (a.shape.length !== 2 || b.shape.length !== 2) bad(ctx.node, `A and B must be 2-D; found [${a.shape}] and [${b.shape}]`);
    const [m, k1] = attrInt(ctx.node, 'transA', 0) ? [a.shape[1], a.shape[0]] : [a.shape[0], a.shape[1]];
    const [k2, n] = attrInt(ctx.node, 'transB', 0) ? [b.shape[1], b.shape[0]] : [b.shape[0], b.shape[1]];
    if (k1 !== k2) bad(ctx.node, `inner dimensions differ: A gives ${k1}, B gives ${k2}`);
    const c = ctx.types[2];
    if (c !== undefined && broadcast([c.shape, [m, n]])?.join() !== [m, n].join()) bad(ctx.node, `C of shape [${c.shape}] does not broadcast to [${m},${n}]`);
    return [{ dtype: a.dtype, shape: [m, n] }];
  }),
  Conv: rule((ctx) => {
    const x = input(ctx, 0);
    const w = input(ctx, 1);
    if (x.shape.length < 3 || w.shape.length !== x.shape.length) bad(ctx.node, `X [${x.shape}] and W [${w.shape}] must have the same rank, at least 3`);
    const group = attrInt(ctx.node, 'group', 1);
    if (x.shape[1] !== w.shape[1] * group) bad(ctx.node, `X has ${x.shape[1]} channels; W [${w.shape}] with group ${group} expects ${w.shape[1] * group}`);
    const kernel = attrInts(ctx.node, 'kernel_shape') ?? w.shape.slice(2);
    return [{ dtype: x.dtype, shape: [x.shape[0], w.shape[0], ...windowed(ctx, x, kernel, false)] }];
  }),
  MaxPool: rule((ctx) => {
    const x = input(ctx, 0);
    const kernel = attrInts(ctx.node, 'kernel_shape') ?? bad(ctx.node, 'kernel_shape is required');
    const shape = [x.shape[0], x.shape[1], ...windowed(ctx, x, kernel, attrInt(ctx.node, 'ceil_mode', 0) === 1)];
    return ctx.node.outputs.length > 1 ? [{ dtype: x.dtype, shape }, { dtype: 'int64', shape }] : [{ dtype: x.dtype, shape }];
  }),
  AveragePool: rule((ctx) => {
    const x = input(ctx, 0);
    const kernel = attrInts(ctx.node, 'kernel_shape') ?? bad(ctx.node, 'kernel_shape is required');
    return [{ dtype: x.dtype, shape: [x.shape[0], x.shape[1], ...windowed(ctx, x, kernel, attrInt(ctx.node, 'ceil_mode', 0) === 1)] }];
  }),
  GlobalAveragePool: rule((ctx) => {
    const x = input(ctx, 0);
    if (x.shape.length < 3) bad(ctx.node, `input must have rank at least 3; found [${x.shape}]`);
    return [{ dtype: x.dtype, shape: [x.shape[0], x.shape[1], ...x.shape.slice(2).map(() => 1)] }];
  }),
  BatchNormalization: rule((ctx) => {
    const x = input(ctx, 0);
    for (let i = 1; i <= 4; i++) {
      const p = input(ctx, i);
      if (p.shape.length !== 1 || p.shape[0] !== x.shape[1]) bad(ctx.node, `input ${i} has shape [${p.shape}]; expected [${x.shape[1]}]`);
    }
    return [x];
  }),
  LayerNormalization: rule((ctx) => {
    const x = input(ctx, 0);
    const axis = normalizeAxis(ctx.node, attrInt(ctx.node, 'axis', -1), x.shape.length);
    const normalized = x.shape.slice(axis);
    const scale = input(ctx, 1);
    if (broadcast([scale.shape, normalized])?.join() !== normalized.join()) bad(ctx.node, `scale of shape [${scale.shape}] does not match normalized dimensions [${normalized}]`);
    const stats = x.shape.map((d, i) => (i < axis ? d : 1));
    const stash = dtypeFromOnnx(attrInt(ctx.node, 'stash_type', 1)) ?? 'float32';
    return [x, { dtype: stash, shape: stats }, { dtype: stash, shape: stats }].slice(0, Math.max(1, ctx.node.outputs.length));
  }),
  ReduceMean: reduce(18), ReduceSum: reduce(13), ReduceMax: reduce(18), ReduceMin: reduce(18),
  Reshape: rule((ctx) => {
    const x = input(ctx, 0);
    return [{ dtype: x.dtype, shape: resolveReshape(ctx.node, x.shape, constInput(ctx, 1, 'target shape'), attrInt(ctx.node, 'allowzero', 0) === 1) }];
  }),
  Flatten: rule((ctx) => {
    const x = input(ctx, 0);
    const raw = attrInt(ctx.node, 'axis', 1);
    const axis = raw < 0 ? raw + x.shape.length : raw;
    if (axis < 0 || axis > x.shape.length) bad(ctx.node, `axis ${raw} is out of range for rank ${x.shape.length}`);
    return [{ dtype: x.dtype, shape: [elementCount(x.shape.slice(0, axis)), elementCount(x.shape.slice(axis))] }];
  }),
  Squeeze: rule((ctx) => {
    const x = input(ctx, 0);
    const given = optionalConstInput(ctx, 1, 'axes');
    const axes = given === undefined ? x.shape.flatMap((d, i) => (d === 1 ? [i] : [])) : given.map((a) => normalizeAxis(ctx.node, a, x.shape.length));
    for (const a of axes) if (x.shape[a] !== 1) bad(ctx.node, `cannot squeeze axis ${a} of size ${x.shape[a]}`);
    return [{ dtype: x.dtype, shape: x.shape.filter((_, i) => !axes.includes(i)) }];
  }),
  Unsqueeze: rule((ctx) => {
    const x = input(ctx, 0);
    const given = constInput(ctx, 1, 'axes');
    const rank = x.shape.length + given.length;
    const axes = given.map((a) => normalizeAxis(ctx.node, a, rank));
    if (new Set(axes).size !== axes.length) bad(ctx.node, `repeated axes [${given}]`);
    const shape: number[] = [];
    let k = 0;
    for (let i = 0; i < rank; i++) shape.push(axes.includes(i) ? 1 : x.shape[k++]);
    return [{ dtype: x.dtype, shape }];
  }),
  Transpose: rule((ctx) => {
    const x = input(ctx, 0);
    const perm = attrInts(ctx.node, 'perm') ?? x.shape.map((_, i) => x.shape.length - 1 - i);
    if (perm.length !== x.shape.length || [...perm].sort((a, b) => a - b).some((p, i) => p !== i)) bad(ctx.node, `perm [${perm}] is not a permutation of rank ${x.shape.length}`);
    return [{ dtype: x.dtype, shape: perm.map((p) => x.shape[p]) }];
  }),
  Expand: rule((ctx) => {
    const x = input(ctx, 0);
    const target = constInput(ctx, 1, 'target shape');
    const shape = broadcast([x.shape, target]) ?? bad(ctx.node, `[${x.shape}] does not expand to [${target}]`);
    return [{ dtype: x.dtype, shape }];
  }),
  Concat: rule((ctx) => {
    const types = ctx.node.inputs.map((_, i) => input(ctx, i));
    if (types.length === 0) bad(ctx.node, 'needs at least one input');
    const rank = types[0].shape.length;
    const axis = normalizeAxis(ctx.node, attrInt(ctx.node, 'axis', 0), rank);
    const shape = [...types[0].shape];
    shape[axis] = 0;
    for (const t of types) {
      if (t.shape.length !== rank || t.shape.some((d, i) => i !== axis && d !== types[0].shape[i])) bad(ctx.node, `inputs of shapes ${types.map((u) => `[${u.shape}]`).join(', ')} do not concatenate on axis ${axis}`);
      shape[axis] += t.shape[axis];
    }
    return [{ dtype: types[0].dtype, shape }];
  }),
  Split: rule((ctx) => {
    const x = input(ctx, 0);
    const { axis, sizes } = resolveSplit(ctx);
    return sizes.map((s) => ({ dtype: x.dtype, shape: x.shape.map((d, i) => (i === axis ? s : d)) }));
  }),
  Slice: rule((ctx) => {
    const x = input(ctx, 0);
    const { count } = resolveSlice(ctx.node, x.shape, constInput(ctx, 1, 'starts'), constInput(ctx, 2, 'ends'), optionalConstInput(ctx, 3, 'axes'), optionalConstInput(ctx, 4, 'steps'));
    return [{ dtype: x.dtype, shape: count }];
  }),
  Gather: rule((ctx) => {
    const data = input(ctx, 0);
    const indices = input(ctx, 1);
    if (indices.dtype !== 'int32' && indices.dtype !== 'int64') bad(ctx.node, `indices must be int32 or int64; found ${indices.dtype}`);
    const axis = normalizeAxis(ctx.node, attrInt(ctx.node, 'axis', 0), data.shape.length);
    return [{ dtype: data.dtype, shape: [...data.shape.slice(0, axis), ...indices.shape, ...data.shape.slice(axis + 1)] }];
  }),
  GatherElements: rule((ctx) => {
    const data = input(ctx, 0);
    const indices = input(ctx, 1);
    if (indices.shape.length !== data.shape.length) bad(ctx.node, `indices [${indices.shape}] must have the rank of data [${data.shape}]`);
    normalizeAxis(ctx.node, attrInt(ctx.node, 'axis', 0), data.shape.length);
    return [{ dtype: data.dtype, shape: indices.shape }];
  }),
  GatherND: rule((ctx) => {
    const data = input(ctx, 0);
    const indices = input(ctx, 1);
    const b = attrInt(ctx.node, 'batch_dims', 0);
    const last = indices.shape[indices.shape.length - 1];
    if (indices.shape.length < 1 || last === undefined || b + last > data.shape.length) bad(ctx.node, `indices [${indices.shape}] do not index data [${data.shape}] with batch_dims ${b}`);
    return [{ dtype: data.dtype, shape: [...indices.shape.slice(0, -1), ...data.shape.slice(b + last)] }];
  }),
  Range: rule((ctx) => {
    const [start] = constInput(ctx, 0, 'start');
    const [limit] = constInput(ctx, 1, 'limit');
    const [delta] = constInput(ctx, 2, 'delta');
    if (delta === 0) bad(ctx.node, 'delta is 0');
    return [{ dtype: input(ctx, 0).dtype, shape: [Math.max(0, Math.ceil((limit - start) / delta))] }];
  }),
  /** Running sums along one axis: same shape and dtype as x; the axis (input 1) may be known only at run time. */
  CumSum: rule((ctx) => {
    const x = input(ctx, 0);
    const axis = input(ctx, 1);
    if (axis.dtype !== 'int32' && axis.dtype !== 'int64') bad(ctx.node, `axis must be int32 or int64; found ${axis.dtype}`);
    if (axis.shape.length > 1 || axis.shape.reduce((a, b) => a * b, 1) !== 1) bad(ctx.node, `axis must be a scalar; found shape [${axis.shape}]`);
    const known = ctx.values[1];
    if (known !== undefined) normalizeAxis(ctx.node, toNumbers(known)[0], x.shape.length);
    return [{ dtype: x.dtype, shape: x.shape }];
  }),
  Dropout: rule((ctx) => {
    const x = input(ctx, 0);
    const mask: TensorType = { dtype: 'bool', shape: x.shape };
    return [x, mask].slice(0, ctx.node.outputs.length);
  }),
};
