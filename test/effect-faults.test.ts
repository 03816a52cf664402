import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { compile, type CompileOptions } from '../src/compile/index.js';
import { executePlan, EffectError, type EffectCapabilities, type RefitterLike } from '../src/effect/index.js';
import type { RefitModel } from '../src/model/index.js';
import { planRefit } from '../src/plan/plan.js';
import type { TensorStore } from '../src/weightmap/store.js';
import { evaluateExpr } from '../src/weightmap/evaluate.js';
import { exprSources } from '../src/weightmap/expr.js';
import { memoryStore } from '../src/weightmap/store.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, outputBytes } from './e2e-support.js';

// Two models with several segments: GPT-2 (3 engines, 2 fallbacks) and the MLP with LayerNormalization
// forced onto ONNX Runtime (engine, fallback holding mapped weights, engine).
const models: Record<string, { onnx: string; options: CompileOptions }> = {
  gpt2: { onnx: fixture('gpt2_tiny', 'model_dynamo.onnx'), options: {} },
  mlp: { onnx: fixture('mlp', 'model_legacy.onnx'), options: { forcedFallback: ['LayerNormalization'] } },
};
const dirOf = (name: string) => join(models[name].onnx, '..');

const compiled = async (name: string): Promise<RefitModel> => compile(models[name].onnx, join(dirOf(name), 'weights_v1.safetensors'), models[name].options);

type Fault =
  | { kind: 'read'; at: number }
  | { kind: 'transform'; at: number }
  | { kind: 'engine'; step: 'setWeights' | 'validate' | 'apply'; stagingBytes?: number }
  | { kind: 'fallback' }
  | { kind: 'abort'; at: number }
  | { kind: 'verify' };

/** A store whose `at`-th read (bytes or toFloat32) throws. */
const failingStore = (store: TensorStore, at: number): TensorStore => {
  let reads = 0;
  const tick = (name: string) => {
    if (reads++ === at) throw new Error(`injected read failure on '${name}'`);
  };
  return {
    tensors: store.tensors,
    bytes: (name) => (tick(name), store.bytes(name)),
    toFloat32: (name) => (tick(name), store.toFloat32(name)),
  };
};

/** Refitters whose given step fails on the second engine segment in run order. */
const failingRefitters = (model: RefitModel, step: 'setWeights' | 'validate' | 'apply'): EffectCapabilities['refitter'] => {
  const second = model.engineStages()[1].record.index;
  return (segment, engine) => {
    const real = engine.createRefitter();
    if (segment !== second) return real;
    const boom = () => {
      throw new Error(`injected ${step} failure`);
    };
    const wrapped: RefitterLike = {
      setWeights: (l, r, w) => (step === 'setWeights' ? boom() : real.setWeights(l, r, w)),
      setCheckFinite: (c) => real.setCheckFinite(c),
      missing: () => real.missing(),
      validate: () => (step === 'validate' ? boom() : real.validate()),
      apply: () => (step === 'apply' ? boom() : real.apply()),
      [Symbol.dispose]: () => real[Symbol.dispose](),
    };
    return wrapped;
  };
};

const fault: fc.Arbitrary<Fault> = fc.oneof(
  fc.record({ kind: fc.constant('read' as const), at: fc.nat({ max: 40 }) }),
  fc.record({ kind: fc.constant('transform' as const), at: fc.nat({ max: 30 }) }),
  fc.record({ kind: fc.constant('engine' as const), step: fc.constantFrom('setWeights' as const, 'validate' as const, 'apply' as const), stagingBytes: fc.constantFrom(undefined, 1, 4096) }),
  fc.record({ kind: fc.constant('fallback' as const) }),
  fc.record({ kind: fc.constant('abort' as const), at: fc.nat({ max: 30 }) }),
  fc.record({ kind: fc.constant('verify' as const) }),
);

