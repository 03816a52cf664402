/**
 * fast-check arbitraries of small, valid random networks with random weights and inputs, for the engine's
 * property tests. Structure (shapes, layer choices) comes from fast-check so it shrinks; weight and input
 * values come from a seeded generator, so a failing case is reproducible from its printed seed.
 */
import { fc } from '@fast-check/vitest';
import type { Layer, NetworkDefinition, UnaryOp, Weights, WeightDType, WeightRole } from '../../src/network/types.js';
import { networkWeights } from '../../src/network/types.js';
import { narrow16, widen16 } from '../../src/reference/half.js';

export type HostTensor = Float32Array | Int32Array | BigInt64Array;
export interface NetCase {
  readonly family: string;
  readonly net: NetworkDefinition;
  readonly inputs: Record<string, HostTensor>;
  /** Shapes of the outputs as the generator computed them (independently of the evaluator and the engine). */
  readonly outputShapes: Record<string, readonly number[]>;
}

/** mulberry32: a small seeded generator of floats in [0, 1). */
export const rng = (seed: number): (() => number) => {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
};

const count = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/** Float values in [lo, hi) stored as `dtype` (16-bit dtypes as rounded bit patterns). */
export const randomWeights = (rand: () => number, dtype: WeightDType, shape: readonly number[], lo: number, hi: number): Weights => {
  const values = new Float32Array(count(shape));
  for (let i = 0; i < values.length; i++) values[i] = lo + (hi - lo) * rand();
  return dtype === 'float32' ? { dtype, shape, data: values } : { dtype, shape, data: narrow16(dtype, values) };
};

const floatInput = (rand: () => number, shape: readonly number[]): Float32Array => {
  const out = new Float32Array(count(shape));
  for (let i = 0; i < out.length; i++) out[i] = 2 * rand() - 1;
  return out;
};

