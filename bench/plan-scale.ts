/**
 * plan-scale: time to plan a refit (digest every source, check shapes and finiteness, mark what changed)
 * for checkpoints of 100 to 100,000 tensors. Growth should be linear: the ratios compare the per-tensor
 * time at each size with the per-tensor time at 1k tensors, measured in the same run. Half the tensors
 * change between the build checkpoint and the planned one; every fourth target is transposed.
 */
import { bestOf, writeResult, type Figure } from './lib.js';
import { planRefit } from '../src/plan/plan.js';
import type { MapTarget, WeightMap } from '../src/weightmap/map.js';
import { memoryStore } from '../src/weightmap/store.js';
import { tensorDigest } from '../src/weightmap/digest.js';
import type { F32Tensor } from '../src/weightmap/evaluate.js';

const ELEMENTS = 256; // a [16, 16] tensor each: small, so per-tensor overhead is what is measured

const checkpoint = (n: number, salt: number): [string, F32Tensor][] =>
  Array.from({ length: n }, (_, i) => [
    `model.layers.${i >> 3}.w${i & 7}.weight`,
    { shape: [16, 16], data: Float32Array.from({ length: ELEMENTS }, (_, k) => Math.sin(i * 31 + k + (i % 2 === 0 ? salt : 0))) },
  ]);

const mapOf = (tensors: [string, F32Tensor][]): WeightMap => {
  const store = memoryStore(tensors);
  const targets: MapTarget[] = tensors.map(([name], i) => ({
    id: `engine/0/layer${i}/kernel`, kind: 'engine', segment: 0, layer: `layer${i}`, role: 'kernel', dtype: 'float32', shape: [16, 16], status: 'mapped',
    expr: i % 4 === 0 ? { op: 'transpose', perm: [1, 0], x: { op: 'source', name } } : { op: 'source', name },
    methods: ['value'], built: { sourceDigest: tensorDigest(store, name), valueDigest: '' },
  }));
  return { version: 1, sources: tensors.map(([name, t]) => ({ name, dtype: 'F32', shape: t.shape })), targets, unused: [], ties: [], tied: [] };
};

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  const perTensor: Record<number, number> = {};
  for (const size of [100, 1_000, 10_000, 100_000]) {
    const built = checkpoint(size, 0);
    const map = mapOf(built);
    const next = memoryStore(checkpoint(size, 1));
    let changed = 0;
    const seconds = await bestOf(size >= 100_000 ? 2 : 5, () => {
      changed = planRefit(map, next).totals.changed;
    });
    if (changed !== size / 2) throw new Error(`plan-scale: expected ${size / 2} changed weights, found ${changed}`);
    figures[`plan_${size}`] = { value: seconds * 1e3, unit: 'ms' };
    figures[`plan_per_tensor_${size}`] = { value: (seconds / size) * 1e6, unit: 'us' };
    perTensor[size] = seconds / size;
  }
  ratios['per_tensor_time_100_vs_1k'] = perTensor[100] / perTensor[1_000];
  ratios['per_tensor_time_10k_vs_1k'] = perTensor[10_000] / perTensor[1_000];
  ratios['per_tensor_time_100k_vs_1k'] = perTensor[100_000] / perTensor[1_000];
  writeResult('plan-scale', figures, ratios);
};