describe('the effect is all or nothing', () => {
  test.prop([fc.constantFrom('gpt2', 'mlp'), fault], { numRuns: 40 })('a failure at any step leaves every output bit-identical and the digests as they were', async (name, f) => {
    const dir = dirOf(name);
    using model = await compiled(name);
    using v2 = await openCheckpoint(join(dir, 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    const before = outputBytes(await model.run(inputs));
    const digests = { ...model.current };
    const plan = planRefit(model.weightMap, v2, { current: model.current });
    const aborter = new AbortController();
    let transforms = 0;
    const caps: Partial<EffectCapabilities> = {
      ...(f.kind === 'transform' ? { transform: (expr, lookup) => (transforms++ === f.at ? E.left({ _tag: 'InvalidExpression', op: 'injected', reason: 'injected transform failure' }) : evaluateExpr(expr, lookup)) } : {}),
      ...(f.kind === 'engine' ? { refitter: failingRefitters(model, f.step) } : {}),
      ...(f.kind === 'fallback' ? { openSession: async () => { throw new Error('injected session failure'); } } : {}),
      ...(f.kind === 'abort' ? { onProgress: (p) => { if (p.done >= f.at) aborter.abort(); } } : {}),
    };
    const store = f.kind === 'read' ? failingStore(v2, f.at) : v2;
    const run = executePlan(model, plan, store, {
      signal: aborter.signal,
      ...(f.kind === 'engine' && f.stagingBytes !== undefined ? { stagingBytes: f.stagingBytes } : {}),
      ...(f.kind === 'verify' ? { verify: { inputs, check: () => 'injected rejection' } } : {}),
    }, caps);
    // A fault placed past the last step of this model's refit does not fire: then the refit succeeds.
    const fires = await run.then(() => false, (e) => {
      expect(e).toBeInstanceOf(EffectError);
      expect((e as EffectError)._tag).not.toBe('RollbackFailed');
      return true;
    });
    if (fires) {
      expect(outputBytes(await model.run(inputs))).toEqual(before);
      expect(model.current).toEqual(digests);
    } else {
      expect(['read', 'transform', 'abort', 'fallback']).toContain(f.kind);
    }
    // Whatever happened, a clean refit afterwards gives PyTorch's v2 outputs.
    await executePlan(model, planRefit(model.weightMap, v2, { current: model.current }), v2);
    expectClose((await model.run(inputs)).output, readSafetensors(join(dir, 'expected_v2.safetensors')).output);
  });

  it('each fault kind fires on GPT-2 and on the MLP with a fallback, with its tag', async () => {
    for (const name of ['gpt2', 'mlp']) {
      const dir = dirOf(name);
      using model = await compiled(name);
      using v2 = await openCheckpoint(join(dir, 'weights_v2.safetensors'));
      const plan = planRefit(model.weightMap, v2, { current: model.current });
      const tagOf = (p: Promise<unknown>) => p.then(() => 'ok', (e: EffectError) => e._tag);
      expect(await tagOf(executePlan(model, plan, failingStore(v2, 0)))).toBe('ReadFailed');
      expect(await tagOf(executePlan(model, plan, v2, {}, { transform: () => E.left({ _tag: 'InvalidExpression', op: 'x', reason: 'injected' }) }))).toBe('TransformFailed');
      expect(await tagOf(executePlan(model, plan, v2, { stagingBytes: 1 }, { refitter: failingRefitters(model, 'apply') }))).toBe('EngineRefitFailed');
      const aborted = new AbortController();
      aborted.abort();
      expect(await tagOf(executePlan(model, plan, v2, { signal: aborted.signal }))).toBe('Aborted');
      if (name === 'mlp') expect(await tagOf(executePlan(model, plan, v2, {}, { openSession: async () => { throw new Error('injected'); } }))).toBe('FallbackRefitFailed');
      // A plan with errors is refused before anything runs.
      expect(await tagOf(executePlan(model, { ...plan, problems: [{ _tag: 'NonFinite', severity: 'error', source: 'x', count: 1 }] }, v2))).toBe('PlanHasErrors');
      // A stale plan (made before another refit) is refused.
      await executePlan(model, plan, v2);
      using v1 = await openCheckpoint(join(dir, 'weights_v1.safetensors'));
      const unchangedPlan = planRefit(model.weightMap, v1, { current: model.current });
      await executePlan(model, unchangedPlan, v1);
      expect(await tagOf(executePlan(model, { ...plan, entries: plan.entries.map((e) => ({ ...e, changed: false })) }, v2))).toBe('PlanMismatch');
    }
  });

  it('non-finite values are refused while staging, on engines and fallbacks, when the plan did not scan for them', async () => {
    using model = await compiled('mlp');
    using v2 = await openCheckpoint(join(dirOf('mlp'), 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dirOf('mlp'), 'inputs.safetensors'));
    const before = outputBytes(await model.run(inputs));
    const sourceOf = (kind: 'engine' | 'fallback') => exprSources(model.weightMap.targets.find((t) => t.kind === kind && t.status === 'mapped')!.expr)[0];
    for (const [kind, tag] of [['engine', 'NonFiniteValues'], ['fallback', 'NonFiniteValues']] as const) {
      const poisoned = sourceOf(kind);
      const store = memoryStore([...v2.tensors.keys()].filter((n) => v2.tensors.get(n)!.dtype === 'F32').map((n) => [n, { shape: v2.tensors.get(n)!.shape, data: Float32Array.from(v2.toFloat32(n), (x, i) => (n === poisoned && i === 1 ? NaN : x)) }] as const));
      const plan = planRefit(model.weightMap, store, { current: model.current, checkFinite: false });
      expect(plan.totals.errors).toBe(0);
      const e = await executePlan(model, plan, store).then(() => undefined, (x: EffectError) => x);
      expect(e?._tag).toBe(tag);
      expect(outputBytes(await model.run(inputs))).toEqual(before);
    }
  });

  it('the MLP refits its fallback segment: v2 matches PyTorch, and the fallback was refitted', async () => {
    using model = await compiled('mlp');
    using v2 = await openCheckpoint(join(dirOf('mlp'), 'weights_v2.safetensors'));
    const events: number[] = [];
    const report = await executePlan(model, planRefit(model.weightMap, v2, { current: model.current }), v2, { stagingBytes: 1 }, { onProgress: (p) => events.push(p.done) });
    expect(report.fallbacks).toEqual([1]);
    expect(report.engines).toEqual([0, 2]);
    expect(report.peakStagedBytes).toBeLessThanOrEqual(Math.max(...planRefit(model.weightMap, v2).entries.map((e) => e.bytes)));
    expect(events.at(-1)).toBe(report.changed);
    expectClose((await model.run(readSafetensors(join(dirOf('mlp'), 'inputs.safetensors')))).output, readSafetensors(join(dirOf('mlp'), 'expected_v2.safetensors')).output);
  });
});
