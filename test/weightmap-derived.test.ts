/**
 * Derived weights (issue 12 item 5): the `gather` and `expand` expressions, folding provenance through
 * Gather (constant indices) / Transpose / Unsqueeze / Expand / Slice chains, values derived by gathering
 * rows of a checkpoint tensor, and the T5 and RoBERTa fixtures end to end.
 */
import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { ExprCodec, exprSources, mapSources, printExpr, simplify, type Expr } from '../src/weightmap/expr.js';
import { evaluateExpr, type F32Tensor } from '../src/weightmap/evaluate.js';
import { evaluateExprNative } from '../ffi/transform.js';
import { nativeTransformsAvailable } from '../src/effect/capabilities.js';
import { deriveGatherByValue, settleDerived } from '../src/weightmap/derive.js';
import { memoryStore, readF32 } from '../src/weightmap/store.js';
import { buildWeightMap } from '../src/weightmap/map.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { shapeRules } from '../src/trace/shapes.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { directoryResolver } from '../src/trace/load.js';
import { partitionGraph } from '../src/partition/index.js';
import { tensorOf, type Graph, type Tensor } from '../src/trace/ir.js';
import { compile } from '../src/compile/index.js';
import { FallbackSession } from '../src/fallback/session.js';
import { refitModel } from '../src/effect/index.js';
import { coverage } from '../src/weightmap/map.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixturesDir } from './support/safetensors.js';

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);
const unwrap = <A>(e: E.Either<unknown, A>): A => {
  if (E.isLeft(e)) throw new Error(JSON.stringify(e.left));
  return e.right;
};
const src = (name: string): Expr => ({ op: 'source', name });
const lookupOf = (tensors: Record<string, F32Tensor>) => (name: string): F32Tensor | undefined => tensors[name];
/** Bits, so -0 and NaN payloads compare exactly. */
const bits = (a: Float32Array): number[] => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

/** Row-major multi-index of a flat offset. */
const unravel = (offset: number, shape: readonly number[]): number[] => {
  const out = new Array<number>(shape.length);
  for (let i = shape.length - 1; i >= 0; i--) {
    out[i] = offset % shape[i];
    offset = Math.floor(offset / shape[i]);
  }
  return out;
};
const ravel = (index: readonly number[], shape: readonly number[]): number => index.reduce((o, v, i) => o * shape[i] + v, 0);

/** Reference Gather, element by element from the ONNX definition. */
const referenceGather = (x: F32Tensor, axis: number, indicesShape: readonly number[], indices: readonly number[]): F32Tensor => {
  const a = axis < 0 ? axis + x.shape.length : axis;
  const shape = [...x.shape.slice(0, a), ...indicesShape, ...x.shape.slice(a + 1)];
  const data = new Float32Array(count(shape));
  for (let e = 0; e < data.length; e++) {
    const out = unravel(e, shape);
    const k = indices[ravel(out.slice(a, a + indicesShape.length), indicesShape)];
    const at = [...out.slice(0, a), k < 0 ? k + x.shape[a] : k, ...out.slice(a + indicesShape.length)];
    data[e] = x.data[ravel(at, x.shape)];
  }
  return { shape, data };
};

/** Reference Expand (numpy broadcasting), element by element. */
const referenceExpand = (x: F32Tensor, shape: readonly number[]): F32Tensor => {
  const data = new Float32Array(count(shape));
  const offset = shape.length - x.shape.length;
  for (let e = 0; e < data.length; e++) {
    const out = unravel(e, shape);
    data[e] = x.data[ravel(x.shape.map((d, i) => (d === 1 ? 0 : out[offset + i])), x.shape)];
  }
  return { shape, data };
};

const tensorArb = (shape: readonly number[]): fc.Arbitrary<F32Tensor> =>
  fc.array(fc.float({ noDefaultInfinity: true }), { minLength: count(shape), maxLength: count(shape) }).map((v) => ({ shape, data: Float32Array.from(v) }));

