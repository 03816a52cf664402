/**
 * Generators for the weight-map trust properties (test/weightmap-trust.test.ts): small PyTorch-like models
 * (Conv+BatchNorm stages, Linear layers, LayerNorms, a fused q/k/v projection, tied weights) with PyTorch
 * parameter names, checkpoints drawn with the degenerate values real checkpoints hold (zero biases, unit
 * norm scales, fresh BatchNorm statistics, repeated rows, a tied weight present under two names), and two
 * "exporters" that write ONNX the way torch.onnx's dynamo and legacy exporters do (see
 * ../shared/fixtures/README.md and the fixture graphs themselves):
 *
 *  - dynamo: checkpoint names kept for Gemm / Conv / LayerNorm parameters, Linear layers on 3-D inputs as
 *    MatMul with the weight stored transposed under `val_N`; BatchNorm folded into the convolution under the
 *    convolution's weight name (the fused node carries the BatchNorm's scope); zero biases dropped from the
 *    graph; equal-valued initializers shared (one initializer, named after the first parameter, read by
 *    every use); `pkg.torch.onnx.name_scopes` node metadata present or absent.
 *  - legacy: node names by module path (`/layers/layers.0/Gemm`, `/blocks.1/fc/Gemm`) or plain (`Gemm_3`);
 *    BatchNorm folded into `onnx::Conv_N` initializers (weight and bias); MatMul weights as transposed
 *    `onnx::MatMul_N`; equal values share one initializer (named after the first parameter) and every other
 *    use reads an `Identity` node whose output carries that use's own name (`layers.2.bias`, `onnx::Conv_9`).
 *
 * The exporter records, for every (node, input slot) that holds a parameter-derived value, which checkpoint
 * tensors it came from and whether the graph carries evidence naming it (its own initializer name, an
 * Identity alias, a module scope). The tests judge the weight map against that record, not against the
 * matcher. The ONNX bytes are encoded here (the IR has no node metadata): the repository's ONNX schema plus
 * NodeProto.metadata_props (field 9).
 */
import protobuf from 'protobufjs';
import { fc } from '@fast-check/vitest';
import { ModelProtoType, OnnxAttributeType } from '../../src/trace/onnx-schema.js';
import { writeSafetensors } from '../../src/safetensors/index.js';
import type { F32Tensor } from '../../src/weightmap/evaluate.js';

// ---- random numbers -------------------------------------------------------------------------------

/** mulberry32. */
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

// ---- model specs ----------------------------------------------------------------------------------

export type BiasInit = 'none' | 'zeros' | 'random';
export interface ConvSpec {
  readonly out: number;
  readonly bias: BiasInit;
  /** fresh: weight 1, bias 0, mean 0, var 1 (identical in every BatchNorm); copy: the previous BatchNorm's statistics. */
  readonly bn: 'fresh' | 'random' | 'copy';
}
export interface BlockSpec {
  readonly out: number;
  readonly bias: BiasInit;
  /** rows: random with row 1 repeating row 0; tie: the same tensor as the latest earlier Linear weight of this shape. */
  readonly weight: 'random' | 'rows' | 'tie';
  readonly norm: { readonly weight: 'ones' | 'random'; readonly bias: 'zeros' | 'random' } | undefined;
  readonly act: 'Relu' | 'Tanh';
  /** q/k/v Linear layers exported as one projection (concatenated weights); blocks style only. */
  readonly fused: boolean;
}
export interface ModelSpec {
  readonly input: 'image' | 'vector' | 'sequence';
  readonly inWidth: number;
  readonly convs: readonly ConvSpec[];
  readonly style: 'layers' | 'blocks';
  readonly body: readonly BlockSpec[];
  readonly head: { readonly out: number; readonly bias: BiasInit; readonly weight: 'random' | 'tie' } | undefined;
}
export interface ExporterSpec {
  readonly style: 'dynamo' | 'legacy';
  /** dynamo: name_scopes metadata; legacy: module-path node names. */
  readonly scopes: boolean;
  /** Share non-degenerate equal values (tied weights) too, not only fills. */
  readonly dedupTies: boolean;
}

const width = fc.constantFrom(2, 3, 4);
const bias = fc.constantFrom<BiasInit>('none', 'zeros', 'zeros', 'random');

