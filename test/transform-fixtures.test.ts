/**
 * Native weight transforms on the real exporter fixtures: every mapped weight of every fixture's weight map,
 * evaluated natively from weights_v2 (and from weights_v1 with the fixture's PEFT adapter merged natively),
 * equals the TypeScript reference bit for bit.
 */
import { describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { evaluateExpr, type F32Tensor } from '../src/weightmap/evaluate.js';
import { readF32, type TensorStore } from '../src/weightmap/store.js';
import { mergeAdapters } from '../src/lora/lora.js';
import { openLora } from '../src/lora/open.js';
import type { WeightMap } from '../src/weightmap/map.js';
import { evaluateExprNative, mergeLoraNative } from '../ffi/transform.js';
import { fixtureModels, originalFixtures, mapFor, traceForRefit } from './support/weightmap.js';

const sameBits = (a: Float32Array, b: Float32Array): boolean => {
  if (a.length !== b.length) return false;
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < a.length; i++) if (ua[i] !== ub[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) return false;
  return true;
};

/** Every mapped target of the map, evaluated both ways from `store`: the ids whose values differ. */
const differing = (map: WeightMap, store: TensorStore): { evaluated: number; differ: string[] } => {
  const lookup = (n: string): F32Tensor | undefined => readF32(store, n);
  const differ: string[] = [];
  let evaluated = 0;
  for (const target of map.targets.filter((t) => t.status === 'mapped')) {
    const want = evaluateExpr(target.expr, lookup);
    const got = evaluateExprNative(target.expr, lookup);
    evaluated++;
    if (E.isLeft(want) || E.isLeft(got)) {
      if (JSON.stringify(want) !== JSON.stringify(got)) differ.push(target.id);
      continue;
    }
    if (JSON.stringify(want.right.shape) !== JSON.stringify(got.right.shape) || !sameBits(got.right.data, want.right.data)) differ.push(target.id);
  }
  return { evaluated, differ };
};

describe('native transforms on the exporter fixtures', () => {
  it.each(fixtureModels(originalFixtures).map((f) => [`${f.model}/${f.file}`, f.path]))('%s: every mapped weight from weights_v2 (and v1 + LoRA) equals the TypeScript evaluation', async (_name, path) => {
    using v1 = await openCheckpoint(join(path, '..', 'weights_v1.safetensors'));
    using v2 = await openCheckpoint(join(path, '..', 'weights_v2.safetensors'));
    const map = mapFor(traceForRefit(path, v1), v1);
    const fromV2 = differing(map, v2);
    expect(fromV2.evaluated).toBeGreaterThan(0);
    expect(fromV2.differ).toEqual([]);

    const adapterDir = join(path, '..', 'lora');
    if (!existsSync(adapterDir)) return;
    using adapter = await openLora(adapterDir);
    const adapters = [{ adapter, weight: 1 }, { adapter, weight: -0.25 }];
    const want = mergeAdapters(v1, adapters);
    const got = mergeLoraNative(v1, adapters);
    if (E.isLeft(want) || E.isLeft(got)) expect.fail(JSON.stringify([want, got]));
    const changed = [...want.right.tensors.keys()].filter((n) => want.right.tensors.get(n)!.dtype === 'F32' && !sameBits(readF32(v1, n)!.data, readF32(want.right, n)!.data));
    expect(changed.length).toBeGreaterThan(0);
    for (const n of want.right.tensors.keys()) expect(sameBits(readF32(got.right, n)!.data, readF32(want.right, n)!.data), n).toBe(true);
    expect(differing(map, got.right).differ).toEqual([]);
  });
});
