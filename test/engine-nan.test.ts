import { describe, expect, it } from 'vitest';
import { buildEngine } from '../ffi/index.js';
import type { NetworkDefinition } from '../src/network/types.js';
import { evaluate } from '../src/reference/index.js';

// Elementwise min and max propagate NaN in the engine as in ONNX and the reference evaluator.
describe('NaN through elementwise min and max', () => {
  for (const op of ['min', 'max'] as const) {
    it(`${op} of NaN and a number is NaN, and numbers are unchanged`, () => {
      const net: NetworkDefinition = {
        inputs: [
          { name: 'a', dtype: 'float32', shape: [4] },
          { name: 'b', dtype: 'float32', shape: [4] },
        ],
        layers: [{ kind: 'elementwise', name: 'e', a: 'a', b: 'b', op, output: 'y' }],
        outputs: [{ tensor: 'y', name: 'y' }],
      };
      const inputs = { a: new Float32Array([NaN, 1, 2, NaN]), b: new Float32Array([3, NaN, -1, NaN]) };
      using engine = buildEngine(net);
      const got = engine.run(inputs).y;
      const want = evaluate(net, inputs).y;
      expect(Array.from(got).map((v) => (Number.isNaN(v) ? 'NaN' : v))).toEqual(Array.from(want).map((v) => (Number.isNaN(v) ? 'NaN' : v)));
      expect(Number.isNaN(got[0]) && Number.isNaN(got[1]) && Number.isNaN(got[3])).toBe(true);
      expect(got[2]).toBe(op === 'min' ? -1 : 2);
    });
  }
});
