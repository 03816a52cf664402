import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { compile } from '../src/compile/index.js';
import { EffectError, engineFusedGroups, executePlan, fusedGroupsOf, planForRefit, type RefitterLike } from '../src/effect/index.js';
import { Engine } from '../ffi/engine.js';
import type { EngineStage, RefitModel } from '../src/model/index.js';
import type { WeightRole } from '../src/network/types.js';
import { planRefit, RefitPlanCodec, summarizePlan, type FusedGroup } from '../src/plan/plan.js';
import { exprSources } from '../src/weightmap/expr.js';
import { memoryStore, type TensorStore } from '../src/weightmap/store.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, outputBytes } from './e2e-support.js';

const key = (layer: string, role: string) => `${layer}\u0000${role}`;

/** Replaces an engine segment's engine by its stripped copy (no weights: a refit must set every one). */
const strip = (model: RefitModel, at = 0): EngineStage => {
  const stage = model.engineStages()[at];
  const stripped = Engine.deserialize(stage.engine.serialize({ includeWeights: false }));
  stage.context[Symbol.dispose]();
  stage.engine[Symbol.dispose]();
  stage.engine = stripped;
  stage.context = stripped.createContext();
  stage.origin = undefined;
  return stage;
};

/**
 * Refitters of an engine that keeps no copy of fused weights' network-level values (as libtrtshim's engines
 * without retained batch norm copies): staging a member of `groups` needs the other members staged too, and
 * `missing()` says so, over the real refitter.
 */
const withoutCopies = (groups: ReadonlyArray<ReadonlyArray<readonly [string, string]>>) => (_segment: number, engine: Engine): RefitterLike => {
  const real = engine.createRefitter();
  const staged = new Set<string>();
  return {
    setWeights: (layer: string, role: WeightRole, w) => {
      real.setWeights(layer, role, w);
      staged.add(key(layer, role));
    },
    setCheckFinite: (c) => real.setCheckFinite(c),
    missing: () => [
      ...real.missing(),
      ...groups
        .filter((g) => g.some(([l, r]) => staged.has(key(l, r))))
        .flatMap((g) => g.filter(([l, r]) => !staged.has(key(l, r))).map(([layer, role]) => ({ layer, role: role as WeightRole }))),
    ],
    validate: () => real.validate(),
    apply: () => {
      real.apply();
      staged.clear();
    },
    [Symbol.dispose]: () => real[Symbol.dispose](),
  };
};

/** `base` with the tensors `from` `take` replaced. */
const mixed = (base: TensorStore, from: TensorStore, take: ReadonlySet<string>): TensorStore =>
  memoryStore([...base.tensors.keys()].map((n) => {
    const s = take.has(n) ? from : base;
    return [n, { shape: s.tensors.get(n)!.shape, data: s.toFloat32(n) }] as const;
  }));