const gatherCase = fc
  .array(fc.integer({ min: 1, max: 4 }), { minLength: 1, maxLength: 4 })
  .chain((shape) => fc.record({
    x: tensorArb(shape),
    axis: fc.integer({ min: -shape.length, max: shape.length - 1 }),
    indicesShape: fc.array(fc.integer({ min: 0, max: 3 }), { maxLength: 2 }),
  }))
  .chain(({ x, axis, indicesShape }) => {
    const dim = x.shape[axis < 0 ? axis + x.shape.length : axis];
    return fc.record({
      x: fc.constant(x), axis: fc.constant(axis), indicesShape: fc.constant(indicesShape),
      indices: fc.array(fc.integer({ min: -dim, max: dim - 1 }), { minLength: count(indicesShape), maxLength: count(indicesShape) }),
    });
  });

const expandCase = fc
  .array(fc.integer({ min: 1, max: 3 }), { minLength: 0, maxLength: 3 })
  .chain((xShape) => fc.record({
    xShape: fc.constant(xShape),
    ones: fc.array(fc.boolean(), { minLength: xShape.length, maxLength: xShape.length }),
    grow: fc.array(fc.integer({ min: 1, max: 3 }), { minLength: xShape.length, maxLength: xShape.length }),
    lead: fc.array(fc.integer({ min: 0, max: 3 }), { maxLength: 2 }),
  }))
  .chain(({ xShape, ones, grow, lead }) => {
    // Dimensions marked `ones` are 1 in x and broadcast to `grow` in the target.
    const inShape = xShape.map((d, i) => (ones[i] ? 1 : d));
    const shape = [...lead, ...xShape.map((d, i) => (ones[i] ? grow[i] : d))];
    return fc.record({ x: tensorArb(inShape), shape: fc.constant(shape) });
  });

describe('the gather and expand expressions', () => {
  test.prop([gatherCase], { numRuns: 150 })('gather equals the ONNX definition, natively too', ({ x, axis, indicesShape, indices }) => {
    const e: Expr = { op: 'gather', axis, indicesShape, indices, x: src('x') };
    const got = unwrap(evaluateExpr(e, lookupOf({ x })));
    const want = referenceGather(x, axis, indicesShape, indices);
    expect(got.shape).toEqual(want.shape);
    expect(bits(got.data)).toEqual(bits(want.data));
    if (nativeTransformsAvailable()) {
      const native = unwrap(evaluateExprNative(e, lookupOf({ x })));
      expect(native.shape).toEqual(want.shape);
      expect(bits(native.data)).toEqual(bits(want.data));
    }
  });

  test.prop([expandCase], { numRuns: 150 })('expand equals numpy broadcasting, natively too', ({ x, shape }) => {
    const e: Expr = { op: 'expand', shape, x: src('x') };
    const got = unwrap(evaluateExpr(e, lookupOf({ x })));
    const want = referenceExpand(x, shape);
    expect(got.shape).toEqual(shape);
    expect(bits(got.data)).toEqual(bits(want.data));
    if (nativeTransformsAvailable()) expect(bits(unwrap(evaluateExprNative(e, lookupOf({ x }))).data)).toEqual(bits(want.data));
  });

  it('refuses what is not a gather or a broadcast, with the same Left natively', () => {
    const x: F32Tensor = { shape: [3, 2], data: Float32Array.from([1, 2, 3, 4, 5, 6]) };
    const bad: Expr[] = [
      { op: 'gather', axis: 0, indicesShape: [2], indices: [0, 3], x: src('x') },
      { op: 'gather', axis: 0, indicesShape: [2], indices: [-4, 0], x: src('x') },
      { op: 'gather', axis: 2, indicesShape: [1], indices: [0], x: src('x') },
      { op: 'gather', axis: 0, indicesShape: [3], indices: [0, 1], x: src('x') },
      { op: 'expand', shape: [3, 3], x: src('x') },
      { op: 'expand', shape: [2], x: src('x') },
    ];
    for (const e of bad) {
      const ts = evaluateExpr(e, lookupOf({ x }));
      expect(E.isLeft(ts) && ts.left._tag === 'InvalidExpression' && ts.left.op === e.op, printExpr(e)).toBe(true);
      if (nativeTransformsAvailable()) expect(evaluateExprNative(e, lookupOf({ x }))).toEqual(ts);
    }
    // Negative indices count from the end of the axis, as in ONNX.
    expect(Array.from(unwrap(evaluateExpr({ op: 'gather', axis: 0, indicesShape: [], indices: [-1], x: src('x') }, lookupOf({ x }))).data)).toEqual([5, 6]);
  });

  it('round-trips through the codec, names its sources, renames them and simplifies', () => {
    const e: Expr = {
      op: 'reshape', shape: [1, 2, 4, 4],
      x: { op: 'transpose', perm: [2, 0, 1], x: { op: 'gather', axis: 0, indicesShape: [4, 4], indices: Array.from({ length: 16 }, (_, i) => i % 3), x: src('rel.weight') } },
    };
    const ex: Expr = { op: 'expand', shape: [3, 2, 4], x: { op: 'expand', shape: [2, 4], x: src('b') } };
    for (const x of [e, ex]) expect(unwrap(ExprCodec.decode(JSON.parse(JSON.stringify(x))))).toEqual(x);
    expect(E.isLeft(ExprCodec.decode({ op: 'gather', axis: 0, indices: [1], x: src('a') }))).toBe(true); // no indicesShape
    expect(exprSources(e)).toEqual(['rel.weight']);
    expect(exprSources(mapSources(ex, (n) => `m.${n}`))).toEqual(['m.b']);
    expect(simplify(ex)).toEqual({ op: 'expand', shape: [3, 2, 4], x: src('b') });
    // Nested expands simplify to the outer one without changing the value.
    const b: F32Tensor = { shape: [4], data: Float32Array.from([1, 2, 3, 4]) };
    expect(unwrap(evaluateExpr(simplify(ex), lookupOf({ b })))).toEqual(unwrap(evaluateExpr(ex, lookupOf({ b }))));
    // Different indices print differently; equal expressions print alike.
    const other: Expr = { ...e, x: { ...(e as { x: Expr & { op: 'transpose' } }).x, x: { op: 'gather', axis: 0, indicesShape: [4, 4], indices: Array.from({ length: 16 }, (_, i) => (i + 1) % 3), x: src('rel.weight') } } } as Expr;
    expect(printExpr(e)).not.toEqual(printExpr(other));
    expect(printExpr(JSON.parse(JSON.stringify(e)) as Expr)).toEqual(printExpr(e));
  });
});