export const modelArb: fc.Arbitrary<ModelSpec> = fc
  .record({
    input: fc.constantFrom('image' as const, 'vector' as const, 'sequence' as const),
    inWidth: width,
    convs: fc.array(fc.record({ out: width, bias, bn: fc.constantFrom('fresh' as const, 'fresh' as const, 'random' as const, 'copy' as const) }), { minLength: 1, maxLength: 3 }),
    style: fc.constantFrom('layers' as const, 'blocks' as const),
    body: fc.array(
      fc.record({
        out: width,
        bias,
        weight: fc.constantFrom('random' as const, 'rows' as const, 'tie' as const),
        norm: fc.option(fc.record({ weight: fc.constantFrom('ones' as const, 'random' as const), bias: fc.constantFrom('zeros' as const, 'random' as const) }), { nil: undefined }),
        act: fc.constantFrom('Relu' as const, 'Tanh' as const),
        fused: fc.boolean(),
      }),
      { minLength: 1, maxLength: 3 },
    ),
    head: fc.option(fc.record({ out: width, bias, weight: fc.constantFrom('random' as const, 'tie' as const) }), { nil: undefined }),
  })
  .map((m) => ({
    ...m,
    convs: m.input === 'image' ? m.convs : [],
    body: m.body.map((b) => ({ ...b, fused: b.fused && m.style === 'blocks' })),
  }));

export const exporterArb: fc.Arbitrary<ExporterSpec> = fc.record({
  style: fc.constantFrom('dynamo' as const, 'legacy' as const),
  scopes: fc.boolean(),
  dedupTies: fc.boolean(),
});

// ---- the module tree: parameters and the forward program ------------------------------------------

export type Init =
  | { readonly kind: 'random' | 'positive' | 'zeros' | 'ones' | 'rows' }
  | { readonly kind: 'copy'; readonly of: string; /** a tie stays equal in every checkpoint; a copy only in v1 */ readonly tie: boolean };

type Plain = 'random' | 'positive' | 'zeros' | 'ones' | 'rows';

export interface Param {
  readonly name: string;
  readonly shape: readonly number[];
  readonly init: Init;
}

/** Where a module sits, in both exporters' scope formats. */
interface Module {
  /** Dotted module path (`blocks.0.fc`). */
  readonly path: string;
  /** dynamo name_scopes: cumulative paths of the called modules (`['blocks.0', 'blocks.0.fc']`). */
  readonly scopes: readonly string[];
  /** legacy node-name components (`['layers', 'layers.0']`, `['blocks.0', 'fc']`). */
  readonly legacy: readonly string[];
}

export type Step =
  | { readonly op: 'convbn'; readonly conv: Module; readonly bn: Module; readonly relu: Module; readonly cin: number; readonly cout: number; readonly bias: boolean }
  | { readonly op: 'pool' }
  | { readonly op: 'linear'; readonly module: Module; readonly parts: readonly string[]; readonly in: number; readonly out: number; readonly bias: boolean }
  | { readonly op: 'norm'; readonly module: Module; readonly width: number }
  | { readonly op: 'act'; readonly kind: 'Relu' | 'Tanh'; readonly module: Module };

export interface Model {
  readonly spec: ModelSpec;
  readonly params: readonly Param[];
  /** int64 tensors a PyTorch state_dict also holds (num_batches_tracked). */
  readonly counters: readonly string[];
  readonly steps: readonly Step[];
  readonly inputShape: readonly number[];
  /** Tie classes: name -> the name it is tied to (first of the class). */
  readonly tieOf: ReadonlyMap<string, string>;
}