/** Accumulates layers and tracks every tensor's shape, so helpers can size weights. */
class NetBuilder {
  readonly layers: Layer[] = [];
  readonly inputs: NetworkDefinition['inputs'][number][] = [];
  readonly outputs: NetworkDefinition['outputs'][number][] = [];
  readonly shapes = new Map<string, number[]>();
  readonly rand: () => number;
  #next = 0;
  constructor(
    seed: number,
    readonly dtype: WeightDType,
  ) {
    this.rand = rng(seed);
  }
  private name(prefix: string) {
    return `${prefix}${this.#next++}`;
  }
  private add(layer: Layer, shape: number[]): string {
    this.layers.push(layer);
    this.shapes.set(layer.output, shape);
    return layer.output;
  }
  shape(t: string): number[] {
    const s = this.shapes.get(t);
    if (s === undefined) throw new Error(`no tensor ${t}`);
    return s;
  }
  w(shape: readonly number[], lo: number, hi: number): Weights {
    return randomWeights(this.rand, this.dtype, shape, lo, hi);
  }
  input(name: string, shape: number[], dtype: 'float32' | 'int32' = 'float32'): string {
    this.inputs.push({ name, dtype, shape });
    this.shapes.set(name, shape);
    return name;
  }
  output(t: string): void {
    this.outputs.push({ tensor: t, name: `out${this.outputs.length}` });
  }
  fc(x: string, outF: number, bias: boolean): string {
    const s = this.shape(x);
    const inF = s[s.length - 1];
    const r = 1 / Math.sqrt(inF);
    const n = this.name('fc');
    return this.add(
      { kind: 'fullyConnected', name: n, output: n, input: x, outFeatures: outF, kernel: this.w([outF, inF], -r, r), ...(bias ? { bias: this.w([outF], -0.5, 0.5) } : {}) },
      [...s.slice(0, -1), outF],
    );
  }
  unary(x: string, op: UnaryOp): string {
    const n = this.name('act');
    return this.add({ kind: 'unary', name: n, output: n, input: x, op }, this.shape(x));
  }
  elementwise(a: string, b: string, op: 'add' | 'sub' | 'mul' | 'max' | 'min' | 'div' | 'pow'): string {
    const sa = this.shape(a);
    const sb = this.shape(b);
    const rank = Math.max(sa.length, sb.length);
    const shape = Array.from({ length: rank }, (_, i) => Math.max(sa[sa.length - rank + i] ?? 1, sb[sb.length - rank + i] ?? 1));
    const n = this.name('ew');
    return this.add({ kind: 'elementwise', name: n, output: n, a, b, op }, shape);
  }
  constant(shape: number[], lo: number, hi: number): string {
    const n = this.name('const');
    return this.add({ kind: 'constant', name: n, output: n, weights: this.w(shape, lo, hi) }, shape);
  }
  matmul(a: string, ta: boolean, b: string, tb: boolean): string {
    const sa = this.shape(a);
    const sb = this.shape(b);
    const m = ta ? sa[sa.length - 1] : sa[sa.length - 2];
    const nn = tb ? sb[sb.length - 2] : sb[sb.length - 1];
    const ba = sa.slice(0, -2);
    const bb = sb.slice(0, -2);
    const rank = Math.max(ba.length, bb.length);
    const batch = Array.from({ length: rank }, (_, i) => Math.max(ba[ba.length - rank + i] ?? 1, bb[bb.length - rank + i] ?? 1));
    const n = this.name('mm');
    return this.add({ kind: 'matrixMultiply', name: n, output: n, a, transposeA: ta, b, transposeB: tb }, [...batch, m, nn]);
  }
  softmax(x: string, axis: number): string {
    const n = this.name('softmax');
    return this.add({ kind: 'softmax', name: n, output: n, input: x, axis }, this.shape(x));
  }
  layerNorm(x: string, axis: number, affine: boolean): string {
    const s = this.shape(x);
    const inner = s.slice(axis < 0 ? s.length + axis : axis);
    const n = this.name('ln');
    return this.add(
      { kind: 'layerNorm', name: n, output: n, input: x, axis, epsilon: 1e-5, ...(affine ? { scale: this.w(inner, 0.5, 1.5), shift: this.w(inner, -0.5, 0.5) } : {}) },
      s,
    );
  }
  rmsNorm(x: string, affine: boolean): string {
    const s = this.shape(x);
    const n = this.name('rms');
    return this.add({ kind: 'rmsNorm', name: n, output: n, input: x, epsilon: 1e-6, ...(affine ? { scale: this.w([s[s.length - 1]], 0.5, 1.5) } : {}) }, s);
  }
  conv(x: string, outC: number, k: number, stride: number, pad: number, groups: number, bias: boolean): string {
    const [N, C, H, W] = this.shape(x);
    const r = 1 / Math.sqrt((C / groups) * k * k);
    const n = this.name('conv');
    const OH = Math.floor((H + 2 * pad - k) / stride) + 1;
    const OW = Math.floor((W + 2 * pad - k) / stride) + 1;
    return this.add(
      {
        kind: 'convolution',
        name: n,
        output: n,
        input: x,
        params: { outChannels: outC, kernel: [k, k], stride: [stride, stride], padding: [pad, pad, pad, pad], dilation: [1, 1], groups },
        kernel: this.w([outC, C / groups, k, k], -r, r),
        ...(bias ? { bias: this.w([outC], -0.5, 0.5) } : {}),
      },
      [N, outC, OH, OW],
    );
  }
  batchNorm(x: string): string {
    const C = this.shape(x)[1];
    const n = this.name('bn');
    return this.add(
      { kind: 'batchNorm', name: n, output: n, input: x, epsilon: 1e-5, scale: this.w([C], 0.5, 1.5), shift: this.w([C], -0.5, 0.5), mean: this.w([C], -0.5, 0.5), variance: this.w([C], 0.5, 2) },
      this.shape(x),
    );
  }
  pool(x: string, op: 'average' | 'max', k: number, stride: number, pad: number, countIncludePad: boolean): string {
    const [N, C, H, W] = this.shape(x);
    const n = this.name('pool');
    return this.add(
      { kind: 'pooling', name: n, output: n, input: x, op, params: { kernel: [k, k], stride: [stride, stride], padding: [pad, pad, pad, pad], countIncludePad } },
      [N, C, Math.floor((H + 2 * pad - k) / stride) + 1, Math.floor((W + 2 * pad - k) / stride) + 1],
    );
  }
  globalPool(x: string): string {
    const [N, C] = this.shape(x);
    const n = this.name('gap');
    return this.add({ kind: 'pooling', name: n, output: n, input: x, op: 'global_average' }, [N, C, 1, 1]);
  }
  reshape(x: string, shape: number[]): string {
    const n = this.name('reshape');
    const total = count(this.shape(x));
    const known = count(shape.filter((d) => d !== -1));
    return this.add({ kind: 'reshape', name: n, output: n, input: x, shape }, shape.map((d) => (d === -1 ? total / known : d)));
  }
  transpose(x: string, perm: readonly number[]): string {
    const s = this.shape(x);
    const n = this.name('transpose');
    return this.add({ kind: 'transpose', name: n, output: n, input: x, perm: [...perm] }, perm.map((p) => s[p]));
  }
  concat(inputs: string[], axis: number): string {
    const s = this.shape(inputs[0]);
    const a = axis < 0 ? s.length + axis : axis;
    const n = this.name('concat');
    return this.add({ kind: 'concatenation', name: n, output: n, inputs, axis }, s.map((d, i) => (i === a ? inputs.reduce((t, x) => t + this.shape(x)[a], 0) : d)));
  }
  slice(x: string, start: number[], size: number[], stride: number[]): string {
    const n = this.name('slice');
    return this.add({ kind: 'slice', name: n, output: n, input: x, start, size, stride }, size);
  }
  gather(data: string, indices: string, axis: number): string {
    const sd = this.shape(data);
    const a = axis < 0 ? sd.length + axis : axis;
    const n = this.name('gather');
    return this.add({ kind: 'gather', name: n, output: n, data, indices, axis }, [...sd.slice(0, a), ...this.shape(indices), ...sd.slice(a + 1)]);
  }
  reduce(x: string, op: 'sum' | 'mean' | 'max', axes: number[], keepDims: boolean): string {
    const s = this.shape(x);
    const norm = new Set(axes.map((a) => (a < 0 ? s.length + a : a)));
    const n = this.name('reduce');
    return this.add({ kind: 'reduce', name: n, output: n, input: x, op, axes, keepDims }, keepDims ? s.map((d, i) => (norm.has(i) ? 1 : d)) : s.filter((_, i) => !norm.has(i)));
  }
  /** The network, and random inputs for it (index inputs in [-extent, extent) of `indexExtent`). */
  done(family: string, inputSeed: number, indexExtent = 1): NetCase {
    const rand = rng(inputSeed);
    const inputs: Record<string, HostTensor> = {};
    for (const i of this.inputs) {
      if (i.dtype === 'int32') inputs[i.name] = Int32Array.from({ length: count(i.shape) }, () => Math.floor(rand() * 2 * indexExtent) - indexExtent);
      else inputs[i.name] = floatInput(rand, i.shape);
    }
    const outputShapes = Object.fromEntries(this.outputs.map((o) => [o.name, this.shape(o.tensor)]));
    return { family, net: { inputs: this.inputs, layers: this.layers, outputs: this.outputs }, inputs, outputShapes };
  }
}