// ---- folding provenance -------------------------------------------------------------------------

interface Chain {
  readonly table: F32Tensor;
  readonly indicesShape: readonly number[];
  readonly indices: readonly number[];
  /** Indices as an initializer, or computed at build time (Add of two constants). */
  readonly computed: boolean;
  readonly batch: number;
  readonly slice: boolean;
}

/** T5-style: Gather(table, constant indices) -> Transpose -> Unsqueeze -> Expand (-> Slice) -> Add(x, .). */
const chainGraph = (c: Chain, table: F32Tensor): { graph: Graph; biasName: string } => {
  const b = new GraphBuilder('chain', 18);
  const [rows, heads] = table.shape;
  const [q, k] = c.indicesShape;
  const w = b.initializer('enc.rel.weight', tensorOf('float32', table.shape, table.data));
  let idx: string;
  if (c.computed) {
    const half = c.indices.map((v) => Math.floor(v / 2));
    const a = b.op('Constant', [], { value: tensorOf('int64', c.indicesShape, half) });
    idx = b.op('Add', [a, b.constant('rest', 'int64', c.indicesShape, c.indices.map((v, i) => v - half[i]))]);
  } else idx = b.constant('buckets', 'int64', c.indicesShape, c.indices);
  const gathered = b.op('Gather', [w, idx], { axis: 0 }); // [q, k, heads]
  const heads3 = b.op('Transpose', [gathered], { perm: [2, 0, 1] }); // [heads, q, k]
  const unsq = b.op('Unsqueeze', [heads3, b.constant('axes0', 'int64', [1], [0])]); // [1, heads, q, k]
  let bias = b.op('Expand', [unsq, b.constant('to', 'int64', [4], [c.batch, 1, 1, 1])]); // [batch, heads, q, k]
  let cols = k;
  if (c.slice) {
    // Every other key position, from 1: a step-2 slice on the last axis, plus a step-1 slice of heads.
    bias = b.op('Slice', [bias, b.constant('s', 'int64', [2], [1, 0]), b.constant('e', 'int64', [2], [1e9, heads]), b.constant('ax', 'int64', [2], [3, 1]), b.constant('st', 'int64', [2], [2, 1])]);
    cols = Math.floor(k / 2);
  }
  const x = b.input('x', 'float32', [c.batch, heads, q, cols]);
  b.output(b.op('Add', [x, bias]));
  void rows;
  return { graph: b.build(), biasName: bias };
};

