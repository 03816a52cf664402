/**
 * A quantized checkpoint through the plan and the effect (refitModel): weights_v2 quantized with
 * src/quant's quantizer, written under compressed-tensors names, refits an int8 / int4 compiled fixture to
 * exactly the engines a refit from float weights_v2 gives (the copy path); into a float compiled model it
 * comes dequantized and matches expected_v2 within the format's bound (README); a mismatch is refused
 * naming the tensor, before anything changes.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import type { Engine } from '../ffi/engine.js';
import { compile, type CompileOptions } from '../src/compile/index.js';
import { planForRefit, refitModel, RefitFilesError } from '../src/effect/index.js';
import type { RefitModel } from '../src/model/index.js';
import { openCheckpoint } from '../src/checkpoint/checkpoint.js';
import type { QuantFormat } from '../src/quant/reference.js';
import { planRefit, RefitPlanCodec } from '../src/plan/plan.js';
import { EffectError, executePlan } from '../src/effect/effect.js';
import { kernelSources, quantizedV2 } from './support/quantized.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixture, outputBytes, temporaryDirectory } from './e2e-support.js';

const engineFiles = (model: RefitModel) => model.engineStages().map((s) => Buffer.from((s.engine as Engine).serialize({ includeWeights: true })));

const relativeError = (got: Float32Array, want: Float32Array): number => {
  let err = 0;
  let mag = 0;
  for (let i = 0; i < want.length; i++) {
    err = Math.max(err, Math.abs(got[i] - want[i]));
    mag = Math.max(mag, Math.abs(want[i]));
  }
  return Number.isFinite(err) ? err / mag : Infinity;
};

const CASES: readonly [string, string, QuantFormat, CompileOptions][] = [
  ['mlp', 'model_dynamo.onnx', { kind: 'int8' }, { weightFormat: { kind: 'int8' } }],
  ['mlp', 'model_dynamo.onnx', { kind: 'int4', groupSize: 32 }, { weightFormat: { kind: 'int4', groupSize: 32 } }],
  ['bert_tiny', 'model_dynamo.onnx', { kind: 'int8' }, { weightFormat: { kind: 'int8' } }],
  ['bert_tiny', 'model_dynamo.onnx', { kind: 'int4', groupSize: 32 }, { weightFormat: { kind: 'int4', groupSize: 32 } }],
];
// README (Quantized weights, error bounds): output error against fp32 per format.
const BOUND: Record<string, number> = { int8: 2e-2, fp8_e4m3: 1e-1, int4: 2.5e-1 };

describe('refit from a quantized checkpoint through the plan and the effect', () => {
  it.each(CASES)('%s/%s %o: copies equal a refit from float v2 byte for byte; a float model takes it dequantized', async (model, file, format, options) => {
    const onnx = fixture(model, file);
    const v1 = fixture(model, 'weights_v1.safetensors');
    const inputs = readSafetensors(fixture(model, 'inputs.safetensors'));
    using dir = temporaryDirectory();
    const qpath = join(dir.path, 'quantized.safetensors');
    using quantizedModel = await compile(onnx, v1, options);
    const kernels = kernelSources(quantizedModel);
    expect(kernels.size).toBeGreaterThan(0);
    await quantizedV2(model, qpath, kernels, format);

    using viaFloat = await compile(onnx, v1, options);
    await refitModel(viaFloat, { checkpoint: fixture(model, 'weights_v2.safetensors') });
    const before = engineFiles(quantizedModel);
    const { plan, report } = await refitModel(quantizedModel, { checkpoint: qpath });
    expect(RefitPlanCodec.is(JSON.parse(JSON.stringify(plan)))).toBe(true);
    expect(plan.problems.filter((p) => p.severity === 'error')).toEqual([]);
    // Scales are read, never reported as mapping to nothing.
    expect(plan.problems.filter((p) => p._tag === 'UnusedTensor' && /_scale$/.test(p.source))).toEqual([]);
    const copies = plan.entries.filter((e) => e.path === 'quantized-copy');
    expect(new Set(copies.flatMap((e) => e.sources.map((s) => s.name)))).toEqual(kernels);
    expect(plan.entries.some((e) => e.path === 'dequantize')).toBe(false);
    expect(report.changed).toBeGreaterThan(0);
    const after = engineFiles(quantizedModel);
    expect(after.some((b, i) => !b.equals(before[i]))).toBe(true);
    const wanted = engineFiles(viaFloat);
    after.forEach((b, i) => expect(b.equals(wanted[i])).toBe(true));
    expect(outputBytes(await quantizedModel.run(inputs))).toEqual(outputBytes(await viaFloat.run(inputs)));

    // The same checkpoint again moves nothing (scales are part of the digest).
    using reopened = await openCheckpoint(qpath);
    expect(planForRefit(quantizedModel, reopened).totals.changed).toBe(0);

    // Into a float model: dequantized on the way in, within the format's bound of PyTorch's v2 output.
    using floatModel = await compile(onnx, v1);
    const intoFloat = await refitModel(floatModel, { checkpoint: qpath });
    expect(intoFloat.plan.entries.filter((e) => e.path === 'dequantize').length).toBeGreaterThanOrEqual(kernels.size);
    expect(intoFloat.plan.entries.some((e) => e.path === 'quantized-copy')).toBe(false);
    const got = (await floatModel.run(inputs))[floatModel.outputs[0]].data as Float32Array;
    expect(relativeError(got, readSafetensors(fixture(model, 'expected_v2.safetensors')).output.data as Float32Array)).toBeLessThan(BOUND[format.kind]);
  });

  it('the effect decides copies against the engines itself: a plan made without kernel formats still copies, and a mismatch is refused before anything changes', async () => {
    const onnx = fixture('mlp', 'model_dynamo.onnx');
    const v1 = fixture('mlp', 'weights_v1.safetensors');
    const inputs = readSafetensors(fixture('mlp', 'inputs.safetensors'));
    using dir = temporaryDirectory();
    using int8 = await compile(onnx, v1, { weightFormat: { kind: 'int8' } });
    using viaFloat = await compile(onnx, v1, { weightFormat: { kind: 'int8' } });
    await refitModel(viaFloat, { checkpoint: fixture('mlp', 'weights_v2.safetensors') });
    const good = join(dir.path, 'int8.safetensors');
    const bad = join(dir.path, 'fp8.safetensors');
    await quantizedV2('mlp', good, kernelSources(int8), { kind: 'int8' });
    await quantizedV2('mlp', bad, kernelSources(int8), { kind: 'fp8_e4m3' });

    // Without kernel formats the plan can only say 'dequantize' and sees no mismatch.
    using badStore = await openCheckpoint(bad);
    const badPlan = planRefit(int8.weightMap, badStore, { current: int8.current });
    expect(badPlan.totals.errors).toBe(0);
    const before = outputBytes(await int8.run(inputs));
    const engines = engineFiles(int8);
    const error = await executePlan(int8, badPlan, badStore).then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(EffectError);
    expect((error as EffectError)._tag).toBe('QuantizedMismatch');
    expect((error as EffectError).message).toMatch(new RegExp(`'${[...kernelSources(int8)].sort()[0].replace(/\./g, '\\.')}'|\\.weight'`));
    expect(outputBytes(await int8.run(inputs))).toEqual(before);
    engineFiles(int8).forEach((b, i) => expect(b.equals(engines[i])).toBe(true));

    using goodStore = await openCheckpoint(good);
    const goodPlan = planRefit(int8.weightMap, goodStore, { current: int8.current });
    expect(goodPlan.entries.some((e) => e.path === 'dequantize')).toBe(true);
    await executePlan(int8, goodPlan, goodStore);
    const wanted = engineFiles(viaFloat);
    engineFiles(int8).forEach((b, i) => expect(b.equals(wanted[i])).toBe(true));
  });

  it('a group size or format mismatch is refused naming the tensor; outputs stay bit-identical', async () => {
    const onnx = fixture('mlp', 'model_dynamo.onnx');
    const v1 = fixture('mlp', 'weights_v1.safetensors');
    const inputs = readSafetensors(fixture('mlp', 'inputs.safetensors'));
    using dir = temporaryDirectory();
    using int4 = await compile(onnx, v1, { weightFormat: { kind: 'int4', groupSize: 32 } });
    using fp8 = await compile(onnx, v1, { weightFormat: { kind: 'fp8' } });
    for (const [name, format, model, tensor] of [
      ['g64.safetensors', { kind: 'int4', groupSize: 64 }, int4, /\.weight_scale'/],
      ['i8.safetensors', { kind: 'int8' }, fp8, /\.weight'/],
    ] as const) {
      const path = join(dir.path, name);
      await quantizedV2('mlp', path, kernelSources(model), format);
      const before = outputBytes(await model.run(inputs));
      const engines = engineFiles(model);
      const error = await refitModel(model, { checkpoint: path }).then(() => undefined, (e: unknown) => e);
      expect(error).toBeInstanceOf(RefitFilesError);
      expect((error as RefitFilesError)._tag).toBe('PlanHasErrors');
      expect((error as Error).message).toMatch(/QuantizedMismatch|quantized checkpoint tensor/);
      expect((error as Error).message).toMatch(tensor);
      expect(outputBytes(await model.run(inputs))).toEqual(before);
      engineFiles(model).forEach((b, i) => expect(b.equals(engines[i])).toBe(true));
    }
  });
});
