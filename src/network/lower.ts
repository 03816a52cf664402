/**
 * Lowering: an engine segment of the analyzed graph -> a NetworkDefinition (src/network/types.ts), node by
 * node. Constant inputs become layer weights or constant layers; every network weight records which
 * initializers (through which folded operations) it came from, for the weight map.
 *
 * `lowerNode` is also the partitioner's test of what the engine supports: a node is an engine node
 * exactly when it lowers.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { AnalyzedGraph, Constant } from '../trace/analyze.js';
import { elementCount, isFloat, type Node, type Tensor, type TensorType } from '../trace/ir.js';
import { attrFloat, attrInt, attrInts, attrString, normalizeAxis, resolveSlice, resolveSplit } from '../trace/shapes.js';
import { transposeTensor } from '../trace/fold.js';
import type { Provenance } from '../trace/provenance.js';
import type { ElementwiseOp, Layer, NetworkDefinition, NetworkInput, TensorDType, UnaryOp, WeightRole, Weights } from './types.js';

export type LowerErrorDetail =
  | { readonly _tag: 'UnsupportedNode'; readonly node: string; readonly opType: string; readonly reason: string }
  | { readonly _tag: 'UnsupportedBoundary'; readonly tensor: string; readonly reason: string };

export class LowerError extends Error {
  override readonly name = 'LowerError';
  readonly _tag: LowerErrorDetail['_tag'];
  constructor(readonly detail: LowerErrorDetail) {
    super(detail._tag === 'UnsupportedNode' ? `node '${detail.node}' (${detail.opType}) cannot be lowered: ${detail.reason}` : `tensor '${detail.tensor}': ${detail.reason}`);
    this._tag = detail._tag;
  }
}

/** Where a network weight came from: a constant of the graph, possibly transformed while lowering. */
export interface WeightOrigin {
  readonly layer: string;
  readonly role: WeightRole;
  readonly provenance: Provenance;
}

export interface LoweredSegment {
  readonly network: NetworkDefinition;
  readonly weights: readonly WeightOrigin[];
}

/** What lowering one node needs to know about the rest of the graph. */
export interface LowerContext {
  readonly analyzed: AnalyzedGraph;
  /** Tensors some node or graph output reads. */
  readonly used: ReadonlySet<string>;
  /** Run-time integer tensors that only reshape index tensors on their way to Gather (see indexOnly). */
  readonly indexOnly: ReadonlySet<string>;
}

const reshapeOps = new Set(['Reshape', 'Flatten', 'Squeeze', 'Unsqueeze', 'Identity']);

export const lowerContext = (analyzed: AnalyzedGraph): LowerContext => {
  const used = new Set<string>(analyzed.graph.outputs);
  const readers = new Map<string, { node: Node; input: number }[]>();
  for (const n of analyzed.graph.nodes) {
    n.inputs.forEach((i, k) => {
      if (i === '') return;
      used.add(i);
      let list = readers.get(i);
      if (!list) readers.set(i, (list = []));
      list.push({ node: n, input: k });
    });
  }
  // An integer tensor produced by a reshape-like node is "index only" when every reader is a Gather
  // taking it as indices, or another such reshape: the engine has no integer reshape, but
  // Gather(data, reshape(i)) is reshape(Gather(data, i)), so such reshapes lower to nothing.
  // Walked backwards so a reshape's readers are decided before the reshape itself.
  const outputs = new Set(analyzed.graph.outputs);
  const indexOnly = new Set<string>();
  for (let k = analyzed.graph.nodes.length - 1; k >= 0; k--) {
    const n = analyzed.graph.nodes[k];
    if (!reshapeOps.has(n.opType) || analyzed.folded.has(n.name)) continue;
    const o = n.outputs[0];
    const t = analyzed.types.get(o);
    if (o === undefined || o === '' || outputs.has(o) || t === undefined || (t.dtype !== 'int32' && t.dtype !== 'int64')) continue;
    const r = readers.get(o) ?? [];
    if (r.length > 0 && r.every(({ node, input }) => (node.opType === 'Gather' && input === 1) || (reshapeOps.has(node.opType) && indexOnly.has(node.outputs[0])))) indexOnly.add(o);
  }
  return { analyzed, used, indexOnly };
};