describe('fused groups are planned: the effect stages what the plan restages and nothing else', () => {
  it('a stripped engine: one group of all its weights; a plan without it is refused (PlanIncomplete), a plan with it refits', async () => {
    // cnn_bn's engine holds no graph constants (a stripped engine with one would need a value no checkpoint
    // has: FusedWithUnmapped, tested below).
    const dir = join(fixture('cnn_bn', 'model_dynamo.onnx'), '..');
    using model = await compile(fixture('cnn_bn', 'model_dynamo.onnx'), join(dir, 'weights_v1.safetensors'));
    using v2 = await openCheckpoint(join(dir, 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    const stage = strip(model);
    const segment = stage.record.index;
    const weights = stage.engine.weights();
    const groups = fusedGroupsOf(model);
    expect(groups.filter((g) => g.segment === segment)).toEqual([{ segment, members: weights.map((w) => ({ layer: w.layer, role: w.role })) }]);

    // Planned without the groups: each one-weight batch leaves the refitter missing the rest.
    const digests = { ...model.current };
    const blind = planRefit(model.weightMap, v2, { current: model.current });
    expect(blind.entries.some((e) => e.restage !== undefined)).toBe(false);
    const error = await executePlan(model, blind, v2, { stagingBytes: 1 }).then(() => undefined, (e: EffectError) => e);
    expect(error).toBeInstanceOf(EffectError);
    expect(error?.detail._tag).toBe('PlanIncomplete');
    expect(error?.message).toMatch(/internal error: engine segment \d+ needs .* staged too/);
    expect(model.current).toEqual(digests);
    expect(stage.engine.info().hasWeights).toBe(false);

    // Planned with them: every changed weight restages the others, in the same apply.
    const plan = planForRefit(model, v2);
    const changed = plan.entries.filter((e) => e.changed && e.kind === 'engine' && e.segment === segment);
    expect(changed.length).toBeGreaterThan(0);
    for (const e of changed) {
      expect(new Set([e.target, ...e.restage!])).toEqual(new Set(plan.entries.filter((x) => x.kind === 'engine' && x.segment === segment).map((x) => x.target)));
    }
    expect(summarizePlan(plan)).toMatch(/restage: \d+ weight\(s\) fused with/);
    const decoded = RefitPlanCodec.decode(JSON.parse(JSON.stringify(plan)));
    expect(E.isRight(decoded) && decoded.right).toEqual(plan);
    const report = await executePlan(model, plan, v2, { stagingBytes: 1 });
    expect(report.bytesMoved).toBeGreaterThan(changed.reduce((s, e) => s + e.bytes, 0));
    expect(report.readback.verified).toBe(true);
    expectClose((await model.run(inputs)).output, readSafetensors(join(dir, 'expected_v2.safetensors')).output);
    // Filled, the engine keeps its weights: no group any more (the cache follows the engine's state).
    expect(fusedGroupsOf(model).filter((g) => g.segment === segment)).toEqual([]);
  });

  it('groups read from the engine through its refitters; a changed member restages the unchanged ones; without them PlanIncomplete, and nothing changed', async () => {
    const dir = join(fixture('cnn_bn', 'model_dynamo.onnx'), '..');
    using model = await compile(fixture('cnn_bn', 'model_dynamo.onnx'), join(dir, 'weights_v1.safetensors'));
    using v1 = await openCheckpoint(join(dir, 'weights_v1.safetensors'));
    using v2 = await openCheckpoint(join(dir, 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    const stage = model.engineStages()[0];
    const segment = stage.record.index;
    // Pretend each layer's kernel and bias are fused (as a folded batch norm's members are).
    const targetOf = (layer: string, role: string) => model.weightMap.targets.find((t) => t.kind === 'engine' && t.layer === layer && t.role === role)!;
    const convs = [...new Set(stage.engine.weights().filter((w) => w.role === 'kernel' && stage.engine.weights().some((b) => b.layer === w.layer && b.role === 'bias')).map((w) => w.layer))]
      // the layer to change first: one whose kernel reads no tensor its bias reads
      .sort((a, b) => Number(exprSources(targetOf(a, 'kernel').expr).some((n) => exprSources(targetOf(a, 'bias').expr).includes(n))) - Number(exprSources(targetOf(b, 'kernel').expr).some((n) => exprSources(targetOf(b, 'bias').expr).includes(n))));
    expect(convs.length).toBeGreaterThan(1);
    const fused = convs.map((l) => [[l, 'kernel'], [l, 'bias']] as const);
    const refitter = withoutCopies(fused);
    const groups: readonly FusedGroup[] = engineFusedGroups(segment, stage.engine, (e) => refitter(segment, e));
    expect(new Set(groups.map((g) => JSON.stringify(g)))).toEqual(new Set(convs.map((layer) => JSON.stringify({ segment, members: [{ layer, role: 'kernel' }, { layer, role: 'bias' }] }))));
    // The real engine keeps copies: it has no such group.
    expect(engineFusedGroups(segment, stage.engine)).toEqual([]);

    // Only one layer's kernel changes.
    const kernel = targetOf(convs[0], 'kernel');
    const bias = targetOf(convs[0], 'bias');
    const store = mixed(v1, v2, new Set(exprSources(kernel.expr)));
    const plan = planRefit(model.weightMap, store, { current: model.current, fusedGroups: groups });
    expect(plan.entries.filter((e) => e.changed).map((e) => e.target)).toEqual([kernel.id]);
    expect(plan.entries.find((e) => e.target === kernel.id)!.restage).toEqual([bias.id]);
    expect(plan.entries.filter((e) => e.restage !== undefined).length).toBe(1);

    const before = outputBytes(await model.run(inputs));
    const digests = { ...model.current };
    const blind = planRefit(model.weightMap, store, { current: model.current });
    const error = await executePlan(model, blind, store, {}, { refitter }).then(() => undefined, (e: EffectError) => e);
    expect(error?.detail).toEqual({ _tag: 'PlanIncomplete', segment, weights: [`${convs[0]} (bias)`], staged: [kernel.id] });
    expect(outputBytes(await model.run(inputs))).toEqual(before);
    expect(model.current).toEqual(digests);

    const report = await executePlan(model, plan, store, {}, { refitter });
    expect(report.changed).toBe(1);
    expect(report.bytesMoved).toBe(plan.entries.find((e) => e.target === kernel.id)!.bytes + plan.entries.find((e) => e.target === bias.id)!.bytes);
    // Every staged weight, the restaged bias too, was read back.
    expect(report.readback).toMatchObject({ verified: true, targets: 2 });
    // The same as a plain refit of that checkpoint on a twin model.
    using twin = await compile(fixture('cnn_bn', 'model_dynamo.onnx'), join(dir, 'weights_v1.safetensors'));
    await executePlan(twin, planRefit(twin.weightMap, store, { current: twin.current }), store);
    expect(outputBytes(await model.run(inputs))).toEqual(outputBytes(await twin.run(inputs)));
    expect(outputBytes(await model.run(inputs))).not.toEqual(before);
  });

  it('a changed weight fused with a weight no checkpoint tensor sets is a plan error (FusedWithUnmapped)', async () => {
    const dir = join(fixture('cnn_bn', 'model_dynamo.onnx'), '..');
    using model = await compile(fixture('cnn_bn', 'model_dynamo.onnx'), join(dir, 'weights_v1.safetensors'));
    using v2 = await openCheckpoint(join(dir, 'weights_v2.safetensors'));
    const t = model.weightMap.targets.find((x) => x.kind === 'engine' && x.status === 'mapped')!;
    const plan = planRefit(model.weightMap, v2, { current: model.current, fusedGroups: [{ segment: t.segment, members: [{ layer: t.layer!, role: t.role! }, { layer: 'no-such-layer', role: 'kernel' }] }] });
    expect(plan.problems).toContainEqual({ _tag: 'FusedWithUnmapped', severity: 'error', source: t.id, members: ['no-such-layer kernel'] });
    expect(summarizePlan(plan)).toMatch(/cannot redo the fusion/);
    expect((await executePlan(model, plan, v2).then(() => undefined, (e: EffectError) => e))?._tag).toBe('PlanHasErrors');
  });
});