export const activations: readonly UnaryOp[] = ['relu', 'gelu_erf', 'gelu_tanh', 'silu', 'sigmoid', 'tanh', 'hardswish', 'hardsigmoid', 'identity', 'neg', 'abs', 'erf'];

const dim = (max = 8) => fc.integer({ min: 1, max });
const seed = fc.integer({ min: 0, max: 0x7fffffff });

export interface FamilyOptions {
  /** dtype of the generated float weights (default float32). */
  readonly weightDType?: WeightDType;
}

/** FC (+ bias) + activation stacks. */
export const mlpNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({
      batch: dim(4),
      inF: dim(12),
      layers: fc.array(fc.record({ outF: dim(12), bias: fc.boolean(), act: fc.constantFrom(...activations) }), { minLength: 1, maxLength: 4 }),
      seed,
      inputSeed: seed,
    })
    .map(({ batch, inF, layers, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      let x = b.input('x', [batch, inF]);
      for (const l of layers) x = b.unary(b.fc(x, l.outF, l.bias), l.act);
      b.output(x);
      return b.done('mlp', inputSeed);
    });

/** q/k/v-style sibling FCs over one input, combined by add, concatenation or a small attention. */
export const qkvNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ batch: dim(2), seq: dim(5), hidden: dim(10), head: dim(8), bias: fc.boolean(), combine: fc.constantFrom('add', 'concat', 'attention'), seed, inputSeed: seed })
    .map(({ batch, seq, hidden, head, bias, combine, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const x = b.input('x', [batch, seq, hidden]);
      const [q, k, v] = [b.fc(x, head, bias), b.fc(x, head, bias), b.fc(x, head, bias)];
      if (combine === 'add') b.output(b.elementwise(b.elementwise(q, k, 'add'), v, 'add'));
      else if (combine === 'concat') b.output(b.fc(b.concat([q, k, v], -1), hidden, true));
      else {
        const scores = b.softmax(b.matmul(q, false, k, true), -1);
        b.output(b.fc(b.matmul(scores, false, v, false), hidden, bias));
      }
      return b.done(`qkv-${combine}`, inputSeed);
    });

/** conv (+ bias) + batch norm + relu stacks with pooling, then a classifier head. */
export const convNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({
      n: dim(2),
      c: dim(4),
      hw: fc.integer({ min: 4, max: 9 }),
      blocks: fc.array(
        fc.record({ outC: dim(6), k: fc.constantFrom(1, 3), stride: fc.constantFrom(1, 2), bias: fc.boolean(), bn: fc.boolean(), relu: fc.boolean(), depthwise: fc.boolean() }),
        { minLength: 1, maxLength: 3 },
      ),
      pool: fc.constantFrom('max', 'average', 'average-incl', 'global', 'none'),
      head: fc.boolean(),
      seed,
      inputSeed: seed,
    })
    .map(({ n, c, hw, blocks, pool, head, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      let x = b.input('x', [n, c, hw, hw]);
      for (const blk of blocks) {
        const [, C, H] = b.shape(x);
        const k = Math.min(blk.k, H + 2 * ((blk.k - 1) >> 1));
        const groups = blk.depthwise ? C : 1;
        const outC = blk.depthwise ? C : blk.outC;
        x = b.conv(x, outC, k, blk.stride, (k - 1) >> 1, groups, blk.bias);
        if (blk.bn) x = b.batchNorm(x);
        if (blk.relu) x = b.unary(x, 'relu');
      }
      const H = b.shape(x)[2];
      if (pool === 'global') x = b.globalPool(x);
      else if (pool !== 'none' && H >= 2) x = b.pool(x, pool === 'max' ? 'max' : 'average', 2, 2, H % 2, pool === 'average-incl');
      if (head) {
        const [N, C, PH, PW] = b.shape(x);
        x = b.fc(b.reshape(x, [N, C * PH * PW]), 5, true);
      }
      b.output(x);
      return b.done('conv', inputSeed);
    });

/** layer norm / RMS norm, softmax on a random axis. */
export const normNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ batch: dim(3), seq: dim(5), hidden: fc.integer({ min: 2, max: 12 }), kind: fc.constantFrom('layer-1', 'layer-2', 'rms'), affine: fc.boolean(), softmaxAxis: fc.integer({ min: -3, max: 2 }), seed, inputSeed: seed })
    .map(({ batch, seq, hidden, kind, affine, softmaxAxis, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const x = b.input('x', [batch, seq, hidden]);
      const h = b.fc(x, hidden, true);
      const normed = kind === 'rms' ? b.rmsNorm(h, affine) : b.layerNorm(h, kind === 'layer-1' ? -1 : 1, affine);
      b.output(b.softmax(normed, softmaxAxis));
      b.output(normed);
      return b.done(`norm-${kind}`, inputSeed);
    });

/** reshape / transpose / concat / slice around an FC. */
export const shapeNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ a: dim(4), bb: dim(4), c: dim(6), perm: fc.constantFrom([0, 2, 1], [2, 1, 0], [1, 0, 2], [2, 0, 1]), sliceStride: fc.constantFrom(1, 2), seed, inputSeed: seed })
    .map(({ a, bb, c, perm, sliceStride, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const x = b.input('x', [a, bb, c]);
      const t = b.transpose(b.fc(x, c, true), perm);
      const cat = b.concat([t, t], 0);
      const s = b.shape(cat);
      const sliced = b.slice(cat, [1, 0, 0], [s[0] - 1, Math.ceil(s[1] / sliceStride), s[2]], [1, sliceStride, 1]);
      const flat = b.reshape(sliced, [-1, b.shape(sliced)[2]]);
      b.output(b.fc(flat, 3, false));
      return b.done('shape', inputSeed);
    });

/** gather from a constant embedding table with int32 indices (negative ones included). */
export const embeddingNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ vocab: fc.integer({ min: 2, max: 12 }), width: dim(8), batch: dim(3), seq: dim(5), seed, inputSeed: seed })
    .map(({ vocab, width, batch, seq, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const ids = b.input('ids', [batch, seq], 'int32');
      const table = b.constant([vocab, width], -1, 1);
      const e = b.gather(table, ids, 0);
      b.output(b.fc(b.unary(e, 'gelu_erf'), 4, true));
      return b.done('embedding', inputSeed, vocab);
    });

/** matrix multiply of two activations and with a constant operand (either side, transposed or not). */
export const matmulNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ batch: dim(3), m: dim(6), k: dim(6), n: dim(6), ta: fc.boolean(), tb: fc.boolean(), constSide: fc.constantFrom('a', 'b'), seed, inputSeed: seed })
    .map(({ batch, m, k, n, ta, tb, constSide, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const x = b.input('x', [batch, ta ? k : m, ta ? m : k]);
      const y = b.input('y', [batch, tb ? n : k, tb ? k : n]);
      const xy = b.matmul(x, ta, y, tb); // [batch, m, n]
      const c = constSide === 'b' ? b.constant(tb ? [k, n] : [n, k], -0.5, 0.5) : b.constant(ta ? [m, k] : [k, m], -0.5, 0.5);
      // the constant is stored so that the transpose flag lines it up: xy · c' with c' [n, k], or c' · xy with c' [k, m]
      const out = constSide === 'b' ? b.matmul(xy, false, c, tb) : b.matmul(c, ta, xy, false);
      b.output(out);
      return b.done(`matmul-const-${constSide}`, inputSeed);
    });

/** broadcast elementwise ops with constants, reductions. */
export const elementwiseNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ a: dim(4), c: dim(6), op: fc.constantFrom('add', 'sub', 'mul', 'max', 'min', 'div'), reduceOp: fc.constantFrom('sum', 'mean', 'max'), axis: fc.constantFrom(-1, 0, 1), keepDims: fc.boolean(), seed, inputSeed: seed })
    .map(({ a, c, op, reduceOp, axis, keepDims, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const x = b.input('x', [a, c]);
      // positive constants keep div away from zero
      const k = b.constant([c], 0.5, 1.5);
      const e = b.elementwise(b.fc(x, c, true), k, op);
      b.output(b.reduce(b.unary(e, 'tanh'), reduceOp, [axis], keepDims));
      return b.done(`elementwise-${op}`, inputSeed);
    });

/** Wider layers (GEMM and convolution tile edges), FC on rank-4 inputs. */
export const wideNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ rows: fc.integer({ min: 1, max: 40 }), inF: fc.integer({ min: 1, max: 80 }), hidden: fc.integer({ min: 1, max: 80 }), c: fc.integer({ min: 1, max: 20 }), act: fc.constantFrom(...activations), rank4: fc.boolean(), seed, inputSeed: seed })
    .map(({ rows, inF, hidden, c, act, rank4, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      if (rank4) {
        const x = b.input('x', [1, c, 5, 6]);
        const y = b.unary(b.batchNorm(b.conv(x, hidden, 3, 1, 1, 1, false)), act);
        b.output(b.fc(y, 7, true)); // FC over the last dimension of a 4-D tensor
      } else {
        const x = b.input('x', [rows, inF]);
        b.output(b.fc(b.unary(b.fc(x, hidden, true), act), inF, true));
      }
      return b.done('wide', inputSeed);
    });

/**
 * Intermediate tensors with several consumers or marked as outputs: a fused bias/activation/batch norm
 * must not hide the value other consumers read.
 */
export const fanoutNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ batch: dim(3), f: dim(9), c: dim(4), hw: fc.integer({ min: 3, max: 6 }), act: fc.constantFrom(...activations), conv: fc.boolean(), seed, inputSeed: seed })
    .map(({ batch, f, c, hw, act, conv, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      if (conv) {
        const x = b.input('x', [batch, c, hw, hw]);
        const pre = b.conv(x, c + 1, 3, 1, 1, 1, true);
        const normed = b.batchNorm(pre);
        const activated = b.unary(normed, act);
        b.output(pre); // the convolution's own output, before the batch norm folded into it
        b.output(normed);
        b.output(b.elementwise(activated, normed, 'add'));
      } else {
        const x = b.input('x', [batch, f]);
        const h = b.fc(x, f, true);
        const a = b.unary(h, act);
        const q = b.fc(h, f, true); // siblings over h, one of them also feeding the output sum
        const k = b.fc(h, f, false);
        b.output(h);
        b.output(b.elementwise(b.elementwise(a, q, 'add'), k, 'mul'));
        b.output(q);
      }
      return b.done(`fanout-${conv ? 'conv' : 'fc'}`, inputSeed);
    });

/** A constant used both as a GEMM operand and as a plain tensor; sibling FCs of different widths. */
export const sharedConstantNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({ batch: dim(3), m: dim(5), k: dim(7), n: dim(7), widths: fc.array(dim(9), { minLength: 2, maxLength: 4 }), biases: fc.array(fc.boolean(), { minLength: 4, maxLength: 4 }), seed, inputSeed: seed })
    .map(({ batch, m, k, n, widths, biases, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const x = b.input('x', [batch, m, k]);
      const z = b.input('z', [k, n]);
      const c = b.constant([k, n], -0.5, 0.5);
      b.output(b.matmul(x, false, c, false));
      b.output(b.elementwise(c, z, 'mul'));
      const siblings = widths.map((w, i) => b.fc(x, w, biases[i]));
      b.output(b.concat(siblings, -1));
      return b.done('shared-constant', inputSeed);
    });

/** Layers in less common places: batch norm on inputs of rank 2..4, norms over every axis, reductions over
 *  several axes, softmax over axis 0, pow, and the unary ops that need positive inputs. */
export const miscNetwork = (o: FamilyOptions = {}) =>
  fc
    .record({
      shape: fc.array(dim(5), { minLength: 2, maxLength: 4 }),
      lnAxis: fc.nat(),
      reduceAxes: fc.uniqueArray(fc.nat({ max: 3 }), { minLength: 1, maxLength: 3 }),
      keepDims: fc.boolean(),
      positiveOp: fc.constantFrom('exp', 'sqrt', 'reciprocal', 'log' as const),
      reduceOp: fc.constantFrom('sum', 'mean', 'max' as const),
      seed,
      inputSeed: seed,
    })
    .map(({ shape, lnAxis, reduceAxes, keepDims, positiveOp, reduceOp, seed, inputSeed }) => {
      const b = new NetBuilder(seed, o.weightDType ?? 'float32');
      const rank = shape.length;
      const x = b.input('x', shape);
      const bn = b.batchNorm(x);
      b.output(bn);
      b.output(b.layerNorm(bn, lnAxis % rank, true));
      b.output(b.softmax(bn, 0));
      // positive inputs for sqrt/log/reciprocal/pow: sigmoid + 0.5
      const positive = b.elementwise(b.unary(bn, 'sigmoid'), b.constant([shape[rank - 1]], 0.5, 1), 'add');
      b.output(b.unary(positive, positiveOp));
      b.output(b.elementwise(positive, b.constant([1], 0.5, 2), 'pow'));
      b.output(b.reduce(bn, reduceOp, reduceAxes.map((a) => (a % rank) - (a % 2 === 0 ? 0 : rank)), keepDims));
      return b.done('misc', inputSeed);
    });

export const families = {
  mlp: mlpNetwork,
  qkv: qkvNetwork,
  conv: convNetwork,
  norm: normNetwork,
  shape: shapeNetwork,
  embedding: embeddingNetwork,
  matmul: matmulNetwork,
  elementwise: elementwiseNetwork,
  wide: wideNetwork,
  fanout: fanoutNetwork,
  sharedConstant: sharedConstantNetwork,
  misc: miscNetwork,
} as const;

/** Any of the families. */
export const anyNetwork = (o: FamilyOptions = {}): fc.Arbitrary<NetCase> => fc.oneof(...Object.values(families).map((f) => f(o)));

/** Widened float values of weights (float16/bfloat16 bit patterns decoded). */
export const floatValues = (w: Weights): Float32Array =>
  w.dtype === 'float32' ? (w.data as Float32Array) : w.dtype === 'float16' || w.dtype === 'bfloat16' ? widen16(w.dtype, w.data as Uint16Array) : Float32Array.from(w.data as Int32Array);

/** Fresh random values for one weight: same dtype and shape; positive where the original was (variances, divisors). */
export const rerollWeight = (rand: () => number, w: Weights): Weights => {
  if (w.dtype === 'int32' || w.dtype === 'int64') return w;
  const values = floatValues(w);
  const positive = values.every((v) => v > 0);
  let max = 0;
  for (const v of values) max = Math.max(max, Math.abs(v));
  const r = max === 0 ? 1 : max;
  return positive ? randomWeights(rand, w.dtype, w.shape, 0.5 * r, 1.5 * r) : randomWeights(rand, w.dtype, w.shape, -r, r);
};

/** Replaces the weights of the listed (or all) layer/role pairs in a network; everything else is kept. */
export const withWeights = (net: NetworkDefinition, replace: (layer: string, role: WeightRole, w: Weights) => Weights): NetworkDefinition => {
  const layers = net.layers.map((l): Layer => {
    const r = (role: WeightRole, w: Weights | undefined) => (w === undefined ? undefined : replace(l.name, role, w));
    switch (l.kind) {
      case 'fullyConnected':
      case 'convolution': {
        const bias = r('bias', l.bias);
        return { ...l, kernel: r('kernel', l.kernel)!, ...(bias ? { bias } : {}) };
      }
      case 'layerNorm': {
        const scale = r('scale', l.scale);
        const shift = r('shift', l.shift);
        return { ...l, ...(scale ? { scale } : {}), ...(shift ? { shift } : {}) };
      }
      case 'rmsNorm': {
        const scale = r('scale', l.scale);
        return { ...l, ...(scale ? { scale } : {}) };
      }
      case 'batchNorm':
        return { ...l, scale: r('scale', l.scale)!, shift: r('shift', l.shift)!, mean: r('mean', l.mean)!, variance: r('variance', l.variance)! };
      case 'constant':
        return { ...l, weights: r('constant', l.weights)! };
      default:
        return l;
    }
  });
  return { ...net, layers };
};

/** The same network with every float weight re-drawn from `seed`. */
export const reweight = (net: NetworkDefinition, seed: number): NetworkDefinition => {
  const rand = rng(seed);
  return withWeights(net, (_l, _r, w) => rerollWeight(rand, w));
};

/** Every float weight rounded to float16 or bfloat16 precision (kept as float32 values). */
export const roundWeights = (net: NetworkDefinition, precision: 'float16' | 'bfloat16'): NetworkDefinition =>
  withWeights(net, (_l, _r, w) =>
    w.dtype === 'int32' || w.dtype === 'int64' ? w : { dtype: 'float32', shape: w.shape, data: widen16(precision, narrow16(precision, floatValues(w))) },
  );

/** The refit updates that set every float weight of `net` (for refitting an engine of the same structure). */
export const allUpdates = (net: NetworkDefinition) => networkWeights(net).filter((w) => w.weights.dtype !== 'int32' && w.weights.dtype !== 'int64');

// ---- hand-computed examples: one or more tiny cases per layer kind -------------------------------------

export interface HandCase {
  readonly name: string;
  readonly net: NetworkDefinition;
  readonly inputs: Record<string, HostTensor>;
  /** Worked out by hand (comments show the arithmetic), output 'y'. */
  readonly expected: readonly number[];
}

const f32w = (shape: number[], values: number[]): Weights => ({ dtype: 'float32', shape, data: Float32Array.from(values) });
type LayerBody = Layer extends infer L ? (L extends Layer ? Omit<L, 'name' | 'output'> : never) : never;
/** One layer named L over float input x of `shape` (plus `extra` layers before it), output y. */
const one = (name: string, shape: number[], x: number[], layer: LayerBody, expected: number[], extra: Layer[] = []): HandCase => ({
  name,
  net: {
    inputs: [{ name: 'x', dtype: 'float32', shape }],
    layers: [...extra, { name: 'L', output: 'y', ...layer } as Layer],
    outputs: [{ tensor: 'y', name: 'y' }],
  },
  inputs: { x: Float32Array.from(x) },
  expected,
});
const bcast = (name: string, op: 'add' | 'sub' | 'mul' | 'div' | 'pow' | 'min' | 'max', expected: number[]) =>
  one(`elementwise ${op} broadcast`, [2, 2], [1, 2, 3, 4], { kind: 'elementwise', a: 'x', b: 'c', op }, expected, [
    { name: 'c', output: 'c', kind: 'constant', weights: f32w([2], [10, 20]) },
  ]);
const unaryCase = (op: UnaryOp, x: number[], expected: number[]) => one(`unary ${op}`, [x.length], x, { kind: 'unary', input: 'x', op }, expected);
const s125 = Math.sqrt(1.25);
const s12_5 = Math.sqrt(12.5);
const pool = (countIncludePad: boolean) => ({ kernel: [2, 2] as const, stride: [2, 2] as const, padding: [1, 1, 1, 1] as const, countIncludePad });
const table = f32w([3, 2], [0, 1, 10, 11, 20, 21]);
const gatherCase = (name: string, dtype: 'int32' | 'int64', ids: Int32Array | BigInt64Array, axis: number, expected: number[]): HandCase => ({
  name,
  net: {
    inputs: [{ name: 'ids', dtype, shape: [2] }],
    layers: [
      { name: 'emb', output: 'emb', kind: 'constant', weights: table },
      { name: 'g', output: 'y', kind: 'gather', data: 'emb', indices: 'ids', axis },
    ],
    outputs: [{ tensor: 'y', name: 'y' }],
  },
  inputs: { ids: ids },
  expected,
});
const mm = (name: string, ta: boolean, tb: boolean, a: number[], aShape: number[], b: number[], bShape: number[], expected: number[]): HandCase => ({
  name,
  net: {
    inputs: [
      { name: 'a', dtype: 'float32', shape: aShape },
      { name: 'b', dtype: 'float32', shape: bShape },
    ],
    layers: [{ name: 'mm', output: 'y', kind: 'matrixMultiply', a: 'a', transposeA: ta, b: 'b', transposeB: tb }],
    outputs: [{ tensor: 'y', name: 'y' }],
  },
  inputs: { a: Float32Array.from(a), b: Float32Array.from(b) },
  expected,
});

export const handCases: readonly HandCase[] = [
  // rows [1,1], [2,-1] times W^T, W = [[1,2],[3,4],[5,6]], plus b = [10,20,30]
  one('fully connected', [2, 2], [1, 1, 2, -1], { kind: 'fullyConnected', input: 'x', outFeatures: 3, kernel: f32w([3, 2], [1, 2, 3, 4, 5, 6]), bias: f32w([3], [10, 20, 30]) }, [13, 27, 41, 10, 22, 34]),
  // b^T = [[1,3],[2,4]]: [1,2]·b^T = [5,11], [0,1]·b^T = [2,4] (batch of a broadcast against 2-D b)
  mm('matrix multiply, B transposed, broadcast batch', false, true, [1, 2, 0, 1], [2, 1, 2], [1, 2, 3, 4], [2, 2], [5, 11, 2, 4]),
  // a^T b with a = b = [[1,2],[3,4]]: [[1,3],[2,4]]·[[1,2],[3,4]] = [[10,14],[14,20]]
  mm('matrix multiply, A transposed', true, false, [1, 2, 3, 4], [2, 2], [1, 2, 3, 4], [2, 2], [10, 14, 14, 20]),
  // x = 1..9 (3x3), pad top/left 1, 2x2 ones, stride 2: windows {1}, {2,3}, {4,7}, {5,6,8,9}, + 0.5
  one('convolution, padding and stride', [1, 1, 3, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], {
    kind: 'convolution',
    input: 'x',
    params: { outChannels: 1, kernel: [2, 2], stride: [2, 2], padding: [1, 1, 0, 0], dilation: [1, 1], groups: 1 },
    kernel: f32w([1, 1, 2, 2], [1, 1, 1, 1]),
    bias: f32w([1], [0.5]),
  }, [1.5, 5.5, 11.5, 28.5]),
  // two groups of one channel: 2*3, 7*5
  one('convolution, groups', [1, 2, 1, 1], [2, 7], {
    kind: 'convolution',
    input: 'x',
    params: { outChannels: 2, kernel: [1, 1], stride: [1, 1], padding: [0, 0, 0, 0], dilation: [1, 1], groups: 2 },
    kernel: f32w([2, 1, 1, 1], [3, 5]),
  }, [6, 35]),
  // taps 3 apart: 1*1 + 4*10, 2*1 + 5*10
  one('convolution, dilation', [1, 1, 1, 5], [1, 2, 3, 4, 5], {
    kind: 'convolution',
    input: 'x',
    params: { outChannels: 1, kernel: [1, 2], stride: [1, 1], padding: [0, 0, 0, 0], dilation: [1, 3], groups: 1 },
    kernel: f32w([1, 1, 1, 2], [1, 10]),
  }, [41, 52]),
  // x = [[1,2],[3,4]] op [10,20]
  bcast('add', 'add', [11, 22, 13, 24]),
  bcast('sub', 'sub', [-9, -18, -7, -16]),
  bcast('mul', 'mul', [10, 40, 30, 80]),
  bcast('div', 'div', [0.1, 0.1, 0.3, 0.2]),
  bcast('pow', 'pow', [1, 2 ** 20, 3 ** 10, 4 ** 20]),
  bcast('min', 'min', [1, 2, 3, 4]),
  bcast('max', 'max', [10, 20, 10, 20]),
  unaryCase('identity', [-2, 0, 1.5], [-2, 0, 1.5]),
  unaryCase('relu', [-2, 0, 1.5], [0, 0, 1.5]),
  unaryCase('neg', [-2, 0, 1.5], [2, 0, -1.5]),
  unaryCase('abs', [-2, 0, 1.5], [2, 0, 1.5]),
  unaryCase('sigmoid', [-2, 0, 1.5], [1 / (1 + Math.exp(2)), 0.5, 1 / (1 + Math.exp(-1.5))]),
  unaryCase('silu', [-2, 0, 1.5], [-2 / (1 + Math.exp(2)), 0, 1.5 / (1 + Math.exp(-1.5))]),
  unaryCase('tanh', [-2, 0, 1.5], [Math.tanh(-2), 0, Math.tanh(1.5)]),
  unaryCase('exp', [-2, 0, 1.5], [Math.exp(-2), 1, Math.exp(1.5)]),
  // x * clamp(x + 3, 0, 6) / 6: -2*1/6, 0, 1.5*4.5/6
  unaryCase('hardswish', [-2, 0, 1.5, -4, 4], [-2 / 6, 0, 1.125, 0, 4]),
  // clamp(x/6 + 0.5, 0, 1)
  unaryCase('hardsigmoid', [-2, 0, 1.5, -4, 4], [1 / 6, 0.5, 0.75, 0, 1]),
  // erf(-sqrt2) = -0.9544997361036416, erf(1.5/sqrt2) = 0.8663855974622838 (normal-table values)
  unaryCase('gelu_erf', [-2, 0, 1.5], [-2 * 0.5 * (1 - 0.9544997361036416), 0, 1.5 * 0.5 * (1 + 0.8663855974622838)]),
  unaryCase('gelu_tanh', [-2, 0, 1.5], [-2, 0, 1.5].map((v) => v * 0.5 * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v ** 3))))),
  unaryCase('erf', [-2, 0, 1.5], [-0.9953222650189527, 0, 0.9661051464753108]),
  unaryCase('sqrt', [4, 2.25], [2, 1.5]),
  unaryCase('reciprocal', [4, -0.5], [0.25, -2]),
  unaryCase('log', [1, Math.E], [0, 1]),
  // columns [0, ln3] -> [1/4, 3/4]; [5, 5] -> [1/2, 1/2]
  one('softmax, negative axis', [2, 2], [0, 5, Math.log(3), 5], { kind: 'softmax', input: 'x', axis: -2 }, [0.25, 0.5, 0.75, 0.5]),
  // mean 2.5, biased variance 1.25 over both trailing dims
  one('layer norm over two trailing dims', [1, 2, 2], [1, 2, 3, 4], { kind: 'layerNorm', input: 'x', axis: 1, epsilon: 0, scale: f32w([2, 2], [1, 2, 1, 1]), shift: f32w([2, 2], [0, 0, 0, 10]) }, [
    -1.5 / s125,
    (-0.5 / s125) * 2,
    0.5 / s125,
    1.5 / s125 + 10,
  ]),
  // mean of squares (9 + 16) / 2 = 12.5
  one('rms norm', [1, 2], [3, 4], { kind: 'rmsNorm', input: 'x', epsilon: 0, scale: f32w([2], [1, 3]) }, [3 / s12_5, (4 / s12_5) * 3]),
  // channel 0: (x - 1)/2*2 + 1; channel 1: (x + 1)/1*1 + 0
  one('batch norm', [1, 2, 1, 2], [3, 5, 0, 1], { kind: 'batchNorm', input: 'x', epsilon: 0, scale: f32w([2], [2, 1]), shift: f32w([2], [1, 0]), mean: f32w([2], [1, -1]), variance: f32w([2], [4, 1]) }, [3, 5, 1, 2]),
  one('reduce sum, negative axis, keepDims', [2, 3], [1, 2, 3, 4, 5, 6], { kind: 'reduce', input: 'x', op: 'sum', axes: [-1], keepDims: true }, [6, 15]),
  one('reduce mean over axis 0', [2, 3], [1, 2, 3, 4, 5, 6], { kind: 'reduce', input: 'x', op: 'mean', axes: [0], keepDims: false }, [2.5, 3.5, 4.5]),
  one('reduce max over all', [2, 3], [1, 2, 3, 4, 5, 6], { kind: 'reduce', input: 'x', op: 'max', axes: [0, 1], keepDims: false }, [6]),
  // 3x3, k2 s2 pad 1 all sides: floor((3+2-2)/2)+1 = 2; windows {1}, {2,3}, {4,7}, {5,6,8,9}
  one('average pooling, count_include_pad', [1, 1, 3, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], { kind: 'pooling', input: 'x', op: 'average', params: pool(true) }, [0.25, 1.25, 2.75, 7]),
  one('average pooling, padding excluded', [1, 1, 3, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], { kind: 'pooling', input: 'x', op: 'average', params: pool(false) }, [1, 2.5, 5.5, 7]),
  // all negative: padding must not win the max
  one('max pooling ignores padding', [1, 1, 3, 3], [-1, -2, -3, -4, -5, -6, -7, -8, -9], { kind: 'pooling', input: 'x', op: 'max', params: pool(false) }, [-1, -2, -4, -5]),
  one('global average pooling', [1, 2, 1, 2], [1, 2, 3, 5], { kind: 'pooling', input: 'x', op: 'global_average' }, [1.5, 4]),
  one('reshape with -1', [2, 3], [0, 1, 2, 3, 4, 5], { kind: 'reshape', input: 'x', shape: [3, -1] }, [0, 1, 2, 3, 4, 5]),
  one('transpose', [2, 3], [0, 1, 2, 3, 4, 5], { kind: 'transpose', input: 'x', perm: [1, 0] }, [0, 3, 1, 4, 2, 5]),
  one('concatenation, last axis', [2, 3], [0, 1, 2, 3, 4, 5], { kind: 'concatenation', inputs: ['x', 'x'], axis: -1 }, [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]),
  one('concatenation, first axis', [2, 3], [0, 1, 2, 3, 4, 5], { kind: 'concatenation', inputs: ['x', 'x'], axis: 0 }, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]),
  // row 1, columns 0 and 2
  one('slice with stride', [2, 3], [0, 1, 2, 3, 4, 5], { kind: 'slice', input: 'x', start: [1, 0], size: [1, 2], stride: [1, 2] }, [3, 5]),
  gatherCase('gather int32, negative index', 'int32', Int32Array.from([2, -3]), 0, [20, 21, 0, 1]),
  gatherCase('gather int64, negative index', 'int64', BigInt64Array.from([-1n, 1n]), 0, [20, 21, 10, 11]),
  // columns 1 and -2 (= 0) of [[0,1],[10,11],[20,21]]
  gatherCase('gather on the last axis', 'int32', Int32Array.from([1, -2]), -1, [1, 0, 11, 10, 21, 20]),
  one('constant through an add', [2], [1, 2], { kind: 'elementwise', a: 'x', b: 'k', op: 'add' }, [4, 6], [{ name: 'k', output: 'k', kind: 'constant', weights: f32w([2], [3, 4]) }]),
  // float16 1.5 (0x3e00) kernel, bfloat16 -2 (0xc000) bias: 4 * 1.5 - 2
  one('float16 kernel and bfloat16 bias', [1, 1], [4], {
    kind: 'fullyConnected',
    input: 'x',
    outFeatures: 1,
    kernel: { dtype: 'float16', shape: [1, 1], data: Uint16Array.from([0x3e00]) },
    bias: { dtype: 'bfloat16', shape: [1], data: Uint16Array.from([0xc000]) },
  }, [4]),
];

/** |a - b| <= atol + rtol |b| elementwise; returns the first offending index or -1. */
export const firstMismatch = (actual: ArrayLike<number>, expected: ArrayLike<number>, atol: number, rtol: number): number => {
  if (actual.length !== expected.length) return 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i];
    const b = expected[i];
    if (Number.isNaN(a) !== Number.isNaN(b)) return i;
    if (!(Math.abs(a - b) <= atol + rtol * Math.abs(b)) && !(a === b)) return i;
  }
  return -1;
};

/** Bytes of a typed array, for bit-for-bit comparison. */
export const bytesOf = (a: ArrayBufferView): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** Index of the first differing byte of two outputs maps (or a key that is missing), or undefined when identical. */
export const firstDifference = (a: Record<string, Float32Array>, b: Record<string, Float32Array>): string | undefined => {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
  for (const k of keys) {
    if (a[k] === undefined || b[k] === undefined) return `${k}: missing`;
    const x = bytesOf(a[k]);
    const y = bytesOf(b[k]);
    if (x.length !== y.length) return `${k}: length ${x.length} vs ${y.length}`;
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return `${k}[${i >> 2}]: ${a[k][i >> 2]} vs ${b[k][i >> 2]}`;
  }
  return undefined;
};
