import { beforeAll, describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { checkPlan, planRefit, RefitPlanCodec, stateAfter, summarizePlan } from '../src/plan/plan.js';
import type { WeightMap } from '../src/weightmap/map.js';
import { exprSources } from '../src/weightmap/expr.js';
import { memoryStore, readF32, type TensorStore } from '../src/weightmap/store.js';
import type { F32Tensor } from '../src/weightmap/evaluate.js';
import { fixtureModels, mapFor, traceForRefit } from './support/weightmap.js';

let map: WeightMap;
let v1: [string, F32Tensor][];
let v2: [string, F32Tensor][];
let extra: [string, F32Tensor][];

beforeAll(async () => {
  const f = fixtureModels().find((x) => x.model === 'cnn_bn' && x.file === 'model_legacy.onnx')!;
  using c1 = await openCheckpoint(join(f.path, '..', 'weights_v1.safetensors'));
  using c2 = await openCheckpoint(join(f.path, '..', 'weights_v2.safetensors'));
  map = mapFor(traceForRefit(f.path), c1);
  const floats = (c: TensorStore) => [...c.tensors.keys()].filter((n) => c.tensors.get(n)!.dtype === 'F32').map((n): [string, F32Tensor] => [n, { shape: [...readF32(c, n)!.shape], data: Float32Array.from(readF32(c, n)!.data) }]);
  v1 = floats(c1);
  v2 = floats(c2);
  extra = [['unrelated.weight', { shape: [2], data: new Float32Array([1, 2]) }]];
});

const readers = (source: string) => map.targets.filter((t) => exprSources(t.expr).includes(source)).map((t) => t.id);

describe('refit plan', () => {
  test.prop([fc.infiniteStream(fc.nat()), fc.boolean()], { numRuns: 30 })('is the same whatever the order of tensors in the checkpoint', (randoms, useV2) => {
    const base = useV2 ? v2 : v1;
    const order = [...base, ...extra].map((e) => ({ e, k: randoms.next().value as number })).sort((a, b) => a.k - b.k).map((x) => x.e);
    expect(JSON.stringify(planRefit(map, memoryStore(order)))).toBe(JSON.stringify(planRefit(map, memoryStore([...base, ...extra]))));
  });

  it('planning the weights the engines hold marks nothing changed and moves 0 bytes', () => {
    const plan = planRefit(map, memoryStore(v1));
    expect(plan.totals.changed).toBe(0);
    expect(plan.totals.bytesToMove).toBe(0);
    expect(plan.totals.targets).toBe(map.targets.filter((t) => t.status === 'mapped').length);
    // After a refit to v2, planning v2 again moves nothing; planning v1 moves everything back.
    const toV2 = planRefit(map, memoryStore(v2));
    expect(toV2.totals.changed).toBe(toV2.totals.targets);
    expect(toV2.totals.bytesToMove).toBe(toV2.totals.bytesTotal);
    const state = stateAfter(toV2);
    expect(planRefit(map, memoryStore(v2), { current: state }).totals.bytesToMove).toBe(0);
    expect(planRefit(map, memoryStore(v1), { current: state }).totals.changed).toBe(toV2.totals.targets);
  });

  test.prop([fc.subarray([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], { minLength: 1 })], { numRuns: 30 })('changed weights are exactly those reading a changed tensor', (picks) => {
    const names = v1.map(([n]) => n);
    const changedNames = new Set(picks.filter((i) => i < names.length).map((i) => names[i]));
    const store = memoryStore(v1.map(([n, t]) => [n, changedNames.has(n) ? { shape: t.shape, data: t.data.map((x) => x + 1) } : t]));
    const plan = planRefit(map, store);
    const expected = new Set([...changedNames].flatMap(readers));
    expect(plan.entries.filter((e) => e.changed).map((e) => e.target).sort()).toEqual([...expected].sort());
    expect(plan.totals.bytesToMove).toBe(plan.entries.filter((e) => expected.has(e.target)).reduce((s, e) => s + e.shape.reduce((a, b) => a * b, 1) * 4, 0));
  });

  it('reports missing tensors, shape mismatches, non-finite values and tensors that map to nothing', () => {
    const broken = v2
      .filter(([n]) => n !== '8.bias')
      .map(([n, t]): [string, F32Tensor] => (n === '8.weight' ? [n, { shape: [16, 10], data: t.data }] : n === '1.weight' ? [n, { shape: t.shape, data: t.data.map((x, i) => (i === 3 ? NaN : i === 5 ? Infinity : x)) }] : [n, t]));
    const plan = planRefit(map, memoryStore([...broken, ...extra]));
    const byTag = (tag: string) => plan.problems.filter((p) => p._tag === tag);
    expect(byTag('MissingSource')).toEqual([{ _tag: 'MissingSource', severity: 'error', source: '8.bias', targets: readers('8.bias') }]);
    expect(byTag('ShapeMismatch')).toEqual([{ _tag: 'ShapeMismatch', severity: 'error', source: '8.weight', expected: [10, 16], found: [16, 10] }]);
    expect(byTag('NonFinite')).toEqual([{ _tag: 'NonFinite', severity: 'error', source: '1.weight', count: 2 }]);
    expect(byTag('UnusedTensor').map((p) => p.source)).toEqual(['unrelated.weight']);
    expect(plan.totals.errors).toBe(3);
    const checked = checkPlan(plan);
    expect(E.isLeft(checked) && checked.left.problems.length).toBe(3);
    expect(summarizePlan(plan)).toContain("checkpoint tensor '8.bias' is missing");
    // A clean plan passes.
    expect(E.isRight(checkPlan(planRefit(map, memoryStore(v2))))).toBe(true);
  });

  it('warns of lossy casts and refuses non-float sources', () => {
    const base = memoryStore(v2);
    const store: TensorStore = {
      tensors: new Map([...base.tensors].map(([n, info]) => [n, n === '8.weight' ? { ...info, dtype: 'F64' } : n === '8.bias' ? { ...info, dtype: 'I32' } : info])),
      bytes: (n) => base.bytes(n),
      toFloat32: (n) => base.toFloat32(n),
    };
    const plan = planRefit(map, store);
    expect(plan.problems.filter((p) => p._tag === 'LossyCast')).toEqual([{ _tag: 'LossyCast', severity: 'warning', source: '8.weight', from: 'F64', to: 'float32' }]);
    expect(plan.problems.filter((p) => p._tag === 'NotFloat').map((p) => p.source)).toEqual(['8.bias']);
  });

  it('is data: JSON round trip through its codec', () => {
    const plan = planRefit(map, memoryStore([...v2, ...extra]));
    const decoded = RefitPlanCodec.decode(JSON.parse(JSON.stringify(plan)));
    expect(E.isRight(decoded) && decoded.right).toEqual(plan);
    expect(E.isLeft(RefitPlanCodec.decode({ ...plan, totals: { ...plan.totals, changed: 'x' } }))).toBe(true);
  });
});