const chainCase: fc.Arbitrary<Chain> = fc
  .record({ rows: fc.integer({ min: 2, max: 6 }), heads: fc.integer({ min: 2, max: 3 }), q: fc.integer({ min: 1, max: 4 }), k: fc.integer({ min: 2, max: 5 }), batch: fc.integer({ min: 1, max: 2 }), computed: fc.boolean(), slice: fc.boolean() })
  .chain((s) => fc.record({
    // Distinct values, so a value match could not explain the constant by accident.
    table: fc.constant({ shape: [s.rows, s.heads], data: Float32Array.from({ length: s.rows * s.heads }, (_, i) => Math.fround(0.37 * i - 1.3)) }),
    indicesShape: fc.constant([s.q, s.k]),
    indices: fc.array(fc.integer({ min: 0, max: s.rows - 1 }), { minLength: s.q * s.k, maxLength: s.q * s.k }),
    computed: fc.constant(s.computed),
    batch: fc.constant(s.batch),
    slice: fc.constant(s.slice),
  }));

const constantOf = (graph: Graph, name: string): Tensor => {
  const a = unwrap(analyzeGraph(graph));
  const c = a.constants.get(name);
  if (c === undefined) throw new Error(`${name} was not folded`);
  return c.tensor;
};

describe('folding provenance of gather chains', () => {
  test.prop([chainCase], { numRuns: 40 })('maps the folded bias to an expression that refits like a rebuild', (c) => {
    const { graph, biasName } = chainGraph(c, c.table);
    const analyzed = unwrap(analyzeGraph(graph));
    expect(analyzed.constants.has(biasName)).toBe(true);
    const segments = unwrap(partitionGraph(analyzed)).segments;
    const checkpoint = memoryStore([['enc.rel.weight', c.table]]);
    const map = unwrap(buildWeightMap({ analyzed, segments, checkpoint }));
    const targets = map.targets.filter((t) => t.status === 'mapped');
    expect(targets.length).toBe(1);
    const expr = targets[0].expr;
    expect(exprSources(expr)).toEqual(['enc.rel.weight']);
    expect(JSON.stringify(expr)).toContain('"op":"gather"');
    // The map is stored as JSON.
    const stored = unwrap(ExprCodec.decode(JSON.parse(JSON.stringify(expr))));
    // At build: the expression gives the folded value.
    const built = unwrap(evaluateExpr(stored, (n) => readF32(checkpoint, n)));
    expect(built.shape).toEqual(targets[0].shape);
    expect(bits(built.data)).toEqual(bits(constantOf(graph, biasName).data as Float32Array));
    // After a change of the table: the expression gives what folding the changed graph gives.
    const changed: F32Tensor = { shape: c.table.shape, data: c.table.data.map((v, i) => Math.fround(v * 3 + i)) };
    const refit = unwrap(evaluateExpr(stored, lookupOf({ 'enc.rel.weight': changed })));
    expect(bits(refit.data)).toEqual(bits(constantOf(chainGraph(c, changed).graph, biasName).data as Float32Array));
    if (nativeTransformsAvailable()) expect(bits(unwrap(evaluateExprNative(stored, lookupOf({ 'enc.rel.weight': changed }))).data)).toEqual(bits(refit.data));
  });

  it('records the resolved gather, transpose and slice parameters', () => {
    const b = new GraphBuilder('p', 18);
    const w = b.initializer('w', tensorOf('float32', [3, 4], Array.from({ length: 12 }, (_, i) => i)));
    const g = b.op('Gather', [w, b.constant('i', 'int64', [2, 2], [2, -1, 0, 1])], { axis: -1 });
    const t = b.op('Transpose', [g]);
    const s = b.op('Slice', [t, b.constant('s', 'int64', [1], [-1]), b.constant('e', 'int64', [1], [-100]), b.constant('a', 'int64', [1], [0]), b.constant('st', 'int64', [1], [-1])]);
    b.output(b.op('Add', [b.input('x', 'float32', [2, 2, 3]), s]));
    const a = unwrap(analyzeGraph(b.build()));
    const params = (name: string) => {
      const p = a.constants.get(name)!.provenance;
      return p.kind === 'op' ? p.params : {};
    };
    expect(params(g)).toMatchObject({ axis: 1, indicesShape: [2, 2], input1: [2, -1, 0, 1] });
    expect(params(t)).toMatchObject({ perm: [2, 1, 0] });
    expect(params(s)).toMatchObject({ inputShape: [2, 2, 3], sliceStart: [1, 0, 0], sliceStep: [-1, 1, 1], sliceCount: [2, 2, 3] });
    // A negative-step slice becomes a gather: the map evaluates to the folded value.
    const map = unwrap(buildWeightMap({ analyzed: a, segments: unwrap(partitionGraph(a)).segments, checkpoint: memoryStore([['w', { shape: [3, 4], data: Float32Array.from({ length: 12 }, (_, i) => i) }]]) }));
    const target = map.targets.find((x) => x.status === 'mapped')!;
    const v = unwrap(evaluateExpr(target.expr, (n) => (n === 'w' ? { shape: [3, 4], data: Float32Array.from({ length: 12 }, (_, i) => i) } : undefined)));
    expect(Array.from(v.data)).toEqual(Array.from(a.constants.get(s)!.tensor.data as Float32Array));
  });

  it('folds a float-to-int Cast of log(0) as ONNX Runtime does (T5 buckets: discarded by a Where)', () => {
    const b = new GraphBuilder('buckets', 18);
    const rel = b.constant('rel', 'float32', [4], [0, 1, 2, 8]);
    const big = b.op('Cast', [b.op('Log', [rel])], { to: 7 }); // int64; log(0) = -inf
    const small = b.op('Less', [b.op('Cast', [rel], { to: 7 }), b.constant('two', 'int64', [], [2])]);
    const buckets = b.op('Where', [small, b.op('Cast', [rel], { to: 7 }), b.op('Min', [b.op('Add', [big, b.constant('one', 'int64', [], [1])]), b.constant('max', 'int64', [], [3])])]);
    const w = b.initializer('w', tensorOf('float32', [4, 2], [1, 2, 3, 4, 5, 6, 7, 8]));
    const g = b.op('Gather', [w, buckets]);
    b.output(b.op('Add', [b.input('x', 'float32', [4, 2]), g]));
    const a = unwrap(analyzeGraph(b.build()));
    expect(Array.from(a.constants.get(big)!.tensor.data as BigInt64Array)).toEqual([-(2n ** 63n), 0n, 0n, 2n]);
    expect(Array.from(a.constants.get(buckets)!.tensor.data as BigInt64Array)).toEqual([0n, 1n, 1n, 3n]);
    expect(Array.from(a.constants.get(g)!.tensor.data as Float32Array)).toEqual([1, 2, 3, 4, 3, 4, 7, 8]);
    // Other integer targets out of range stay run time.
    const c = new GraphBuilder('c', 18);
    const i8 = c.op('Cast', [c.constant('v', 'float32', [1], [300])], { to: 3 });
    c.output(c.op('Add', [c.input('y', 'int8', [1]), i8]));
    expect(unwrap(analyzeGraph(c.build())).constants.has(i8)).toBe(false);
  });
});

