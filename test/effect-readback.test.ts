import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { compile, type CompileOptions } from '../src/compile/index.js';
import { EffectError, executePlan, nativeReadback, type EffectCapabilities, type ReadbackCapability, type RefitterLike } from '../src/effect/index.js';
import { Engine } from '../ffi/engine.js';
import type { RefitModel } from '../src/model/index.js';
import { planRefit } from '../src/plan/plan.js';
import type { WeightRole } from '../src/network/types.js';
import { evaluateExpr } from '../src/weightmap/evaluate.js';
import { valueDigest } from '../src/weightmap/digest.js';
import type { TensorStore } from '../src/weightmap/store.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, outputBytes } from './e2e-support.js';

const key = (layer: string, role: string) => `${layer}\u0000${role}`;

/** The digest of every mapped engine target's value over a checkpoint, by segment and weight. */
const digestsOver = (model: RefitModel, store: TensorStore): Map<number, Map<string, string>> => {
  const out = new Map<number, Map<string, string>>();
  for (const t of model.weightMap.targets) {
    if (t.kind !== 'engine' || t.status !== 'mapped') continue;
    const v = evaluateExpr(t.expr, (n) => (store.tensors.has(n) ? { shape: store.tensors.get(n)!.shape, data: store.toFloat32(n) } : undefined));
    if (v._tag === 'Left') throw new Error(JSON.stringify(v.left));
    if (!out.has(t.segment)) out.set(t.segment, new Map());
    out.get(t.segment)!.set(key(t.layer!, t.role!), valueDigest(v.right.data));
  }
  return out;
};

type Tamper = { readonly layer: string; readonly role: string; readonly mode: 'drop' | 'corrupt' } | undefined;

/**
 * Engines as a read-back sees them, over the real refitters: each engine reports the digests of the values it
 * was built with, updated by every apply with the values the refitter really received. `tamper` makes the
 * refitter silently drop one weight (the engine keeps its old value) or corrupt it (one value changed).
 */
const readbackDouble = (model: RefitModel, built: TensorStore, tamper: Tamper): { caps: Partial<EffectCapabilities>; applied: () => number } => {
  const held = digestsOver(model, built);
  let applied = 0;
  const refitter = (segment: number, engine: Engine): RefitterLike => {
    const real = engine.createRefitter();
    const pending = new Map<string, string>();
    return {
      setWeights: (layer: string, role: WeightRole, w) => {
        if (tamper !== undefined && tamper.layer === layer && tamper.role === role) {
          if (tamper.mode === 'drop') return;
          const corrupted = Float32Array.from(w.data as Float32Array);
          corrupted[0] += 1;
          w = { ...w, data: corrupted };
        }
        real.setWeights(layer, role, w);
        pending.set(key(layer, role), valueDigest(w.data));
      },
      setCheckFinite: (c) => real.setCheckFinite(c),
      missing: () => real.missing(),
      validate: () => real.validate(),
      apply: () => {
        real.apply();
        applied++;
        for (const [k, d] of pending) held.get(segment)!.set(k, d);
        pending.clear();
      },
      [Symbol.dispose]: () => real[Symbol.dispose](),
    };
  };
  const readback: ReadbackCapability = {
    engineDigests: (segment) => held.get(segment),
    expectedDigest: (_segment, _engine, value) => (value.kind === 'float' ? valueDigest(value.data) : valueDigest(value.weights.values)),
  };
  return { caps: { refitter, readback }, applied: () => applied };
};

const models: Record<'gpt2' | 'mlp', { readonly onnx: string; readonly options: CompileOptions }> = {
  gpt2: { onnx: fixture('gpt2_tiny', 'model_dynamo.onnx'), options: {} },
  mlp: { onnx: fixture('mlp', 'model_legacy.onnx'), options: { forcedFallback: ['LayerNormalization'] } },
};
const dirOf = (name: keyof typeof models) => join(models[name].onnx, '..');
const compiled = (name: keyof typeof models) => compile(models[name].onnx, join(dirOf(name), 'weights_v1.safetensors'), models[name].options);

