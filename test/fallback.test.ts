import { describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { traceOnnx } from '../src/trace/load.js';
import { compileModel } from '../src/partition/compiled.js';
import { FallbackError } from '../src/fallback/session.js';
import { tensorOf, type Tensor } from '../src/trace/ir.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';

const fixtures = '/work/shared/fixtures';
const models = ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny'].flatMap((m) =>
  ['model_dynamo.onnx', 'model_legacy.onnx'].map((f) => join(fixtures, m, f)).filter(existsSync));

describe('fallback segments on ONNX Runtime', () => {
  it.each(models)('%s with every operator forced to fallback matches PyTorch and the engine path', async (path) => {
    const analyzed = await traceOnnx(path);
    using fallback = await compileModel(analyzed, { forcedFallback: ['*'] });
    expect(fallback.segments().map((s) => s.kind)).toEqual(['fallback']);
    const inputs = readSafetensors(join(path, '..', 'inputs.safetensors'));
    const output = analyzed.graph.outputs[0];
    const viaFallback = (await fallback.run(inputs))[output];
    expectClose(viaFallback, readSafetensors(join(path, '..', 'expected_v1.safetensors')).output);
    using engine = await compileModel(analyzed);
    expectClose((await engine.run(inputs))[output], viaFallback);
  });

  it('refits fallback initializers from a new checkpoint (mlp legacy: names equal checkpoint names)', async () => {
    const dir = join(fixtures, 'mlp');
    const analyzed = await traceOnnx(join(dir, 'model_legacy.onnx'));
    using model = await compileModel(analyzed, { forcedFallback: ['*'] });
    const v2 = readSafetensors(join(dir, 'weights_v2.safetensors'));
    const updates = new Map<string, Tensor>(analyzed.graph.initializers.filter((i) => v2[i.name] !== undefined).map((i) => [i.name, v2[i.name]]));
    expect(updates.size).toBe(analyzed.graph.initializers.length);
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    await model.refitFallback(updates);
    expectClose((await model.run(inputs)).output, readSafetensors(join(dir, 'expected_v2.safetensors')).output);
  });

  it('refuses a refit of the wrong shape and keeps the old weights', async () => {
    const dir = join(fixtures, 'mlp');
    const analyzed = await traceOnnx(join(dir, 'model_legacy.onnx'));
    using model = await compileModel(analyzed, { forcedFallback: ['*'] });
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    await expect(model.refitFallback(new Map([['5.bias', tensorOf('float32', [3], [1, 2, 3])]]))).rejects.toBeInstanceOf(FallbackError);
    expectClose((await model.run(inputs)).output, readSafetensors(join(dir, 'expected_v1.safetensors')).output);
  });
});