// ---- values derived from checkpoint rows -----------------------------------------------------------

describe('float-to-int Cast folding of values out of range', () => {
  it.each([[7, 'int64'], [6, 'int32']] as const)('to %i (%s) folds to what ONNX Runtime computes', async (to, dtype) => {
    const values = [-Infinity, Infinity, NaN, 1e30, -1e30, -3.7, 2.9];
    const b = new GraphBuilder('cast', 18);
    const y = b.op('Cast', [b.constant('v', 'float32', [values.length], values)], { to });
    b.output(b.op('Add', [b.input('z', dtype, [values.length]), y]));
    const folded = unwrap(analyzeGraph(b.build())).constants.get(y)!.tensor;
    const node = { name: 'n', opType: 'Cast', domain: '', inputs: ['x'], outputs: ['y'], attributes: { to: { kind: 'int' as const, value: to } } };
    using session = await FallbackSession.create({
      name: 'cast', opset: 18, nodes: [node],
      inputs: [{ name: 'x', type: { dtype: 'float32', shape: [values.length] } }],
      outputs: [{ name: 'y', type: { dtype, shape: [values.length] } }],
      initializers: new Map(),
    });
    const ort = (await session.run(new Map([['x', tensorOf('float32', [values.length], values)]]))).get('y')!;
    expect(Array.from(folded.data as ArrayLike<number | bigint>, String)).toEqual(Array.from(ort.data as ArrayLike<number | bigint>, String));
  });
});

