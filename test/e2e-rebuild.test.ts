import { describe, expect } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { compile } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import { netInput, outputBytes, temporaryDirectory, writeNet, type NetSpec } from './e2e-support.js';

const spec: fc.Arbitrary<NetSpec> = fc.record({
  widths: fc.array(fc.integer({ min: 1, max: 24 }), { minLength: 2, maxLength: 4 }),
  activation: fc.constantFrom('Relu' as const, 'Tanh' as const),
  layerNorm: fc.boolean(),
  batch: fc.integer({ min: 1, max: 3 }),
});

describe('refit equals rebuild', () => {
  test.prop([spec, fc.integer(), fc.integer(), fc.constantFrom(undefined, 1)], { numRuns: 12 })(
    'compile with B gives the same output bytes as compile with A then refit with B (any staging budget)',
    async (net, seedA, seedB, stagingBytes) => {
      using dir = temporaryDirectory();
      const a = await writeNet(dir.path, net, seedA, 'a');
      const b = await writeNet(dir.path, net, seedB, 'b');
      const x = netInput(net, seedA);
      using rebuilt = await compile(b.onnx, b.checkpoint);
      using refitted = await compile(a.onnx, a.checkpoint);
      const before = outputBytes(await refitted.run(x));
      const { report, plan } = await refitModel(refitted, { checkpoint: b.checkpoint }, stagingBytes !== undefined ? { stagingBytes } : {});
      expect(outputBytes(await refitted.run(x))).toEqual(outputBytes(await rebuilt.run(x)));
      // Only changed weights moved; with budget 1 at most one computed value is staged at a time.
      expect(report.changed).toBe(plan.totals.changed);
      if (stagingBytes === 1) expect(report.peakStagedBytes).toBeLessThanOrEqual(Math.max(0, ...plan.entries.map((e) => e.bytes)));
      // And back: refitting A restores A's outputs bit for bit.
      await refitModel(refitted, { checkpoint: a.checkpoint });
      expect(outputBytes(await refitted.run(x))).toEqual(before);
      expect((await refitModel(refitted, { checkpoint: a.checkpoint })).report.bytesMoved).toBe(0);
    },
  );
});