interface Emitted {
  readonly layers: Layer[];
  readonly weights: WeightOrigin[];
  /** Constant tensors turned into constant layers, by tensor name: shared within a segment. */
  readonly constantLayers: Map<string, string>;
  /** Index-only tensors (LowerContext.indexOnly) emitted in this segment -> the tensor they reshape. */
  readonly indexAliases: Map<string, string>;
  /** Only deciding support (the partitioner): weight values are not transformed. */
  readonly checkOnly?: boolean;
}

class Unsupported {
  constructor(readonly reason: string) {}
}
const no = (reason: string): never => {
  throw new Unsupported(reason);
};

const unaryOps: Readonly<Record<string, UnaryOp>> = {
  Identity: 'identity', Relu: 'relu', Sigmoid: 'sigmoid', Tanh: 'tanh', HardSwish: 'hardswish', Exp: 'exp',
  Sqrt: 'sqrt', Reciprocal: 'reciprocal', Neg: 'neg', Erf: 'erf', Abs: 'abs', Log: 'log',
};
const binaryOps: Readonly<Record<string, ElementwiseOp>> = { Add: 'add', Sub: 'sub', Mul: 'mul', Div: 'div', Pow: 'pow', Max: 'max', Min: 'min' };

const transposeOf = (p: Provenance, perm: readonly number[], layer: string): Provenance =>
  // Transposing a transposed 2-D initializer gives the initializer back: record it as such.
  p.kind === 'op' && p.opType === 'Transpose' && p.inputs.length === 1 && perm.join() === '1,0' && String(p.params['perm'] ?? '1,0') === '1,0'
    ? p.inputs[0]
    : { kind: 'op', opType: 'Transpose', node: layer, output: 0, params: { perm }, inputs: [p] };

const reshapeOf = (p: Provenance, shape: readonly number[], layer: string): Provenance =>
  ({ kind: 'op', opType: 'Reshape', node: layer, output: 0, params: { shape }, inputs: [p] });

const toWeights = (t: Tensor, what: string): Weights => {
  if (t.dtype === 'float32') return { dtype: 'float32', shape: t.shape, data: t.data as Float32Array };
  if (t.dtype === 'int32') return { dtype: 'int32', shape: t.shape, data: t.data as Int32Array };
  if (t.dtype === 'int64') return { dtype: 'int64', shape: t.shape, data: t.data as BigInt64Array };
  return no(`${what} has dtype ${t.dtype}; network weights are float32, int32 or int64`);
};

/** Lowers one node, appending its layers to `out`. Left: the reason the engine cannot take it. */
export const lowerNode = (ctx: LowerContext, node: Node, out: Emitted): E.Either<string, void> => {
  try {
    lowerNodeOrThrow(ctx, node, out);
    return E.right(undefined);
  } catch (e) {
    if (e instanceof Unsupported) return E.left(e.reason);
    // A rule helper refusing an attribute (axis out of range and the like) means: not for the engine.
    if (e !== null && typeof e === 'object' && 'detail' in e) return E.left(String((e as { detail: { reason?: string } }).detail.reason ?? 'invalid node'));
    throw e;
  }
};

/** True when the engine can run this node (used by the partitioner). */
export const engineSupports = (ctx: LowerContext, node: Node): E.Either<string, void> =>
  lowerNode(ctx, node, { layers: [], weights: [], constantLayers: new Map(), indexAliases: new Map(), checkOnly: true });

/** The helpers one node's lowering uses; methods (not per-node closures) keep the partitioner's
 *  per-node support test cheap. */