describe('values derived by gathering checkpoint rows', () => {
  test.prop([chainCase, fc.boolean()], { numRuns: 40 })('finds the gather of a folded table, stored either way round', (c, transposed) => {
    const { graph, biasName } = chainGraph({ ...c, slice: false }, c.table);
    const value = constantOf(graph, biasName);
    const v: F32Tensor = { shape: value.shape, data: value.data as Float32Array };
    const [r, h] = c.table.shape;
    const stored = transposed ? { shape: [h, r], data: Float32Array.from({ length: r * h }, (_, i) => c.table.data[(i % r) * h + Math.floor(i / r)]) } : c.table;
    const store = memoryStore([['other.weight', { shape: [2, 2], data: Float32Array.from([9, 8, 7, 6]) }], ['enc.rel.weight', stored]]);
    const found = deriveGatherByValue(v, store);
    expect(found.length).toBeGreaterThanOrEqual(1);
    for (const f of found) {
      expect(f.source).toBe('enc.rel.weight');
      expect(bits(unwrap(evaluateExpr(f.expr, (n) => readF32(store, n))).data)).toEqual(bits(v.data));
    }
  });

  it('refuses duplicate rows (the indices would be a guess) and non-rows', () => {
    const v: F32Tensor = { shape: [2, 2], data: Float32Array.from([1, 2, 3, 4]) };
    expect(deriveGatherByValue(v, memoryStore([['t', { shape: [3, 2], data: Float32Array.from([1, 2, 1, 2, 3, 4]) }]]))).toEqual([]);
    expect(deriveGatherByValue(v, memoryStore([['t', { shape: [2, 2], data: Float32Array.from([1, 2, 3, 5]) }]]))).toEqual([]);
    // Equal rows the value does not use do not matter.
    const ok = deriveGatherByValue(v, memoryStore([['t', { shape: [4, 2], data: Float32Array.from([5, 6, 3, 4, 5, 6, 1, 2]) }]]));
    expect(ok).toEqual([{ source: 't', expr: { op: 'gather', axis: 0, indicesShape: [2], indices: [3, 1], x: src('t') } }]);
    const two = [{ source: 'a.rel.weight', expr: src('a.rel.weight') }, { source: 'b.rel.weight', expr: src('b.rel.weight') }];
    expect(settleDerived(two, [])).toBeUndefined();
    expect(settleDerived(two, ['b'])?.source).toBe('b.rel.weight');
  });
});

// ---- fixtures -------------------------------------------------------------------------------------

const fixture = (model: string, file: string) => join(fixturesDir, model, file);

