/**
 * Claim: a refittable engine loses no fusion, so it runs as fast as a fixed (non-refittable) engine built
 * from the same network. Inference latency of both, interleaved, best of several runs; goal ratio 1.00.
 */
import { buildEngine, type Engine } from '../ffi/index.js';
import type { NetworkDefinition } from '../src/network/types.js';
import { resnet, transformer } from './engine-build-vs-refit.js';
import { writeResult, type Figure } from './lib.js';

const input = (net: NetworkDefinition): Float32Array => {
  const shape = net.inputs[0].shape;
  const out = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < out.length; i++) out[i] = Math.sin(i * 0.37);
  return out;
};

/** Best latency of each engine, measured alternately so drift affects both alike. */
const latencies = (engines: Engine[], x: Float32Array, repeats: number): number[] => {
  const contexts = engines.map((e) => e.createContext());
  const best = engines.map(() => Infinity);
  for (const c of contexts) c.run({ x }); // warm up (binds buffers, faults pages)
  for (let r = 0; r < repeats; r++) {
    contexts.forEach((c, i) => {
      const start = process.hrtime.bigint();
      c.execute();
      best[i] = Math.min(best[i], Number(process.hrtime.bigint() - start) / 1e9);
    });
  }
  contexts.forEach((c) => c[Symbol.dispose]());
  return best;
};

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  for (const [label, net, repeats] of [
    ['transformer', transformer(1), 10],
    ['resnet', resnet(1), 10],
  ] as const) {
    using refittable = buildEngine(net, { refittable: true });
    using fixed = buildEngine(net, { refittable: false });
    const [r, f] = latencies([refittable, fixed], input(net), repeats);
    figures[`${label}_refittable_latency`] = { value: r * 1e3, unit: 'ms' };
    figures[`${label}_fixed_latency`] = { value: f * 1e3, unit: 'ms' };
    figures[`${label}_refittable_kernels`] = { value: refittable.info().numKernels, unit: 'kernels' };
    figures[`${label}_fixed_kernels`] = { value: fixed.info().numKernels, unit: 'kernels' };
    ratios[`${label}_refittable_over_fixed`] = r / f;
  }
  writeResult('refittable-vs-fixed', figures, ratios);
};