describe('read-back verification in the effect', () => {
  for (const name of ['gpt2', 'mlp'] as const) {
    for (const mode of ['drop', 'corrupt'] as const) {
      it(`${name}: a refitter that silently ${mode}s one weight fails the refit with ReadbackMismatch, leaving outputs and digests as they were`, async () => {
        using model = await compiled(name);
        using v1 = await openCheckpoint(join(dirOf(name), 'weights_v1.safetensors'));
        using v2 = await openCheckpoint(join(dirOf(name), 'weights_v2.safetensors'));
        const inputs = readSafetensors(join(dirOf(name), 'inputs.safetensors'));
        const before = outputBytes(await model.run(inputs));
        const digests = { ...model.current };
        const plan = planRefit(model.weightMap, v2, { current: model.current });
        // The victim: a changed weight of the first engine in run order (its undo is the hardest: applied first).
        const first = model.engineStages()[0].record.index;
        const victim = plan.entries.find((e) => e.changed && e.kind === 'engine' && e.segment === first)!;
        for (const stagingBytes of [undefined, 1]) {
          const double = readbackDouble(model, v1, { layer: victim.layer!, role: victim.role!, mode });
          const error = await executePlan(model, plan, v2, stagingBytes === undefined ? {} : { stagingBytes }, double.caps).then(() => undefined, (e: unknown) => e);
          expect(error).toBeInstanceOf(EffectError);
          const detail = (error as EffectError).detail;
          expect(detail._tag).toBe('ReadbackMismatch');
          if (detail._tag !== 'ReadbackMismatch') return;
          expect(detail.target).toBe(victim.target);
          expect(detail.segment).toBe(first);
          expect(detail.found).not.toBe(detail.expected);
          // The value found is the one the engine kept: its v1 value when the weight was dropped.
          if (mode === 'drop') expect(detail.found).toBe(digestsOver(model, v1).get(first)!.get(key(victim.layer!, victim.role!)));
          expect(detail.expected).toBe(digestsOver(model, v2).get(first)!.get(key(victim.layer!, victim.role!)));
          expect((error as Error).message).toContain(victim.target);
          expect(outputBytes(await model.run(inputs))).toEqual(before);
          expect(model.current).toEqual(digests);
          // The tampered engine was applied (and undone): the check ran after the applies.
          expect(double.applied()).toBeGreaterThan(0);
        }
        // Read-back off: the same tampering goes unnoticed (the check is what catches it).
        const unchecked = await executePlan(model, plan, v2, { readback: false }, readbackDouble(model, v1, { layer: victim.layer!, role: victim.role!, mode }).caps);
        expect(unchecked.readback).toEqual({ verified: false, targets: 0, unverifiable: 0, milliseconds: 0 });
        expect(outputBytes(await model.run(inputs))).not.toEqual(before);
      });
    }

    it(`${name}: with honest engines the refit succeeds, every staged weight is compared, and the cost is reported`, async () => {
      using model = await compiled(name);
      using v1 = await openCheckpoint(join(dirOf(name), 'weights_v1.safetensors'));
      using v2 = await openCheckpoint(join(dirOf(name), 'weights_v2.safetensors'));
      const plan = planRefit(model.weightMap, v2, { current: model.current });
      let clock = 0;
      const report = await executePlan(model, plan, v2, { stagingBytes: 1 }, { ...readbackDouble(model, v1, undefined).caps, clock: () => (clock += 1) });
      const engineChanged = plan.entries.filter((e) => e.changed && e.kind === 'engine').length;
      expect(report.readback.verified).toBe(true);
      expect(report.readback.targets).toBe(engineChanged);
      // One tick per expected digest and one for the comparison, with this clock.
      expect(report.readback.milliseconds).toBe(engineChanged + 1);
      expectClose((await model.run(readSafetensors(join(dirOf(name), 'inputs.safetensors')))).output, readSafetensors(join(dirOf(name), 'expected_v2.safetensors')).output);
    });
  }

  it('an engine that cannot report fails the refit (ReadbackMismatch naming why) and changes nothing; no capability means not verified', async () => {
    using model = await compiled('gpt2');
    using v2 = await openCheckpoint(join(dirOf('gpt2'), 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dirOf('gpt2'), 'inputs.safetensors'));
    const before = outputBytes(await model.run(inputs));
    const plan = planRefit(model.weightMap, v2, { current: model.current });
    const mute: ReadbackCapability = {
      engineDigests: () => {
        throw new Error('digests are not supported by this engine');
      },
      expectedDigest: (_s, _e, v) => (v.kind === 'float' ? valueDigest(v.data) : ''),
    };
    const error = await executePlan(model, plan, v2, {}, { readback: mute }).then(() => undefined, (e: EffectError) => e);
    expect(error?.detail._tag).toBe('ReadbackMismatch');
    expect(error?.message).toMatch(/digests are not supported by this engine/);
    expect(outputBytes(await model.run(inputs))).toEqual(before);
    // The native capability on an engine without weightDigests: the same refusal.
    if (typeof (Engine.prototype as { weightDigests?: unknown }).weightDigests !== 'function') {
      const native = await executePlan(model, plan, v2, {}, { readback: nativeReadback(() => 'c1:0') }).then(() => undefined, (e: EffectError) => e);
      expect(native?.detail._tag).toBe('ReadbackMismatch');
      expect(outputBytes(await model.run(inputs))).toEqual(before);
    }
    const unverified = await executePlan(model, plan, v2, {}, { readback: undefined });
    expect(unverified.readback.verified).toBe(false);
  });
});