describe('T5 relative attention bias (fixtures)', () => {
  const dir = join(fixturesDir, 't5_encoder_tiny');
  const rel = 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight';

  it('the dynamo initializer unsqueeze_14 is a gather of the bias table with the legacy export\'s folded buckets', () => {
    const graphOf = (file: string) => unwrap(decodeOnnx(new Uint8Array(readFileSync(fixture('t5_encoder_tiny', file))), directoryResolver(dir)));
    const dynamo = graphOf('model_dynamo.onnx');
    const init = dynamo.initializers.find((i) => i.name === 'unsqueeze_14')!;
    const value: F32Tensor = { shape: init.tensor.shape, data: init.tensor.data as Float32Array };
    const weights = readSafetensors(join(dir, 'weights_v1.safetensors'));
    const store = memoryStore(Object.entries(weights).map(([n, t]) => [n, { shape: t.shape, data: t.data as Float32Array }] as const));
    const found = deriveGatherByValue(value, store);
    expect(found.map((f) => f.source)).toEqual([rel]);
    expect(bits(unwrap(evaluateExpr(found[0].expr, (n) => readF32(store, n))).data)).toEqual(bits(value.data));
    // The legacy export computes the buckets in the graph; folding them gives the same index table.
    const legacy = unwrap(analyzeGraph(graphOf('model_legacy.onnx')));
    const gatherNode = legacy.graph.nodes.find((n) => n.opType === 'Gather' && n.inputs[0] === rel)!;
    const buckets = legacy.constants.get(gatherNode.inputs[1])!.tensor;
    const e = found[0].expr as Extract<Expr, { op: 'transpose' }>;
    expect(e.x.op).toBe('gather');
    expect((e.x as Extract<Expr, { op: 'gather' }>).indices).toEqual(Array.from(buckets.data as BigInt64Array, Number));
  });

  it.each(['model_legacy.onnx', 'model_dynamo.onnx'])('%s: compiles with v1, matches PyTorch, refits to v2 and matches again', async (file) => {
    const expected = (name: string) => readSafetensors(join(dir, `${name}.safetensors`)).output;
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    using compiled = await compile(fixture('t5_encoder_tiny', file), join(dir, 'weights_v1.safetensors'));
    expect(coverage(compiled.weightMap).unmapped).toEqual([]);
    const derived = compiled.weightMap.targets.filter((t) => exprSources(t.expr).includes(rel));
    expect(derived.length).toBeGreaterThanOrEqual(1);
    for (const t of derived) expect(JSON.stringify(t.expr)).toContain('"op":"gather"');
    const output = compiled.outputs[0];
    expectClose((await compiled.run(inputs))[output], expected('expected_v1'));
    const toV2 = await refitModel(compiled, { checkpoint: join(dir, 'weights_v2.safetensors') });
    expect(toV2.report.changed).toBe(toV2.plan.totals.targets);
    expectClose((await compiled.run(inputs))[output], expected('expected_v2'));
  });
});

describe('CumSum (RoBERTa position ids)', () => {
  it('keeps the input shape and dtype, and runs in a fallback segment', () => {
    const b = new GraphBuilder('cumsum', 18);
    const ids = b.input('ids', 'int64', [2, 5]);
    const mask = b.op('Cast', [b.op('Equal', [ids, b.constant('pad', 'int64', [], [1])])], { to: 7 });
    const pos = b.op('CumSum', [mask, b.constant('axis', 'int64', [], [1])]);
    const table = b.initializer('pos.weight', tensorOf('float32', [8, 3], Array.from({ length: 24 }, (_, i) => i)));
    b.output(b.op('Add', [b.op('Gather', [table, pos]), b.input('h', 'float32', [2, 5, 3])]));
    const a = unwrap(analyzeGraph(b.build()));
    expect(a.types.get(pos)).toEqual({ dtype: 'int64', shape: [2, 5] });
    const parted = unwrap(partitionGraph(a));
    const where = parted.segments.find((s) => s.nodes.some((n) => n.opType === 'CumSum'))!;
    expect(where.kind).toBe('fallback');
    const rule = shapeRules['CumSum'];
    const bad = rule({ node: { name: 'n', opType: 'CumSum', domain: '', inputs: ['x', 'a'], outputs: ['y'], attributes: {} }, opset: 18, types: [{ dtype: 'float32', shape: [2] }, { dtype: 'int64', shape: [2] }], values: [undefined, undefined] });
    expect(E.isLeft(bad)).toBe(true);
  });

  it.each(['model_dynamo.onnx', 'model_legacy.onnx'])('roberta_tiny %s compiles, matches PyTorch, refits to v2 and matches again', async (file) => {
    const dir = join(fixturesDir, 'roberta_tiny');
    const expected = (name: string) => readSafetensors(join(dir, `${name}.safetensors`)).output;
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    using compiled = await compile(fixture('roberta_tiny', file), join(dir, 'weights_v1.safetensors'));
    expect(coverage(compiled.weightMap).unmapped).toEqual([]);
    expect(compiled.description.partition.segments.some((s) => s.kind === 'fallback' && s.opTypes.includes('CumSum'))).toBe(true);
    const output = compiled.outputs[0];
    expectClose((await compiled.run(inputs))[output], expected('expected_v1'));
    const toV2 = await refitModel(compiled, { checkpoint: join(dir, 'weights_v2.safetensors') });
    expect(toV2.report.changed).toBe(toV2.plan.totals.targets);
    expectClose((await compiled.run(inputs))[output], expected('expected_v2'));
  });
});
