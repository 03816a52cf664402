/** The random networks of test/support/networks.ts are valid: the reference evaluates them to the shapes the
 *  generator tracked, with finite values; and reweighting/rounding keep structure. */
import { describe, expect } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { networkWeights, type NetworkDefinition, type Weights } from '../src/network/types.js';
import { evaluate, evaluateAll } from '../src/reference/index.js';
import { families, reweight, rng, roundWeights } from './support/networks.js';

describe('random networks', () => {
  for (const [name, family] of Object.entries(families)) {
    for (const dtype of ['float32', 'bfloat16'] as const) {
      test.prop([family({ weightDType: dtype })], { numRuns: 40 })(`${name} (${dtype} weights) evaluates to finite outputs of the tracked shapes`, ({ net, inputs, outputShapes }) => {
        const tensors = evaluateAll(net, inputs);
        for (const o of net.outputs) {
          const t = tensors.get(o.tensor)!;
          expect(t.shape).toEqual(outputShapes[o.name]);
          expect(t.data.length).toBeGreaterThan(0);
          for (const v of t.data) expect(Number.isFinite(Number(v))).toBe(true);
        }
      });
    }
  }
  test.prop([families.conv(), fc.integer()], { numRuns: 30 })('reweight keeps shapes and dtypes, changes values', ({ net }, seed) => {
    const before = networkWeights(net);
    const after = networkWeights(reweight(net, seed));
    expect(after.map((w) => [w.layer, w.role, w.weights.dtype, w.weights.shape])).toEqual(before.map((w) => [w.layer, w.role, w.weights.dtype, w.weights.shape]));
    expect(after.some((w, i) => w.weights.data.some((v, j) => v !== before[i].weights.data[j]))).toBe(true);
    // variances stay positive
    for (const w of after) if (w.role === 'variance') for (const v of w.weights.data) expect(Number(v)).toBeGreaterThan(0);
  });
  test.prop([families.mlp()], { numRuns: 20 })('rounding to bfloat16 moves each weight by at most 2^-8 relative', ({ net }) => {
    const before = networkWeights(net);
    const after = networkWeights(roundWeights(net, 'bfloat16'));
    before.forEach((w, i) => w.weights.data.forEach((v, j) => expect(Math.abs(Number(after[i].weights.data[j]) - Number(v))).toBeLessThanOrEqual(Math.abs(Number(v)) * 2 ** -8)));
  });
});

describe('reference evaluator laws (independent code paths agree)', () => {
  const close = (a: Float32Array, b: Float32Array) => {
    expect(a.length).toBe(b.length);
    a.forEach((v, i) => expect(Math.abs(v - b[i])).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(b[i]))));
  };
  const floats = (rand: () => number, n: number) => Float32Array.from({ length: n }, () => 2 * rand() - 1);
  test.prop([fc.integer({ min: 1, max: 5 }), fc.integer({ min: 1, max: 6 }), fc.integer({ min: 1, max: 6 }), fc.integer()], { numRuns: 50 })(
    'fully connected == matrix multiply by the transposed constant, plus bias',
    (rows, inF, outF, seed) => {
      const rand = rng(seed);
      const kernel: Weights = { dtype: 'float32', shape: [outF, inF], data: floats(rand, outF * inF) };
      const bias: Weights = { dtype: 'float32', shape: [outF], data: floats(rand, outF) };
      const x = floats(rand, rows * inF);
      const inputs = [{ name: 'x', dtype: 'float32' as const, shape: [rows, inF] }];
      const viaFc: NetworkDefinition = { inputs, layers: [{ kind: 'fullyConnected', name: 'f', output: 'y', input: 'x', outFeatures: outF, kernel, bias }], outputs: [{ tensor: 'y', name: 'y' }] };
      const viaMatmul: NetworkDefinition = {
        inputs,
        layers: [
          { kind: 'constant', name: 'w', output: 'w', weights: kernel },
          { kind: 'constant', name: 'b', output: 'b', weights: bias },
          { kind: 'matrixMultiply', name: 'm', output: 'm', a: 'x', transposeA: false, b: 'w', transposeB: true },
          { kind: 'elementwise', name: 'add', output: 'y', a: 'm', b: 'b', op: 'add' },
        ],
        outputs: [{ tensor: 'y', name: 'y' }],
      };
      close(evaluate(viaFc, { x }).y, evaluate(viaMatmul, { x }).y);
    },
  );
  test.prop([fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 4 }), fc.integer()], { numRuns: 50 })(
    '1x1 convolution == transpose to channels-last, fully connected, transpose back',
    (c, o, h, w, seed) => {
      const rand = rng(seed);
      const kernel = floats(rand, o * c);
      const x = floats(rand, c * h * w);
      const inputs = [{ name: 'x', dtype: 'float32' as const, shape: [1, c, h, w] }];
      const conv: NetworkDefinition = {
        inputs,
        layers: [{ kind: 'convolution', name: 'c', output: 'y', input: 'x', params: { outChannels: o, kernel: [1, 1], stride: [1, 1], padding: [0, 0, 0, 0], dilation: [1, 1], groups: 1 }, kernel: { dtype: 'float32', shape: [o, c, 1, 1], data: kernel } }],
        outputs: [{ tensor: 'y', name: 'y' }],
      };
      const viaFc: NetworkDefinition = {
        inputs,
        layers: [
          { kind: 'transpose', name: 't', output: 't', input: 'x', perm: [0, 2, 3, 1] },
          { kind: 'fullyConnected', name: 'f', output: 'f', input: 't', outFeatures: o, kernel: { dtype: 'float32', shape: [o, c], data: kernel } },
          { kind: 'transpose', name: 'u', output: 'y', input: 'f', perm: [0, 3, 1, 2] },
        ],
        outputs: [{ tensor: 'y', name: 'y' }],
      };
      close(evaluate(conv, { x }).y, evaluate(viaFc, { x }).y);
    },
  );
  test.prop([families.norm()], { numRuns: 40 })('softmax sums to 1 along its axis; un-scaled layer norm has mean 0', ({ net, inputs }) => {
    const tensors = evaluateAll(net, inputs);
    const softmax = net.layers.find((l) => l.kind === 'softmax')!;
    const t = tensors.get(softmax.output)!;
    const axis = (softmax as { axis: number }).axis < 0 ? (softmax as { axis: number }).axis + t.shape.length : (softmax as { axis: number }).axis;
    const reduced = evaluate({ ...net, layers: [...net.layers, { kind: 'reduce', name: 'sum', output: 'sum', input: softmax.output, op: 'sum', axes: [axis], keepDims: false }], outputs: [{ tensor: 'sum', name: 'sum' }] }, inputs).sum;
    reduced.forEach((v) => expect(Math.abs(v - 1)).toBeLessThan(1e-5));
    const ln = net.layers.find((l) => l.kind === 'layerNorm');
    if (ln !== undefined && ln.scale === undefined) {
      const shape = tensors.get(ln.output)!.shape;
      const from = ln.axis < 0 ? ln.axis + shape.length : ln.axis;
      const axes = shape.map((_, i) => i).filter((i) => i >= from);
      const means = evaluate({ ...net, layers: [...net.layers, { kind: 'reduce', name: 'mean', output: 'mean', input: ln.output, op: 'mean', axes, keepDims: false }], outputs: [{ tensor: 'mean', name: 'mean' }] }, inputs).mean;
      means.forEach((v) => expect(Math.abs(v)).toBeLessThan(1e-5));
    }
  });
});