export const buildModel = (spec: ModelSpec): Model => {
  const params: Param[] = [];
  const counters: string[] = [];
  const steps: Step[] = [];
  const tieOf = new Map<string, string>();
  const p = (name: string, shape: number[], init: Init) => params.push({ name, shape, init });
  let w = spec.inWidth;
  const inputShape = spec.input === 'image' ? [2, spec.inWidth, 4, 4] : spec.input === 'sequence' ? [2, 3, spec.inWidth] : [2, spec.inWidth];
  let previousBn: { prefix: string; channels: number } | undefined;
  spec.convs.forEach((c, i) => {
    const s = i === 0 ? 'stem' : `block${i}`;
    const mod = (k: number): Module => ({ path: `${s}.${k}`, scopes: [s, `${s}.${k}`], legacy: [s, `${s}.${k}`] });
    p(`${s}.0.weight`, [c.out, w, 3, 3], { kind: 'random' });
    if (c.bias !== 'none') p(`${s}.0.bias`, [c.out], { kind: c.bias === 'zeros' ? 'zeros' : 'random' });
    const copy = c.bn === 'copy' && previousBn !== undefined && previousBn.channels === c.out ? previousBn.prefix : undefined;
    const bnInit = (field: string, fresh: Plain, random: Plain): Init =>
      copy !== undefined ? { kind: 'copy', of: `${copy}.${field}`, tie: false } : { kind: c.bn === 'fresh' ? fresh : random };
    p(`${s}.1.weight`, [c.out], bnInit('weight', 'ones', 'positive'));
    p(`${s}.1.bias`, [c.out], bnInit('bias', 'zeros', 'random'));
    p(`${s}.1.running_mean`, [c.out], bnInit('running_mean', 'zeros', 'random'));
    p(`${s}.1.running_var`, [c.out], bnInit('running_var', 'ones', 'positive'));
    counters.push(`${s}.1.num_batches_tracked`);
    previousBn = { prefix: `${s}.1`, channels: c.out };
    steps.push({ op: 'convbn', conv: mod(0), bn: mod(1), relu: mod(2), cin: w, cout: c.out, bias: c.bias !== 'none' });
    w = c.out;
  });
  if (spec.convs.length > 0) steps.push({ op: 'pool' });
  const linears: { name: string; shape: string }[] = [];
  const linearWeight = (name: string, out: number, inW: number, kind: 'random' | 'rows' | 'tie') => {
    const shape = `${out},${inW}`;
    const target = kind === 'tie' ? [...linears].reverse().find((l) => l.shape === shape) : undefined;
    if (target !== undefined) {
      p(name, [out, inW], { kind: 'copy', of: target.name, tie: true });
      tieOf.set(name, tieOf.get(target.name) ?? target.name);
    } else p(name, [out, inW], { kind: kind === 'rows' && out >= 2 ? 'rows' : 'random' });
    linears.push({ name, shape });
  };
  let k = 0; // index in the `layers` Sequential
  spec.body.forEach((b, i) => {
    const seq = (): Module => {
      const path = `layers.${k++}`;
      return { path, scopes: ['layers', path], legacy: ['layers', path] };
    };
    const inBlock = (leaf: string): Module => ({ path: `blocks.${i}.${leaf}`, scopes: [`blocks.${i}`, `blocks.${i}.${leaf}`], legacy: [`blocks.${i}`, leaf] });
    if (b.fused) {
      const mod = inBlock('attn');
      const parts = ['q', 'k', 'v'].map((x) => `blocks.${i}.attn.${x}`);
      for (const part of parts) {
        linearWeight(`${part}.weight`, b.out, w, b.weight === 'tie' ? 'random' : b.weight);
        if (b.bias !== 'none') p(`${part}.bias`, [b.out], { kind: b.bias === 'zeros' ? 'zeros' : 'random' });
      }
      steps.push({ op: 'linear', module: mod, parts, in: w, out: 3 * b.out, bias: b.bias !== 'none' });
      w = 3 * b.out;
    } else {
      const mod = spec.style === 'layers' ? seq() : inBlock('fc');
      linearWeight(`${mod.path}.weight`, b.out, w, b.weight);
      if (b.bias !== 'none') p(`${mod.path}.bias`, [b.out], { kind: b.bias === 'zeros' ? 'zeros' : 'random' });
      steps.push({ op: 'linear', module: mod, parts: [mod.path], in: w, out: b.out, bias: b.bias !== 'none' });
      w = b.out;
    }
    if (b.norm) {
      const mod = spec.style === 'layers' ? seq() : inBlock('norm');
      p(`${mod.path}.weight`, [w], { kind: b.norm.weight === 'ones' ? 'ones' : 'positive' });
      p(`${mod.path}.bias`, [w], { kind: b.norm.bias === 'zeros' ? 'zeros' : 'random' });
      steps.push({ op: 'norm', module: mod, width: w });
    }
    const act: Module = spec.style === 'layers' ? seq() : { path: `blocks.${i}`, scopes: [`blocks.${i}`], legacy: [`blocks.${i}`] };
    steps.push({ op: 'act', kind: b.act, module: act });
  });
  if (spec.head) {
    const mod: Module = { path: 'head', scopes: ['head'], legacy: ['head'] };
    linearWeight('head.weight', spec.head.out, w, spec.head.weight);
    if (spec.head.bias !== 'none') p('head.bias', [spec.head.out], { kind: spec.head.bias === 'zeros' ? 'zeros' : 'random' });
    steps.push({ op: 'linear', module: mod, parts: ['head'], in: w, out: spec.head.out, bias: spec.head.bias !== 'none' });
  }
  return { spec, params, counters, steps, inputShape, tieOf };
};

// ---- checkpoints ----------------------------------------------------------------------------------

export type Checkpoint = Map<string, F32Tensor>;

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/**
 * Draws a checkpoint. `fresh` draws every float tensor anew (v2: nothing keeps its v1 value, ties stay
 * tied, copies become independent); `keep` names tensors that keep their `base` value.
 */
