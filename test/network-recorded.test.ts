/**
 * A network written with the builder API holds its own values: its recorded state names a checkpoint tensor
 * as held only when the engine's weight equals it bit for bit, so a refit to that checkpoint moves every weight
 * the network did not already hold (issue 12: the recorded state is what the engines hold).
 */
import { describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import { compileNetwork } from '../src/compile/index.js';
import { planForRefit } from '../src/effect/files.js';
import { executePlanTE } from '../src/effect/index.js';
import type { NetworkDefinition } from '../src/network/types.js';
import { memoryStore } from '../src/weightmap/store.js';

const w = (shape: number[], values: number[]) => ({ dtype: 'float32' as const, shape, data: Float32Array.from(values) });

const network = (kernel: number[], bias: number[]): NetworkDefinition => ({
  inputs: [{ name: 'x', dtype: 'float32', shape: [1, 3] }],
  layers: [{ kind: 'fullyConnected', name: 'fc', input: 'x', output: 'y', outFeatures: 2, kernel: w([2, 3], kernel), bias: w([2], bias) }],
  outputs: [{ tensor: 'y', name: 'y' }],
} as NetworkDefinition);

describe('compileNetwork records what the engine holds', () => {
  it('a weight whose network value differs from its checkpoint tensor is not recorded as holding it; the refit sets it', async () => {
    const kernel = [1, 2, 3, 4, 5, 6];
    const checkpoint = memoryStore([
      ['fc.weight', { shape: [2, 3], data: Float32Array.from(kernel) }],
      ['fc.bias', { shape: [2], data: Float32Array.of(0.25, -0.75) }],
    ]);
    // The network's bias is not the checkpoint's.
    const built = compileNetwork(network(kernel, [9, 9]), checkpoint);
    if (E.isLeft(built)) throw new Error(JSON.stringify(built.left));
    using model = built.right;
    expect(model.current['engine/0/fc/kernel']).not.toBe('');
    expect(model.current['engine/0/fc/bias']).toBe('');
    const plan = planForRefit(model, checkpoint);
    expect(plan.entries.filter((e) => e.changed).map((e) => e.target)).toEqual(['engine/0/fc/bias']);
    const report = await executePlanTE(model, plan, checkpoint, {}, {})();
    if (E.isLeft(report)) throw new Error(JSON.stringify(report.left));
    const x = Float32Array.of(1, -1, 2);
    const y = (await model.run({ x })).y.data as Float32Array;
    const want = [0, 1].map((o) => Math.fround(x[0] * kernel[o * 3] + x[1] * kernel[o * 3 + 1] + x[2] * kernel[o * 3 + 2] + [0.25, -0.75][o]));
    expect(Array.from(y)).toEqual(want);
    // Now it holds the checkpoint: nothing left to move.
    expect(planForRefit(model, checkpoint).totals.changed).toBe(0);
  });
});
