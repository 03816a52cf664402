/**
 * The engine against the reference evaluator: hand-computed cases of every layer kind, random networks
 * in float32 and in 16-bit weight precision, and the handle lifecycle (dispose, refcounting, states).
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, NativeError } from '../ffi/index.js';
import { evaluate } from '../src/reference/index.js';
import { anyNetwork, families, firstMismatch, handCases, roundWeights, type NetCase } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);

const expectClose = (c: NetCase | { net: NetCase['net'] }, actual: Record<string, Float32Array>, expected: Record<string, Float32Array>, atol: number, rtol: number) => {
  expect(Object.keys(actual).sort()).toEqual(Object.keys(expected).sort());
  for (const [name, want] of Object.entries(expected)) {
    const got = actual[name];
    const i = firstMismatch(got, want, atol, rtol);
    if (i >= 0) {
      const family = 'family' in c ? c.family : '';
      expect.fail(`${family} output ${name}[${i}]: engine ${got[i]}, reference ${want[i]} (length ${got.length} vs ${want.length})\n${JSON.stringify(c.net, (_k, v) => (ArrayBuffer.isView(v) ? Array.from(v as Float32Array, Number) : v))}`);
    }
  }
};

describe('engine, hand-computed cases', () => {
  for (const c of handCases) {
    it(c.name, () => {
      using engine = buildEngine(c.net);
      const y = engine.run(c.inputs).y;
      expect(firstMismatch(y, c.expected, 1e-5, 1e-5), `got [${Array.from(y)}], expected [${c.expected}]`).toBe(-1);
    });
  }
  it('reports io and weights as declared', () => {
    const c = handCases[0];
    using engine = buildEngine(c.net);
    expect(engine.io()).toEqual([
      { name: 'x', isInput: true, dtype: 'float32', shape: [2, 2] },
      { name: 'y', isInput: false, dtype: 'float32', shape: [2, 3] },
    ]);
    expect(engine.weights()).toEqual([
      { layer: 'L', role: 'kernel', dtype: 'float32', shape: [3, 2], bytes: 24 },
      { layer: 'L', role: 'bias', dtype: 'float32', shape: [3], bytes: 12 },
    ]);
    const info = engine.info();
    expect(info).toMatchObject({ numLayers: 1, numWeights: 2, refittable: true, hasWeights: true, weightPrecision: 'float32' });
    expect(info.numKernels).toBeGreaterThanOrEqual(1);
    expect(typeof engine.describe()).toBe('object');
  });
  it('an out-of-range gather index fails at run time with a NativeError', () => {
    const c = handCases.find((h) => h.name === 'gather int32, negative index')!;
    using engine = buildEngine(c.net);
    expect(() => engine.run({ ids: Int32Array.from([3, 0]) })).toThrow(NativeError);
  });
});

describe('engine == reference evaluator on random networks', () => {
  test.prop([anyNetwork()], { numRuns: runs(200) })('float32 weights, float32 precision, all fusions', (c) => {
    using engine = buildEngine(c.net);
    expectClose(c, engine.run(c.inputs), evaluate(c.net, c.inputs), 1e-4, 1e-4);
  });
  test.prop([anyNetwork(), fc.constantFrom('float16', 'bfloat16' as const)], { numRuns: runs(80) })(
    '16-bit weight precision against the reference on rounded weights',
    (c, precision) => {
      using engine = buildEngine(c.net, { weightPrecision: precision });
      // Where the engine folds (batch norm into convolution) it rounds the folded weight: allow for it.
      const tol = precision === 'float16' ? 5e-3 : 3e-2;
      expectClose(c, engine.run(c.inputs), evaluate(roundWeights(c.net, precision), c.inputs), tol, tol);
    },
  );
  test.prop([anyNetwork({ weightDType: 'bfloat16' })], { numRuns: runs(40) })('bfloat16 weights widened exactly at float32 precision', (c) => {
    using engine = buildEngine(c.net);
    expectClose(c, engine.run(c.inputs), evaluate(c.net, c.inputs), 1e-4, 1e-4);
  });
  test.prop([families.conv()], { numRuns: runs(25) })('tactic search does not change results beyond float32 tolerance', (c) => {
    using engine = buildEngine(c.net, { tacticSearch: true });
    expectClose(c, engine.run(c.inputs), evaluate(c.net, c.inputs), 1e-4, 1e-4);
  });
});

describe('fusions', () => {
  const steps = (e: { describe(): unknown }) => (e.describe() as { steps: unknown[] }).steps;
  test.prop([anyNetwork()], { numRuns: runs(60) })('a refittable engine compiles to the same steps as a fixed one', (c) => {
    using refittable = buildEngine(c.net, { refittable: true });
    using fixed = buildEngine(c.net, { refittable: false });
    expect(refittable.info().numKernels).toBe(fixed.info().numKernels);
    expect(steps(refittable)).toEqual(steps(fixed));
  });
  it('conv + batch norm + relu and FC + bias + gelu each compile to one step', () => {
    const c = handCases.find((h) => h.name === 'convolution, padding and stride')!;
    const conv = c.net.layers[0];
    const net = {
      ...c.net,
      layers: [
        { ...conv, output: 'c' },
        { kind: 'batchNorm', name: 'bn', output: 'b', input: 'c', epsilon: 1e-5, ...Object.fromEntries(['scale', 'shift', 'mean', 'variance'].map((r) => [r, { dtype: 'float32', shape: [1], data: Float32Array.of(1) }])) },
        { kind: 'unary', name: 'relu', output: 'y', input: 'b', op: 'relu' },
      ],
    } as typeof c.net;
    using engine = buildEngine(net);
    expect(engine.info()).toMatchObject({ numLayers: 3, numKernels: 1 });
    const fcNet = { ...handCases[0].net, layers: [{ ...handCases[0].net.layers[0], output: 'h' }, { kind: 'unary', name: 'act', output: 'y', input: 'h', op: 'gelu_erf' }] } as typeof c.net;
    using fcEngine = buildEngine(fcNet);
    expect(fcEngine.info()).toMatchObject({ numLayers: 2, numKernels: 1 });
  });
});

describe('handles', () => {
  const net = handCases[0].net;
  const x = handCases[0].inputs;
  it('every method of a disposed engine throws a clear error', () => {
    const engine = buildEngine(net);
    engine[Symbol.dispose]();
    const calls: Array<() => unknown> = [
      () => engine.info(),
      () => engine.io(),
      () => engine.weights(),
      () => engine.describe(),
      () => engine.serialize(),
      () => engine.save('/tmp/never.engine'),
      () => engine.createContext(),
      () => engine.createRefitter(),
      () => engine.run(x),
      () => engine.refit([]),
    ];
    for (const c of calls) expect(c).toThrow('Engine used after dispose');
    expect(() => engine[Symbol.dispose]()).not.toThrow(); // disposing twice is harmless
  });
  it('contexts and refitters throw after dispose', () => {
    using engine = buildEngine(net);
    const context = engine.createContext();
    context[Symbol.dispose]();
    expect(() => context.run(x)).toThrow('ExecutionContext used after dispose');
    expect(() => context.execute()).toThrow('ExecutionContext used after dispose');
    expect(() => context.setTensor('x', new Float32Array(4))).toThrow('ExecutionContext used after dispose');
    const refitter = engine.createRefitter();
    refitter[Symbol.dispose]();
    expect(() => refitter.apply()).toThrow('Refitter used after dispose');
    expect(() => refitter.missing()).toThrow('Refitter used after dispose');
    expect(() => refitter.setCheckFinite(true)).toThrow('Refitter used after dispose');
    expect(() => refitter.setWeights('L', 'bias', { dtype: 'float32', shape: [3], data: new Float32Array(3) })).toThrow('Refitter used after dispose');
  });
  it('a context and a refitter outlive the engine handle they came from', () => {
    const engine = buildEngine(net);
    const before = engine.run(x).y;
    const context = engine.createContext();
    const refitter = engine.createRefitter();
    engine[Symbol.dispose]();
    expect(Array.from(context.run(x).y)).toEqual(Array.from(before));
    refitter.setWeights('L', 'bias', { dtype: 'float32', shape: [3], data: Float32Array.from([0, 0, 0]) });
    refitter.apply();
    // the bias moved by [-10, -20, -30]
    expect(Array.from(context.run(x).y)).toEqual(Array.from(before, (v, i) => v - [10, 20, 30][i % 3]));
    refitter[Symbol.dispose]();
    context[Symbol.dispose]();
  });
  it('a refitter on a non-refittable engine is refused with State', () => {
    using engine = buildEngine(net, { refittable: false });
    expect(engine.info().refittable).toBe(false);
    let error: unknown;
    try {
      engine.createRefitter();
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(NativeError);
    expect((error as NativeError).kind).toBe('State');
  });
  it('a wrong input size is refused, not read past', () => {
    using engine = buildEngine(net);
    using context = engine.createContext();
    expect(() => context.setTensor('x', new Float32Array(3))).toThrow(NativeError);
    expect(() => context.setTensor('nope', new Float32Array(4))).toThrow(NativeError);
  });
  it('many engines dropped without dispose are collected safely', () => {
    for (let i = 0; i < 50; i++) buildEngine(net).createContext();
    (globalThis as { gc?: () => void }).gc?.();
    using engine = buildEngine(net);
    expect(engine.run(x).y.length).toBe(6);
  });
});