export const drawCheckpoint = (model: Model, seed: number, options: { readonly v2Of?: Checkpoint; readonly keep?: ReadonlySet<string>; readonly untie?: string } = {}): Checkpoint => {
  const next = rng(seed);
  const ck: Checkpoint = new Map();
  const fill = (n: number, f: () => number) => Float32Array.from({ length: n }, () => Math.fround(f()));
  const signed = () => (next() * 2 - 1) * 0.8;
  const positive = () => 0.5 + next();
  for (const prm of model.params) {
    const n = count(prm.shape);
    const base = options.v2Of?.get(prm.name);
    if (base !== undefined && options.keep?.has(prm.name)) {
      ck.set(prm.name, base);
      continue;
    }
    let data: Float32Array;
    const init = prm.init;
    const isV2 = options.v2Of !== undefined;
    if (init.kind === 'copy' && (!isV2 || (init.tie && prm.name !== options.untie))) data = ck.get(init.of)!.data.slice();
    else if (isV2) {
      // Every float tensor changes; v1's degenerate ones become ordinary values of their kind.
      const kind = init.kind === 'copy' ? model.params.find((q) => q.name === init.of)!.init.kind : init.kind;
      data = kind === 'positive' || kind === 'ones' || prm.name.endsWith('running_var') ? fill(n, positive) : fill(n, signed);
      // A value that happens to equal its v1 value changes anyway.
      if (base !== undefined && data.every((v, i) => v === base.data[i])) data = data.map((v) => Math.fround(v + 0.25));
    } else {
      switch (init.kind) {
        case 'zeros': data = new Float32Array(n); break;
        case 'ones': data = new Float32Array(n).fill(1); break;
        case 'positive': data = fill(n, positive); break;
        case 'rows': {
          data = fill(n, signed);
          const row = n / prm.shape[0];
          data.copyWithin(row, 0, row);
          break;
        }
        default: data = fill(n, signed);
      }
    }
    ck.set(prm.name, { shape: [...prm.shape], data });
  }
  return ck;
};

export const writeCheckpointFile = (path: string, model: Model, ck: Checkpoint): Promise<unknown> =>
  writeSafetensors(path, [
    ...[...ck].map(([name, t]) => ({ name, dtype: 'F32' as const, shape: [...t.shape], data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) })),
    ...model.counters.map((name) => ({ name, dtype: 'I64' as const, shape: [] as number[], data: new Uint8Array(new BigInt64Array([7n]).buffer) })),
  ]);

/** ≤ 2 distinct values: a fill, a mask, a fresh initialization. */
export const degenerate = (data: Float32Array): boolean => new Set(data).size <= 2;

// ---- folds as PyTorch computes them (float32 at every step) ----------------------------------------