class NodeLowering {
  constructor(
    readonly ctx: LowerContext,
    readonly node: Node,
    readonly out: Emitted,
  ) {}
  type(name: string): TensorType {
    return this.ctx.analyzed.types.get(name)!;
  }
  constant(i: number): Constant | undefined {
    return this.node.inputs[i] ? this.ctx.analyzed.constants.get(this.node.inputs[i]) : undefined;
  }
  present(i: number): boolean {
    return (this.node.inputs[i] ?? '') !== '';
  }
  layerName(suffix?: string): string {
    return suffix === undefined ? this.node.name : `${this.node.name}/${suffix}`;
  }
  push(layer: Layer): void {
    this.out.layers.push(layer);
  }
  weight(layer: string, role: WeightRole, provenance: Provenance): void {
    this.out.weights.push({ layer, role, provenance });
  }
  /** The network tensor for input i: the run-time tensor itself, or a constant layer holding the constant. */
  operand(i: number, allowIndex = false): string {
    const name = this.node.inputs[i];
    if (!this.present(i)) return no(`input ${i} is missing`);
    const c = this.ctx.analyzed.constants.get(name);
    if (c === undefined) {
      const dtype = this.type(name).dtype;
      if (dtype !== 'float32' && !(allowIndex && (dtype === 'int32' || dtype === 'int64'))) no(`input '${name}' is ${dtype} at run time`);
      return name;
    }
    if (!isFloat(c.tensor.dtype) && !allowIndex) no(`constant input '${name}' is ${c.tensor.dtype}`);
    const existing = this.out.constantLayers.get(name);
    if (existing !== undefined) return existing;
    const layer = `const:${name}`;
    this.push({ kind: 'constant', name: layer, output: layer, weights: toWeights(c.tensor, `constant '${name}'`) });
    this.weight(layer, 'constant', c.provenance);
    this.out.constantLayers.set(name, layer);
    return layer;
  }
  runtime(i: number): string {
    if (this.constant(i) !== undefined) no(`input ${i} is a constant where a run-time tensor is expected`);
    return this.operand(i);
  }
  needConstant(i: number, what: string): Constant {
    return this.constant(i) ?? no(`${what} (input ${i}) is computed at run time; the engine needs it constant`);
  }
  reshapeTo(input: string, shape: readonly number[]): void {
    this.push({ kind: 'reshape', name: this.layerName(), output: this.node.outputs[0], input, shape });
  }
}

