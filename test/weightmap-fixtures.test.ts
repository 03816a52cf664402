import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { coverage, WeightMapCodec, buildWeightMap } from '../src/weightmap/map.js';
import { evaluateExpr } from '../src/weightmap/evaluate.js';
import { exprSources } from '../src/weightmap/expr.js';
import { readF32 } from '../src/weightmap/store.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { applyMap, builtValues, compileRefittable, fixtureModels, originalFixtures, mapFor, traceForRefit } from './support/weightmap.js';

const fixtures = fixtureModels(originalFixtures);

describe('weight map on the real exporter fixtures', () => {
  it.each(fixtures.map((f) => [`${f.model}/${f.file}`, f.path]))('%s: every refittable weight is mapped, and each expression reproduces the built value from weights_v1', async (_name, path) => {
    using v1 = await openCheckpoint(join(path, '..', 'weights_v1.safetensors'));
    const traced = traceForRefit(path, v1);
    const map = mapFor(traced, v1);
    const report = coverage(map);
    expect(report.unmapped).toEqual([]);
    expect(report.mapped).toBeGreaterThan(0);
    // Constants are said so, with a reason, and are not float weights of checkpoint size.
    for (const c of report.constants) expect(c.reason.length).toBeGreaterThan(0);
    const built = builtValues(traced);
    expect([...built.keys()].sort()).toEqual(map.targets.map((t) => t.id).sort());
    for (const target of map.targets.filter((t) => t.status === 'mapped')) {
      const value = evaluateExpr(target.expr, (n) => readF32(v1, n));
      expect(E.isRight(value)).toBe(true);
      if (E.isLeft(value)) continue;
      const want = built.get(target.id)!.data as Float32Array;
      expect(value.right.data.length).toBe(want.length);
      const folded = target.methods.includes('bn-fold');
      for (let i = 0; i < want.length; i++) {
        // Exact, except BatchNorm folds (the exporter's operation order may round differently).
        if (folded) expect(Math.abs(value.right.data[i] - want[i])).toBeLessThanOrEqual(1e-6 * Math.max(1, Math.abs(want[i])));
        else if (value.right.data[i] !== want[i]) expect.fail(`${target.id}[${i}]: ${value.right.data[i]} != ${want[i]}`);
      }
    }
    // The map is data: it survives JSON and decodes with its codec.
    const decoded = WeightMapCodec.decode(JSON.parse(JSON.stringify(map)));
    expect(E.isRight(decoded) && decoded.right).toEqual(map);
  });

  it.each(fixtures.map((f) => [`${f.model}/${f.file}`, f.path]))('%s: weights_v2 through the map matches expected_v2; weights_v1 again matches expected_v1', async (name, path) => {
    using v1 = await openCheckpoint(join(path, '..', 'weights_v1.safetensors'));
    using v2 = await openCheckpoint(join(path, '..', 'weights_v2.safetensors'));
    const traced = traceForRefit(path, v1);
    const map = mapFor(traced, v1);
    // Everything in the checkpoint that is a float parameter feeds some weight.
    expect(map.unused.filter((n) => !n.endsWith('num_batches_tracked'))).toEqual([]);
    const { model, engine } = await compileRefittable(traced);
    using _ = model;
    const inputs = readSafetensors(join(path, '..', 'inputs.safetensors'));
    const output = traced.analyzed.graph.outputs[0];
    await applyMap(map, v2, model, engine);
    expectClose((await model.run(inputs))[output], readSafetensors(join(path, '..', 'expected_v2.safetensors')).output);
    await applyMap(map, v1, model, engine);
    expectClose((await model.run(inputs))[output], readSafetensors(join(path, '..', 'expected_v1.safetensors')).output);
  });

  it('lists unmapped weights as an error unless allowed', async () => {
    const path = fixtures.find((f) => f.model === 'cnn_bn' && f.file === 'model_legacy.onnx')!.path;
    const traced = traceForRefit(path);
    using v1 = await openCheckpoint(join(path, '..', 'weights_v1.safetensors'));
    // A checkpoint without the BatchNorm statistics of the first block: its folded conv cannot be found.
    const { memoryStore } = await import('../src/weightmap/store.js');
    const partial = memoryStore([...v1.tensors.keys()].filter((n) => !n.startsWith('1.') && n !== '4.num_batches_tracked' && n !== '4.num_batches_tracked').filter((n) => v1.tensors.get(n)!.dtype === 'F32').map((n) => [n, readF32(v1, n)!] as const));
    const r = buildWeightMap({ analyzed: traced.analyzed, segments: traced.partition.segments, checkpoint: partial, scopes: traced.scopes });
    expect(E.isLeft(r) && r.left._tag).toBe('UnmappedWeights');
    if (E.isLeft(r) && r.left._tag === 'UnmappedWeights') expect(r.left.weights.map((w) => w.id).sort()).toEqual(['engine/0//0/Conv/bias', 'engine/0//0/Conv/kernel']);
    const allowed = buildWeightMap({ analyzed: traced.analyzed, segments: traced.partition.segments, checkpoint: partial, scopes: traced.scopes }, { allowUnmapped: true });
    expect(E.isRight(allowed) && coverage(allowed.right).unmapped.length).toBe(2);
  });

  it('without restoring the zero biases the dynamo exporter dropped, GPT-2 has nowhere to put fine-tuned biases', async () => {
    const path = fixtures.find((f) => f.model === 'gpt2_tiny')!.path;
    using v1 = await openCheckpoint(join(path, '..', 'weights_v1.safetensors'));
    const map = mapFor(traceForRefit(path), v1);
    expect(map.unused.filter((n) => /\.(c_attn|c_proj|c_fc)\.bias$/.test(n)).length).toBe(8);
    const restored = mapFor(traceForRefit(path, v1), v1);
    expect(restored.unused).toEqual([]);
  });

  it('reports tied weights: GPT-2 lm_head reads transformer.wte.weight', async () => {
    const path = fixtures.find((f) => f.model === 'gpt2_tiny')!.path;
    using v1 = await openCheckpoint(join(path, '..', 'weights_v1.safetensors'));
    const map = mapFor(traceForRefit(path), v1);
    const wte = map.tied.find((t) => t.source === 'transformer.wte.weight');
    expect(wte?.targets.length).toBe(2);
    const lmHead = map.targets.find((t) => t.layer === 'node_linear' && t.role === 'kernel')!;
    expect(exprSources(lmHead.expr)).toEqual(['transformer.wte.weight']);
  });
});