const EPS = 1e-5;
export const bnScaleOf = (ck: Checkpoint, bn: string): Float32Array => {
  const g = ck.get(`${bn}.weight`)!.data;
  const v = ck.get(`${bn}.running_var`)!.data;
  const eps = Math.fround(EPS);
  return Float32Array.from(g, (x, c) => Math.fround(x / Math.fround(Math.sqrt(Math.fround(v[c] + eps)))));
};
const foldWeight = (ck: Checkpoint, conv: string, bn: string): F32Tensor => {
  const w = ck.get(`${conv}.weight`)!;
  const s = bnScaleOf(ck, bn);
  const inner = w.data.length / s.length;
  return { shape: w.shape, data: Float32Array.from(w.data, (x, i) => Math.fround(x * s[Math.floor(i / inner)])) };
};
const foldBias = (ck: Checkpoint, conv: string, bn: string, channels: number): F32Tensor => {
  const s = bnScaleOf(ck, bn);
  const b = ck.get(`${conv}.bias`)?.data ?? new Float32Array(channels);
  const mean = ck.get(`${bn}.running_mean`)!.data;
  const beta = ck.get(`${bn}.bias`)!.data;
  return { shape: [channels], data: Float32Array.from(s, (sc, c) => Math.fround(Math.fround(Math.fround(b[c] - mean[c]) * sc) + beta[c])) };
};
const transpose2 = (t: F32Tensor): F32Tensor => {
  const [r, c] = t.shape;
  const out = new Float32Array(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = t.data[i * c + j];
  return { shape: [c, r], data: out };
};
const concat0 = (ts: readonly F32Tensor[]): F32Tensor => {
  const data = new Float32Array(ts.reduce((s, t) => s + t.data.length, 0));
  let o = 0;
  for (const t of ts) {
    data.set(t.data, o);
    o += t.data.length;
  }
  return { shape: [ts.reduce((s, t) => s + t.shape[0], 0), ...ts[0].shape.slice(1)], data };
};

// ---- the exporters --------------------------------------------------------------------------------

/** What one (node, input) of the graph holds, as the exporter knows it. */
export interface Leaf {
  /** `<node name>#<input index>`. */
  readonly key: string;
  /** Checkpoint tensors the value is a function of (its truth), in expression order. */
  readonly sources: readonly string[];
  readonly form: 'copy' | 'transpose' | 'concat' | 'bnFoldWeight' | 'bnFoldBias';
  /** Dropped from the graph (a zero bias): nothing in the graph holds it. */
  readonly dropped: boolean;
  /** The graph names this use's parameter: its own initializer name, an Identity alias, or its module scope. */
  readonly evidence: readonly ('name' | 'alias' | 'scope')[];
}

export interface Export {
  readonly bytes: Uint8Array;
  readonly leaves: ReadonlyMap<string, Leaf>;
  /** Node names of the graph, for resolving engine layer names. */
  readonly nodes: readonly string[];
  readonly output: string;
  readonly outputShape: readonly number[];
  /** Checkpoint tensors whose value only dropped graph values held (pinned unless restored). */
  readonly baked: readonly string[];
  readonly summary: string;
}

interface PendingUse {
  readonly key: string;
  readonly node: PendingNode;
  readonly slot: number;
  readonly value: F32Tensor;
  readonly sources: readonly string[];
  readonly form: Leaf['form'];
  /** The name an exporter gives this value when it is the one holding it. */
  readonly name: string;
  /** The module whose parameter it is, when it is one parameter as stored (copy or transpose). */
  readonly module: string | undefined;
  readonly scopeModule: string;
}
interface PendingNode {
  name: string;
  readonly opType: string;
  inputs: string[];
  readonly outputs: string[];
  readonly attributes: readonly unknown[];
  readonly scopes: readonly string[] | undefined;
}

const parentOf = (name: string): string => name.slice(0, Math.max(0, name.lastIndexOf('.')));

const scopeList = (items: readonly string[]): string => `[${['', ...items].map((s) => `'${s}'`).join(', ')}]`;

const attr = {
  int: (name: string, i: number) => ({ name, type: OnnxAttributeType.INT, i }),
  float: (name: string, f: number) => ({ name, type: OnnxAttributeType.FLOAT, f }),
  ints: (name: string, ints: number[]) => ({ name, type: OnnxAttributeType.INTS, ints }),
};

export const exportModel = (model: Model, ck: Checkpoint, ex: ExporterSpec): Export => {
  const dynamo = ex.style === 'dynamo';
  const nodes: PendingNode[] = [];
  const uses: PendingUse[] = [];
  const dropped: { key: string; sources: string[]; form: Leaf['form'] }[] = [];
  let serial = 0;
  let nodeSerial = 0;
  const nodeNames = new Set<string>();
  const synthetic = (op: string) => (dynamo ? `val_${serial++}` : `onnx::${op}_${serial++}`);
  const nodeName = (opType: string, m: Module | undefined): string => {
    const k = nodeSerial++;
    if (dynamo || !ex.scopes || m === undefined) return dynamo ? `node_${opType}_${k}` : `${opType}_${k}`;
    // Legacy: `/<module components>/<Op>`, `_1`, `_2` ... when a module has two nodes of one type.
    const base = `/${m.legacy.join('/')}/${opType}`;
    let name = base;
    for (let i = 1; nodeNames.has(name); i++) name = `${base}_${i}`;
    nodeNames.add(name);
    return name;
  };
  const dynamoOpName = { Gemm: 'linear', MatMul: 'linear', Add: 'linear', Conv: '_native_batch_norm_legit_no_training', Relu: 'relu', Tanh: 'tanh', LayerNormalization: 'layer_norm', GlobalAveragePool: 'mean', Flatten: 'flatten' } as Record<string, string>;
  const addNode = (opType: string, inputs: string[], attributes: unknown[], m: Module | undefined): PendingNode => {
    const name = nodeName(opType, m);
    const node: PendingNode = {
      name, opType, inputs, outputs: [dynamo ? `${name}_out` : `${name}_output_0`], attributes,
      scopes: dynamo && ex.scopes ? [...(m?.scopes ?? []), dynamoOpName[opType] ?? opType.toLowerCase()] : undefined,
    };
    nodes.push(node);
    return node;
  };
  const use = (node: PendingNode, slot: number, value: F32Tensor, sources: string[], form: Leaf['form'], name: string, module: string | undefined, scopeModule: string) => {
    const u: PendingUse = { key: `${node.name}#${slot}`, node, slot, value, sources, form, name, module, scopeModule };
    uses.push(u);
    node.inputs[slot] = `\u0000${uses.length - 1}`;
  };
  const isZero = (t: F32Tensor) => t.data.every((v) => v === 0);
  let x = 'x';
  const inputShape = model.inputShape;
  let outShape = [...inputShape];
  for (const step of model.steps) {
    switch (step.op) {
      case 'convbn': {
        const conv = step.conv.path;
        const bn = step.bn.path;
        const w = foldWeight(ck, conv, bn);
        const b = foldBias(ck, conv, bn, step.cout);
        // dynamo names the fused node after the BatchNorm; legacy after the convolution.
        const node = addNode('Conv', [x, '', ''], [attr.ints('pads', [1, 1, 1, 1]), attr.ints('kernel_shape', [3, 3])], dynamo ? step.bn : step.conv);
        const bSources = [...(step.bias ? [`${conv}.bias`] : []), `${bn}.weight`, `${bn}.bias`, `${bn}.running_mean`, `${bn}.running_var`];
        use(node, 1, w, [`${conv}.weight`, `${bn}.weight`, `${bn}.running_var`], 'bnFoldWeight', dynamo ? `${conv}.weight` : synthetic('Conv'), undefined, dynamo ? bn : conv);
        if (dynamo && isZero(b)) {
          node.inputs.length = 2;
          dropped.push({ key: `${node.name}#2`, sources: bSources, form: 'bnFoldBias' });
        } else use(node, 2, b, bSources, 'bnFoldBias', synthetic('Conv'), undefined, dynamo ? bn : conv);
        x = addNode('Relu', [node.outputs[0]], [], step.relu).outputs[0];
        outShape = [outShape[0], step.cout, 4, 4];
        break;
      }
      case 'pool': {
        const m: Module = { path: 'pool', scopes: ['pool'], legacy: ['pool'] };
        const gap = addNode('GlobalAveragePool', [x], [], m);
        x = addNode('Flatten', [gap.outputs[0]], [attr.int('axis', 1)], undefined).outputs[0];
        outShape = [outShape[0], outShape[1]];
        break;
      }
      case 'linear': {
        const m = step.module;
        const weights = step.parts.map((q) => ck.get(`${q}.weight`)!);
        const biases = step.bias ? step.parts.map((q) => ck.get(`${q}.bias`)!) : [];
        const w = concat0(weights);
        const b = step.bias ? concat0(biases) : undefined;
        const fused = step.parts.length > 1;
        const wSources = step.parts.map((q) => `${q}.weight`);
        const bSources = step.parts.map((q) => `${q}.bias`);
        const own = fused ? undefined : m.path;
        const drop = b !== undefined && dynamo && isZero(b);
        if (outShape.length === 2) {
          const node = addNode('Gemm', [x, '', ''], [attr.int('transB', 1)], m);
          use(node, 1, w, wSources, fused ? 'concat' : 'copy', fused ? synthetic('Gemm') : wSources[0], own, m.path);
          if (b === undefined) node.inputs.length = 2;
          else if (drop) {
            node.inputs.length = 2;
            dropped.push({ key: `${node.name}#2`, sources: bSources, form: fused ? 'concat' : 'copy' });
          } else use(node, 2, b, bSources, fused ? 'concat' : 'copy', fused ? synthetic('Gemm') : bSources[0], own, m.path);
          x = node.outputs[0];
        } else {
          const mm = addNode('MatMul', [x, ''], [], m);
          use(mm, 1, transpose2(w), wSources, fused ? 'concat' : 'transpose', synthetic('MatMul'), own, m.path);
          x = mm.outputs[0];
          if (b !== undefined && drop) dropped.push({ key: `${mm.name}#bias`, sources: bSources, form: fused ? 'concat' : 'copy' });
          else if (b !== undefined) {
            // dynamo: Add(matmul, bias); legacy: Add(bias, matmul).
            const add = addNode('Add', dynamo ? [x, ''] : ['', x], [], m);
            use(add, dynamo ? 1 : 0, b, bSources, fused ? 'concat' : 'copy', fused ? synthetic('Add') : bSources[0], own, m.path);
            x = add.outputs[0];
          }
        }
        outShape = [...outShape.slice(0, -1), step.out];
        break;
      }
      case 'norm': {
        const m = step.module;
        const node = addNode('LayerNormalization', [x, '', ''], [attr.int('axis', -1), attr.float('epsilon', 1e-5)], m);
        use(node, 1, ck.get(`${m.path}.weight`)!, [`${m.path}.weight`], 'copy', `${m.path}.weight`, m.path, m.path);
        use(node, 2, ck.get(`${m.path}.bias`)!, [`${m.path}.bias`], 'copy', `${m.path}.bias`, m.path, m.path);
        x = node.outputs[0];
        break;
      }
      case 'act':
        x = addNode(step.kind, [x], [], step.module).outputs[0];
        break;
    }
  }

  // Equal values share one initializer; legacy re-creates the other uses as Identity nodes.
  const groups = new Map<string, number[]>();
  uses.forEach((u, i) => {
    const key = `${u.value.shape.join('x')}:${Buffer.from(u.value.data.buffer, u.value.data.byteOffset, u.value.data.byteLength).toString('base64')}`;
    const shareable = ex.dedupTies || degenerate(u.value.data);
    const k = shareable ? key : `unique:${i}`;
    groups.set(k, [...(groups.get(k) ?? []), i]);
  });
  const initializers: { name: string; value: F32Tensor }[] = [];
  const identities: PendingNode[] = [];
  const taken = new Set<string>();
  const uniqueName = (n: string) => {
    let name = n;
    while (taken.has(name)) name = `${n}_${serial++}`;
    taken.add(name);
    return name;
  };
  const readers = new Map<number, { tensor: string; via: 'direct' | 'identity'; shared: boolean }>();
  for (const members of groups.values()) {
    const first = uses[members[0]];
    const initName = uniqueName(first.name);
    initializers.push({ name: initName, value: first.value });
    members.forEach((ui, j) => {
      if (dynamo || j === 0) readers.set(ui, { tensor: initName, via: 'direct', shared: dynamo ? members.length > 1 : false });
      else {
        const out = uniqueName(uses[ui].name);
        identities.push({ name: `Identity_${identities.length}`, opType: 'Identity', inputs: [initName], outputs: [out], attributes: [], scopes: undefined });
        readers.set(ui, { tensor: out, via: 'identity', shared: false });
      }
    });
  }
  const leaves = new Map<string, Leaf>();
  uses.forEach((u, i) => {
    const r = readers.get(i)!;
    u.node.inputs[u.slot] = r.tensor;
    const single = u.sources.length === 1 && (u.form === 'copy' || u.form === 'transpose');
    const evidence: Leaf['evidence'][number][] = [];
    if (single && r.via === 'direct' && !r.shared && r.tensor === u.sources[0]) evidence.push('name');
    if (single && r.via === 'identity' && r.tensor === u.sources[0]) evidence.push('alias');
    if (single && ex.scopes && u.module !== undefined && parentOf(u.sources[0]) === u.scopeModule) evidence.push('scope');
    leaves.set(u.key, { key: u.key, sources: u.sources, form: u.form, dropped: false, evidence });
  });
  for (const d of dropped) leaves.set(d.key, { key: d.key, sources: d.sources, form: d.form, dropped: true, evidence: [] });
  const kept = new Set(uses.flatMap((u) => u.sources));
  const baked = [...new Set(dropped.flatMap((d) => d.sources))].filter((s) => !kept.has(s)).sort();

  const allNodes = [...identities, ...nodes];
  const metadataRoot = protobuf.Root.fromJSON(withNodeMetadata(ModelProtoType.root.toJSON()));
  const Model = metadataRoot.lookupType('onnx.ModelProto');
  const valueInfo = (name: string, shape: readonly number[]) => ({ name, type: { tensorType: { elemType: 1, shape: { dim: shape.map((d) => ({ dimValue: d })) } } } });
  const message = {
    irVersion: 8,
    producerName: dynamo ? 'pytorch' : 'pytorch',
    opsetImport: [{ domain: '', version: 18 }],
    graph: {
      name: 'main_graph',
      node: allNodes.map((n) => ({
        name: n.name, opType: n.opType, domain: '', input: n.inputs, output: n.outputs, attribute: n.attributes,
        ...(n.scopes ? { metadataProps: [{ key: 'pkg.torch.onnx.name_scopes', value: scopeList(n.scopes) }] } : {}),
      })),
      initializer: initializers.map((i) => ({ name: i.name, dims: [...i.value.shape], dataType: 1, rawData: new Uint8Array(i.value.data.buffer.slice(i.value.data.byteOffset, i.value.data.byteOffset + i.value.data.byteLength)) })),
      input: [valueInfo('x', inputShape)],
      output: [valueInfo(x, outShape)],
    },
  };
  const bytes = Model.encode(Model.fromObject(message)).finish();
  const summary = [
    `${ex.style}${ex.scopes ? '+scopes' : ''}${ex.dedupTies ? '+dedupTies' : ''}`,
    `graph: ${allNodes.map((n) => `${n.name}:${n.opType}(${n.inputs.join(',')})${n.opType === 'Identity' ? `->${n.outputs[0]}` : ''}`).join(' ')}`,
    `initializers: ${initializers.map((i) => `${i.name}[${i.value.shape}]${degenerate(i.value.data) ? `=${[...new Set(i.value.data)].join('|')}` : ''}`).join(' ')}`,
    ...(dropped.length > 0 ? [`dropped: ${dropped.map((d) => `${d.key}=${d.sources.join('+')}`).join(' ')}`] : []),
  ].join('\n  ');
  return { bytes, leaves, nodes: allNodes.map((n) => n.name), output: x, outputShape: outShape, baked, summary };
};

/** The repository's ONNX schema with NodeProto.metadata_props (field 9), which it does not decode. */
const withNodeMetadata = (json: protobuf.INamespace): protobuf.INamespace => {
  const copy = JSON.parse(JSON.stringify(json)) as { nested: Record<string, { nested: Record<string, { fields: Record<string, unknown> }> }> };
  copy.nested['onnx'].nested['NodeProto'].fields['metadataProps'] = { rule: 'repeated', type: 'StringStringEntryProto', id: 9 };
  return copy as unknown as protobuf.INamespace;
};

// ---- a plain reference forward pass (float64) -------------------------------------------------------

export const referenceForward = (model: Model, ck: Checkpoint, input: Float32Array): { shape: number[]; data: Float64Array } => {
  let shape = [...model.inputShape];
  let x = Float64Array.from(input);
  const get = (n: string) => ck.get(n)!.data;
  for (const step of model.steps) {
    switch (step.op) {
      case 'convbn': {
        const [n, ci, h, wd] = shape;
        const co = step.cout;
        const w = get(`${step.conv.path}.weight`);
        const b = step.bias ? get(`${step.conv.path}.bias`) : new Float32Array(co);
        const bn = step.bn.path;
        const [g, be, mu, va] = ['weight', 'bias', 'running_mean', 'running_var'].map((f) => get(`${bn}.${f}`));
        const out = new Float64Array(n * co * h * wd);
        for (let s = 0; s < n; s++) for (let o = 0; o < co; o++) for (let i = 0; i < h; i++) for (let j = 0; j < wd; j++) {
          let acc = b[o];
          for (let c = 0; c < ci; c++) for (let di = 0; di < 3; di++) for (let dj = 0; dj < 3; dj++) {
            const ii = i + di - 1;
            const jj = j + dj - 1;
            if (ii < 0 || jj < 0 || ii >= h || jj >= wd) continue;
            acc += w[((o * ci + c) * 3 + di) * 3 + dj] * x[((s * ci + c) * h + ii) * wd + jj];
          }
          const y = ((acc - mu[o]) / Math.sqrt(va[o] + EPS)) * g[o] + be[o];
          out[((s * co + o) * h + i) * wd + j] = Math.max(0, y);
        }
        x = out;
        shape = [n, co, h, wd];
        break;
      }
      case 'pool': {
        const [n, c, h, wd] = shape;
        const out = new Float64Array(n * c);
        for (let s = 0; s < n; s++) for (let o = 0; o < c; o++) {
          let acc = 0;
          for (let i = 0; i < h * wd; i++) acc += x[(s * c + o) * h * wd + i];
          out[s * c + o] = acc / (h * wd);
        }
        x = out;
        shape = [n, c];
        break;
      }
      case 'linear': {
        const inW = shape[shape.length - 1];
        const rows = x.length / inW;
        const w = concat0(step.parts.map((q) => ck.get(`${q}.weight`)!)).data;
        const b = step.bias ? concat0(step.parts.map((q) => ck.get(`${q}.bias`)!)).data : new Float32Array(step.out);
        const out = new Float64Array(rows * step.out);
        for (let r = 0; r < rows; r++) for (let o = 0; o < step.out; o++) {
          let acc = b[o];
          for (let i = 0; i < inW; i++) acc += w[o * inW + i] * x[r * inW + i];
          out[r * step.out + o] = acc;
        }
        x = out;
        shape = [...shape.slice(0, -1), step.out];
        break;
      }
      case 'norm': {
        const d = step.width;
        const g = get(`${step.module.path}.weight`);
        const be = get(`${step.module.path}.bias`);
        for (let r = 0; r < x.length / d; r++) {
          const row = x.subarray(r * d, (r + 1) * d);
          const mean = row.reduce((a, v) => a + v, 0) / d;
          const variance = row.reduce((a, v) => a + (v - mean) ** 2, 0) / d;
          for (let i = 0; i < d; i++) row[i] = ((row[i] - mean) / Math.sqrt(variance + 1e-5)) * g[i] + be[i];
        }
        break;
      }
      case 'act':
        x = x.map(step.kind === 'Relu' ? (v) => Math.max(0, v) : Math.tanh);
        break;
    }
  }
  return { shape, data: x };
};

export const modelInput = (model: Model, seed: number): Float32Array => {
  const next = rng(seed ^ 0x5bd1e995);
  return Float32Array.from({ length: count(model.inputShape) }, () => Math.fround(next() * 2 - 1));
};

/** A one-line description of a model, for counterexamples. */
export const describeModel = (model: Model, ck: Checkpoint): string =>
  model.params
    .map((p) => {
      const d = ck.get(p.name)!.data;
      const v = degenerate(d) ? `=${[...new Set(d)].join('|')}` : p.init.kind === 'copy' ? `=${p.init.tie ? 'tie' : 'copy'}(${p.init.of})` : p.init.kind === 'rows' ? '(rows)' : '';
      return `${p.name}[${p.shape}]${v}`;
    })
    .join(' ');