const lowerNodeOrThrow = (ctx: LowerContext, node: Node, out: Emitted): void => {
  const { analyzed } = ctx;
  const L = new NodeLowering(ctx, node, out);

  // A reshape of an index tensor that only Gather reads: no layer, the Gather reads the original.
  if (reshapeOps.has(node.opType) && ctx.indexOnly.has(node.outputs[0])) {
    const source = node.inputs[0];
    if (analyzed.constants.has(source)) no('constant index tensor');
    out.indexAliases.set(node.outputs[0], out.indexAliases.get(source) ?? source);
    return;
  }
  // Run-time tensors that cross into or out of the engine must be float32 (index tensors: see Gather).
  for (let i = 0; i < node.outputs.length; i++) {
    const o = node.outputs[i];
    if (o !== '' && (i === 0 || ctx.used.has(o)) && L.type(o).dtype !== 'float32') no(`output '${o}' is ${L.type(o).dtype}; engine activations are float32`);
    if (i > 0 && o !== '' && ctx.used.has(o) && node.opType !== 'Split') no('only the first output may be used');
  }
  const output = node.outputs[0];

  const unary = unaryOps[node.opType];
  if (unary !== undefined) {
    L.push({ kind: 'unary', name: L.layerName(), output, input: L.runtime(0), op: unary });
    return;
  }
  const binary = binaryOps[node.opType];
  if (binary !== undefined) {
    if (node.inputs.length !== 2) no('expects two inputs');
    L.push({ kind: 'elementwise', name: L.layerName(), output, a: L.operand(0), b: L.operand(1), op: binary });
    return;
  }

  switch (node.opType) {
    case 'Cast':
    case 'Dropout':
      if (L.type(node.inputs[0]).dtype !== 'float32' || L.type(output).dtype !== 'float32') no('only float32 to float32');
      L.push({ kind: 'unary', name: L.layerName(), output, input: L.runtime(0), op: 'identity' });
      return;
    case 'Gelu': {
      const approximate = attrString(node, 'approximate', 'none');
      L.push({ kind: 'unary', name: L.layerName(), output, input: L.runtime(0), op: approximate === 'tanh' ? 'gelu_tanh' : 'gelu_erf' });
      return;
    }
    case 'HardSigmoid':
      if (Math.abs(attrFloat(node, 'alpha', 0.2) - 1 / 6) > 1e-6 || Math.abs(attrFloat(node, 'beta', 0.5) - 0.5) > 1e-7) no('only alpha 1/6 and beta 0.5');
      L.push({ kind: 'unary', name: L.layerName(), output, input: L.runtime(0), op: 'hardsigmoid' });
      return;
    case 'Softmax':
      L.push({ kind: 'softmax', name: L.layerName(), output, input: L.runtime(0), axis: attrInt(node, 'axis', -1) });
      return;
    case 'MatMul': {
      const a = L.type(node.inputs[0]);
      const b = L.type(node.inputs[1]);
      if (a.shape.length < 2 || b.shape.length < 2) no('operands of rank 1');
      const weightB = L.constant(1);
      if (weightB !== undefined && b.shape.length === 2 && isFloat(weightB.tensor.dtype) && L.constant(0) === undefined) {
        // x @ B == fullyConnected with kernel B^T ([out, in], the torch.nn.Linear layout).
        const name = L.layerName();
        const kernel = out.checkOnly ? weightB.tensor : transposeTensor(weightB.tensor, [1, 0]);
        L.push({ kind: 'fullyConnected', name, output, input: L.runtime(0), outFeatures: b.shape[1], kernel: toWeights(kernel, 'MatMul weight') });
        L.weight(name, 'kernel', transposeOf(weightB.provenance, [1, 0], name));
        return;
      }
      L.push({ kind: 'matrixMultiply', name: L.layerName(), output, a: L.operand(0), transposeA: false, b: L.operand(1), transposeB: false });
      return;
    }
    case 'Gemm': {
      if (attrFloat(node, 'alpha', 1) !== 1 || attrFloat(node, 'beta', 1) !== 1) no('alpha and beta other than 1');
      if (attrInt(node, 'transA', 0) !== 0) no('transA');
      const transB = attrInt(node, 'transB', 0) === 1;
      const n = L.type(output).shape[1];
      const weightB = L.constant(1);
      const bias = L.present(2) ? L.needConstant(2, 'C') : undefined;
      if (bias !== undefined && elementCount(bias.tensor.shape) !== n) no(`C of shape [${bias.tensor.shape}] is not one value per output column`);
      if (weightB === undefined || !isFloat(weightB.tensor.dtype)) {
        const mm = bias ? L.layerName('matmul') : L.layerName();
        L.push({ kind: 'matrixMultiply', name: mm, output: mm === L.layerName() ? output : mm, a: L.runtime(0), transposeA: false, b: L.operand(1), transposeB: transB });
        if (bias) L.push({ kind: 'elementwise', name: L.layerName(), output, a: mm, b: L.operand(2), op: 'add' });
        return;
      }
      const name = L.layerName();
      const kernel = transB || out.checkOnly ? weightB.tensor : transposeTensor(weightB.tensor, [1, 0]);
      const biasWeights = bias && toWeights({ ...bias.tensor, shape: [n] }, 'Gemm bias');
      L.push({ kind: 'fullyConnected', name, output, input: L.runtime(0), outFeatures: n, kernel: toWeights(kernel, 'Gemm weight'), ...(biasWeights ? { bias: biasWeights } : {}) });
      L.weight(name, 'kernel', transB ? weightB.provenance : transposeOf(weightB.provenance, [1, 0], name));
      if (bias) L.weight(name, 'bias', bias.tensor.shape.length === 1 ? bias.provenance : reshapeOf(bias.provenance, [n], name));
      return;
    }
    case 'Conv': {
      const x = L.type(node.inputs[0]);
      if (x.shape.length !== 4) no('only 2-D convolution');
      const autoPad = attrString(node, 'auto_pad', 'NOTSET');
      if (autoPad !== 'NOTSET' && autoPad !== 'VALID') no(`auto_pad ${autoPad}`);
      const w = L.needConstant(1, 'W');
      const b = L.present(2) ? L.needConstant(2, 'B') : undefined;
      const pads = autoPad === 'VALID' ? [0, 0, 0, 0] : attrInts(node, 'pads') ?? [0, 0, 0, 0];
      const strides = attrInts(node, 'strides') ?? [1, 1];
      const dilations = attrInts(node, 'dilations') ?? [1, 1];
      const name = L.layerName();
      L.push({
        kind: 'convolution', name, output, input: L.runtime(0),
        params: {
          outChannels: w.tensor.shape[0], kernel: [w.tensor.shape[2], w.tensor.shape[3]], stride: [strides[0], strides[1]],
          padding: [pads[0], pads[1], pads[2], pads[3]], dilation: [dilations[0], dilations[1]], groups: attrInt(node, 'group', 1),
        },
        kernel: toWeights(w.tensor, 'Conv weight'),
        ...(b ? { bias: toWeights(b.tensor, 'Conv bias') } : {}),
      });
      L.weight(name, 'kernel', w.provenance);
      if (b) L.weight(name, 'bias', b.provenance);
      return;
    }
    case 'BatchNormalization': {
      if (attrInt(node, 'training_mode', 0) !== 0) no('training mode');
      if (L.type(node.inputs[0]).shape.length < 2) no('input of rank below 2');
      const [scale, shift, mean, variance] = [1, 2, 3, 4].map((i) => L.needConstant(i, ['scale', 'B', 'mean', 'var'][i - 1]));
      const name = L.layerName();
      L.push({
        kind: 'batchNorm', name, output, input: L.runtime(0), epsilon: attrFloat(node, 'epsilon', 1e-5),
        scale: toWeights(scale.tensor, 'scale'), shift: toWeights(shift.tensor, 'B'), mean: toWeights(mean.tensor, 'mean'), variance: toWeights(variance.tensor, 'var'),
      });
      L.weight(name, 'scale', scale.provenance);
      L.weight(name, 'shift', shift.provenance);
      L.weight(name, 'mean', mean.provenance);
      L.weight(name, 'variance', variance.provenance);
      return;
    }
    case 'LayerNormalization': {
      const x = L.type(node.inputs[0]);
      const axis = normalizeAxis(node, attrInt(node, 'axis', -1), x.shape.length);
      const count = elementCount(x.shape.slice(axis));
      const scale = L.needConstant(1, 'scale');
      const shift = L.present(2) ? L.needConstant(2, 'B') : undefined;
      if (elementCount(scale.tensor.shape) !== count || (shift && elementCount(shift.tensor.shape) !== count)) no('scale and B must cover the normalized dimensions exactly');
      const name = L.layerName();
      L.push({
        kind: 'layerNorm', name, output, input: L.runtime(0), axis, epsilon: attrFloat(node, 'epsilon', 1e-5),
        scale: toWeights(scale.tensor, 'scale'), ...(shift ? { shift: toWeights(shift.tensor, 'B') } : {}),
      });
      L.weight(name, 'scale', scale.provenance);
      if (shift) L.weight(name, 'shift', shift.provenance);
      return;
    }
    case 'ReduceMean':
    case 'ReduceSum':
    case 'ReduceMax': {
      const x = L.type(node.inputs[0]);
      const fromInput = node.opType === 'ReduceSum' || analyzed.graph.opset >= 18;
      const raw = fromInput ? (L.present(1) ? L.needConstant(1, 'axes').tensor : undefined) : undefined;
      const listed = fromInput ? (raw ? Array.from(raw.data as ArrayLike<number | bigint>, Number) : undefined) : attrInts(node, 'axes');
      if ((listed === undefined || listed.length === 0) && attrInt(node, 'noop_with_empty_axes', 0) === 1) {
        L.push({ kind: 'unary', name: L.layerName(), output, input: L.runtime(0), op: 'identity' });
        return;
      }
      const axes = listed === undefined || listed.length === 0 ? x.shape.map((_, i) => i) : listed.map((a) => normalizeAxis(node, a, x.shape.length));
      const op = node.opType === 'ReduceMean' ? 'mean' : node.opType === 'ReduceSum' ? 'sum' : 'max';
      L.push({ kind: 'reduce', name: L.layerName(), output, input: L.runtime(0), op, axes, keepDims: attrInt(node, 'keepdims', 1) === 1 });
      return;
    }
    case 'GlobalAveragePool':
      if (L.type(node.inputs[0]).shape.length !== 4) no('only 4-D input');
      L.push({ kind: 'pooling', name: L.layerName(), output, input: L.runtime(0), op: 'global_average' });
      return;
    case 'MaxPool':
    case 'AveragePool': {
      if (L.type(node.inputs[0]).shape.length !== 4) no('only 2-D pooling');
      if (attrString(node, 'auto_pad', 'NOTSET') !== 'NOTSET' || attrInt(node, 'ceil_mode', 0) !== 0) no('auto_pad or ceil_mode');
      if ((attrInts(node, 'dilations') ?? [1, 1]).some((d) => d !== 1) || attrInt(node, 'storage_order', 0) !== 0) no('dilations or storage order');
      const k = attrInts(node, 'kernel_shape')!;
      const s = attrInts(node, 'strides') ?? [1, 1];
      const p = attrInts(node, 'pads') ?? [0, 0, 0, 0];
      L.push({
        kind: 'pooling', name: L.layerName(), output, input: L.runtime(0), op: node.opType === 'MaxPool' ? 'max' : 'average',
        params: { kernel: [k[0], k[1]], stride: [s[0], s[1]], padding: [p[0], p[1], p[2], p[3]], countIncludePad: attrInt(node, 'count_include_pad', 0) === 1 },
      });
      return;
    }
    case 'Reshape':
    case 'Flatten':
    case 'Squeeze':
    case 'Unsqueeze':
      L.reshapeTo(L.runtime(0), L.type(output).shape);
      return;
    case 'Transpose': {
      const x = L.type(node.inputs[0]);
      L.push({ kind: 'transpose', name: L.layerName(), output, input: L.runtime(0), perm: attrInts(node, 'perm') ?? x.shape.map((_, i) => x.shape.length - 1 - i) });
      return;
    }
    case 'Concat':
      L.push({ kind: 'concatenation', name: L.layerName(), output, inputs: node.inputs.map((_, i) => L.operand(i)), axis: attrInt(node, 'axis', 0) });
      return;
    case 'Slice': {
      const x = L.type(node.inputs[0]);
      const values = (i: number) => (L.present(i) ? Array.from(L.needConstant(i, 'slice bound').tensor.data as ArrayLike<number | bigint>, Number) : undefined);
      const s = resolveSlice(node, x.shape, values(1)!, values(2)!, values(3), values(4));
      if (s.step.some((v) => v < 1)) no('negative steps');
      L.push({ kind: 'slice', name: L.layerName(), output, input: L.runtime(0), start: s.start, size: s.count, stride: s.step });
      return;
    }
    case 'Split': {
      const x = L.type(node.inputs[0]);
      const { axis, sizes } = resolveSplit({ node, opset: analyzed.graph.opset, types: node.inputs.map((n) => (n ? L.type(n) : undefined)), values: node.inputs.map((n) => (n ? analyzed.constants.get(n)?.tensor : undefined)) });
      const input = L.runtime(0);
      let begin = 0;
      sizes.forEach((size, k) => {
        const o = node.outputs[k];
        const start = x.shape.map((_, i) => (i === axis ? begin : 0));
        begin += size;
        if (o === '') return;
        L.push({ kind: 'slice', name: L.layerName(`split${k}`), output: o, input, start, size: x.shape.map((d, i) => (i === axis ? size : d)), stride: x.shape.map(() => 1) });
      });
      return;
    }
    case 'Gather': {
      const data = L.type(node.inputs[0]);
      const axis = normalizeAxis(node, attrInt(node, 'axis', 0), data.shape.length);
      const indices = L.type(node.inputs[1]);
      if (indices.dtype !== 'int32' && indices.dtype !== 'int64') no('indices must be int32 or int64');
      const original = out.indexAliases.get(node.inputs[1]);
      if (original === undefined) {
        L.push({ kind: 'gather', name: L.layerName(), output, data: L.operand(0), indices: L.operand(1, true), axis });
        return;
      }
      const gathered = L.layerName('gather');
      L.push({ kind: 'gather', name: gathered, output: gathered, data: L.operand(0), indices: original, axis });
      L.reshapeTo(gathered, L.type(output).shape);
      return;
    }
    default:
      no('no lowering for this operator');
  }
};

