import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { compile } from '../src/compile/index.js';
import { executePlan, nativeTransformsAvailable } from '../src/effect/index.js';
import { evaluateExprNative } from '../ffi/transform.js';
import { evaluateExpr } from '../src/weightmap/evaluate.js';
import { planRefit } from '../src/plan/plan.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixtureModels, originalFixtures } from './support/weightmap.js';
import { outputBytes } from './e2e-support.js';

describe.skipIf(!nativeTransformsAvailable())('the effect on native transform kernels equals the TypeScript reference evaluator', () => {
  it.each(fixtureModels(originalFixtures).map((f) => [`${f.model}/${f.file}`, f.path]))('%s: refit to v2 gives the same output bytes either way', async (_name, path) => {
    const dir = join(path, '..');
    using v2 = await openCheckpoint(join(dir, 'weights_v2.safetensors'));
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    const outputs: Buffer[] = [];
    for (const transform of [evaluateExpr, evaluateExprNative]) {
      using model = await compile(path, join(dir, 'weights_v1.safetensors'));
      let calls = 0;
      await executePlan(model, planRefit(model.weightMap, v2, { current: model.current }), v2, {}, { transform: (e, l) => (calls++, transform(e, l)) });
      expect(calls).toBeGreaterThan(0);
      outputs.push(outputBytes(await model.run(inputs)));
    }
    expect(outputs[0].equals(outputs[1])).toBe(true);
  });
});