// The native engines' read-back (Engine.weightDigests), the default capability: float32 engines hold the
// staged float32 values as they are, so each staged weight is compared with its value's digest.
const nativeDigests = typeof (Engine.prototype as { weightDigests?: unknown }).weightDigests === 'function';
describe.skipIf(!nativeDigests)('read-back on the native engines (default capabilities)', () => {
  it.each(['gpt2', 'mlp'] as const)('%s: refits verify every staged weight against the engines; a corrupted value is caught and undone', async (name) => {
    using model = await compiled(name);
    using v1 = await openCheckpoint(join(dirOf(name), 'weights_v1.safetensors'));
    using v2 = await openCheckpoint(join(dirOf(name), 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dirOf(name), 'inputs.safetensors'));
    const plan = planRefit(model.weightMap, v2, { current: model.current });
    const engineChanged = plan.entries.filter((e) => e.changed && e.kind === 'engine').length;
    const report = await executePlan(model, plan, v2, { stagingBytes: 1 });
    expect(report.readback).toMatchObject({ verified: true, targets: engineChanged, unverifiable: 0 });
    expect(report.readback.milliseconds).toBeGreaterThan(0);
    expectClose((await model.run(inputs)).output, readSafetensors(join(dirOf(name), 'expected_v2.safetensors')).output);

    // Back to v1 through a refitter that corrupts one value of one weight: the engine reports it.
    const after = outputBytes(await model.run(inputs));
    const back = planRefit(model.weightMap, v1, { current: model.current });
    const victim = back.entries.find((e) => e.changed && e.kind === 'engine')!;
    const corrupting = (_segment: number, engine: Engine): RefitterLike => {
      const real = engine.createRefitter();
      return {
        setWeights: (layer: string, role: WeightRole, w) => {
          if (layer === victim.layer && role === victim.role) {
            const data = Float32Array.from(w.data as Float32Array);
            data[data.length - 1] += 0.5;
            w = { ...w, data };
          }
          real.setWeights(layer, role, w);
        },
        setCheckFinite: (c) => real.setCheckFinite(c),
        missing: () => real.missing(),
        validate: () => real.validate(),
        apply: () => real.apply(),
        [Symbol.dispose]: () => real[Symbol.dispose](),
      };
    };
    const error = await executePlan(model, back, v1, {}, { refitter: corrupting }).then(() => undefined, (e: EffectError) => e);
    expect(error?.detail).toMatchObject({ _tag: 'ReadbackMismatch', target: victim.target });
    expect(outputBytes(await model.run(inputs))).toEqual(after);
    // Without the check the corruption goes in.
    await executePlan(model, back, v1, { readback: false }, { refitter: corrupting });
    expect(outputBytes(await model.run(inputs))).not.toEqual(after);
  });

  it('float16 and int8 engines: packed kernels are compared as the engine holds them (rounded, quantized), like every other weight', async () => {
    for (const options of [{ weightPrecision: 'float16' as const }, { weightFormat: { kind: 'int8' as const } }]) {
      using model = await compile(models.gpt2.onnx, join(dirOf('gpt2'), 'weights_v1.safetensors'), options);
      using v2 = await openCheckpoint(join(dirOf('gpt2'), 'weights_v2.safetensors'));
      const plan = planRefit(model.weightMap, v2, { current: model.current });
      const report = await executePlan(model, plan, v2);
      expect(report.readback, JSON.stringify(options)).toMatchObject({ verified: true, unverifiable: 0 });
      expect(report.readback.targets).toBe(plan.entries.filter((e) => e.changed && e.kind === 'engine').length);
    }
  });
});