const networkDType = (t: TensorType, name: string): TensorDType => {
  if (t.dtype === 'float32' || t.dtype === 'int32' || t.dtype === 'int64') return t.dtype;
  throw new LowerError({ _tag: 'UnsupportedBoundary', tensor: name, reason: `an engine input of dtype ${t.dtype}; engines take float32, int32 or int64` });
};

/** Lowers the nodes of one engine segment, with its boundary tensors, to a network. */
export const lowerSegment = (
  ctx: LowerContext,
  segment: { readonly nodes: readonly Node[]; readonly inputs: readonly string[]; readonly outputs: readonly string[] },
): E.Either<LowerErrorDetail, LoweredSegment> => {
  const out: Emitted = { layers: [], weights: [], constantLayers: new Map(), indexAliases: new Map() };
  for (const node of segment.nodes) {
    const r = lowerNode(ctx, node, out);
    if (E.isLeft(r)) return E.left({ _tag: 'UnsupportedNode', node: node.name, opType: node.opType, reason: r.left });
  }
  let inputs: NetworkInput[];
  try {
    inputs = segment.inputs.map((name) => {
      const t = ctx.analyzed.types.get(name)!;
      return { name, dtype: networkDType(t, name), shape: t.shape };
    });
  } catch (e) {
    if (e instanceof LowerError) return E.left(e.detail);
    throw e;
  }
  const outputs = segment.outputs.map((tensor) => ({ tensor, name: tensor }));
  return E.right({ network: { inputs, layers: out.layers, outputs }, weights: out.weights });
};
