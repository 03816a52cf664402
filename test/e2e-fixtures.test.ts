import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { compile } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import { readModelFile, writeModelFile } from '../src/model/index.js';
import { coverage } from '../src/weightmap/map.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixtureModels } from './support/weightmap.js';
import { outputBytes, temporaryDirectory } from './e2e-support.js';

const fixtures = fixtureModels();

describe('compile, refit and run every fixture on native engines', () => {
  it('finds both exporters for the fixtures that have them', () => {
    expect(fixtures.length).toBeGreaterThanOrEqual(6);
    expect(fixtures.filter((f) => f.file === 'model_legacy.onnx').length).toBeGreaterThanOrEqual(2);
  });

  it.each(fixtures.map((f) => [`${f.model}/${f.file}`, f.model, f.path]))('%s: v1 -> v2 -> (lora) -> v1 match PyTorch; the same weights again move 0 bytes', async (_name, model, path) => {
    const dir = join(path, '..');
    const expected = (name: string) => readSafetensors(join(dir, `${name}.safetensors`)).output;
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    using compiled = await compile(path, join(dir, 'weights_v1.safetensors'));
    // Every refittable weight is mapped.
    expect(coverage(compiled.weightMap).unmapped).toEqual([]);
    const output = compiled.outputs[0];
    expectClose((await compiled.run(inputs))[output], expected('expected_v1'));

    const toV2 = await refitModel(compiled, { checkpoint: join(dir, 'weights_v2.safetensors') });
    expect(toV2.report.changed).toBe(toV2.plan.totals.targets);
    expectClose((await compiled.run(inputs))[output], expected('expected_v2'));

    if (model === 'bert_tiny' || model === 'gpt2_tiny') {
      const lora = await refitModel(compiled, { checkpoint: join(dir, 'weights_v1.safetensors'), lora: [{ path: join(dir, 'lora'), weight: 1 }] });
      expect(lora.report.changed).toBeGreaterThan(0);
      expectClose((await compiled.run(inputs))[output], expected('expected_lora'));
    }

    // Through the file: what a refit put in is what a later reader gets, digests included.
    using files = temporaryDirectory();
    const file = join(files.path, 'model.trtr');
    await writeModelFile(compiled, file);
    using reread = await readModelFile(file);
    expect(outputBytes(await reread.run(inputs))).toEqual(outputBytes(await compiled.run(inputs)));
    expect(reread.current).toEqual(compiled.current);

    const back = await refitModel(reread, { checkpoint: join(dir, 'weights_v1.safetensors') });
    expect(back.report.changed).toBeGreaterThan(0);
    expectClose((await reread.run(inputs))[output], expected('expected_v1'));
    const again = await refitModel(reread, { checkpoint: join(dir, 'weights_v1.safetensors') });
    expect(again.plan.totals.bytesToMove).toBe(0);
    expect(again.report.bytesMoved).toBe(0);
    expect(again.report.engines).toEqual([]);
  });
});
