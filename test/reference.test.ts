/** The reference evaluator on tiny hand-computed cases, one or more per layer kind, plus a few laws. */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import type { Layer, NetworkDefinition, Weights } from '../src/network/types.js';
import { handCases } from './support/networks.js';
import {
  bfloat16ToFloat,
  erf,
  evaluate,
  float16ToFloat,
  floatToBfloat16,
  floatToFloat16,
  ReferenceEvaluationError,
} from '../src/reference/index.js';

const f32 = (shape: number[], values: number[]): Weights => ({ dtype: 'float32', shape, data: Float32Array.from(values) });

/** A layer without its name and output (distributed over the union). */
type LayerBody = Layer extends infer L ? (L extends Layer ? Omit<L, 'name' | 'output'> : never) : never;
/** A one-layer network over one float input, output 'y'. */
const single = (shape: number[], layer: LayerBody, extra: Layer[] = []): NetworkDefinition => ({
  inputs: [{ name: 'x', dtype: 'float32', shape }],
  layers: [...extra, { name: 'L', output: 'y', ...layer } as Layer],
  outputs: [{ tensor: 'y', name: 'y' }],
});
const run1 = (net: NetworkDefinition, x: number[]) => Array.from(evaluate(net, { x: Float32Array.from(x) }).y);
const close = (actual: number[], expected: number[], tol = 1e-6) => {
  expect(actual.length).toBe(expected.length);
  actual.forEach((a, i) => expect(Math.abs(a - expected[i])).toBeLessThanOrEqual(tol * (1 + Math.abs(expected[i]))));
};

describe('reference evaluator, hand-computed', () => {
  for (const c of handCases) {
    it(c.name, () => close(Array.from(evaluate(c.net, c.inputs).y), [...c.expected]));
  }
  it('gather out of range throws', () => {
    const g = handCases.find((c) => c.name === 'gather int32, negative index')!;
    expect(() => evaluate(g.net, { ids: Int32Array.from([3, 0]) })).toThrow(ReferenceEvaluationError);
  });
  it('erf against tabulated values, both branches', () => {
    close([erf(0.5), erf(2), erf(3.5), erf(4.5), erf(-5)], [0.5204998778130465, 0.9953222650189527, 0.9999992569016276, 0.9999999998033839, -0.9999999999984626], 1e-12);
  });
  it('names the layer when shapes are wrong', () => {
    const net = single([2, 2], { kind: 'fullyConnected', input: 'x', outFeatures: 3, kernel: f32([3, 3], new Array(9).fill(0)) });
    expect(() => run1(net, [1, 2, 3, 4])).toThrow(/L: kernel has 9 elements, expected 6/);
  });
});

describe('16-bit conversions', () => {
  it('known bit patterns', () => {
    expect(float16ToFloat(0x3c00)).toBe(1);
    expect(float16ToFloat(0xc000)).toBe(-2);
    expect(float16ToFloat(0x7bff)).toBe(65504);
    expect(float16ToFloat(0x0001)).toBe(2 ** -24);
    expect(floatToFloat16(65520)).toBe(0x7c00); // rounds up to infinity
    expect(floatToFloat16(1 + 2 ** -11)).toBe(0x3c00); // tie to even
    expect(floatToFloat16(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(floatToFloat16(2 ** -25)).toBe(0); // tie to even (zero)
    expect(floatToFloat16(3 * 2 ** -26)).toBe(1);
    expect(bfloat16ToFloat(0x3f80)).toBe(1);
    expect(floatToBfloat16(1 + 2 ** -8)).toBe(0x3f80);
    expect(floatToBfloat16(1 + 3 * 2 ** -8)).toBe(0x3f82);
  });
  test.prop([fc.integer({ min: 0, max: 0xffff })])('float16 bits -> float -> bits is the identity (non-NaN)', (bits) => {
    const v = float16ToFloat(bits);
    if (!Number.isNaN(v)) expect(floatToFloat16(v)).toBe(bits);
  });
  test.prop([fc.integer({ min: 0, max: 0xffff })])('bfloat16 bits -> float -> bits is the identity (non-NaN)', (bits) => {
    const v = bfloat16ToFloat(bits);
    if (!Number.isNaN(v)) expect(floatToBfloat16(v)).toBe(bits);
  });
  test.prop([fc.float({ noNaN: true, min: -60000, max: 60000 })])('float16 rounding picks a nearest neighbour', (x) => {
    const bits = floatToFloat16(x);
    const v = float16ToFloat(bits);
    // No float16 value lies strictly closer: check the neighbours one step either way.
    for (const n of [bits - 1, bits + 1]) {
      const w = float16ToFloat(n & 0xffff);
      if (Number.isFinite(w) && (n & 0x7fff) !== 0x7fff && Math.sign(w) === Math.sign(v)) expect(Math.abs(w - x)).toBeGreaterThanOrEqual(Math.abs(v - x));
    }
  });
});
