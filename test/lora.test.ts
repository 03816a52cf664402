import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { decodeAdapterConfig, type AdapterConfig } from '../src/checkpoint/adapter.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { kohyaModules, mergeAdapters, peftModules, type LoraAdapter } from '../src/lora/lora.js';
import { parseLoraArgument } from '../src/lora/open.js';
import { memoryStore, readF32, type TensorStore } from '../src/weightmap/store.js';
import { evaluateExpr, type F32Tensor } from '../src/weightmap/evaluate.js';
import { fixtureModels, mapFor, traceForRefit } from './support/weightmap.js';

const config = (raw: Record<string, unknown>): AdapterConfig => {
  const r = decodeAdapterConfig({ target_modules: ['x'], ...raw }, 'adapter_config.json');
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right;
};
const t = (shape: number[], values: number[]): F32Tensor => ({ shape, data: Float32Array.from(values) });
const seq = (n: number, f: (i: number) => number) => Array.from({ length: n }, (_, i) => f(i));

/** (B @ A)[o][i] by the definition, in float64. */
const product = (b: F32Tensor, a: F32Tensor, out: number, rank: number, inner: number) =>
  seq(out * inner, (k) => {
    const o = Math.floor(k / inner);
    const i = k % inner;
    let s = 0;
    for (let r = 0; r < rank; r++) s += b.data[o * rank + r] * a.data[r * inner + i];
    return s;
  });

const peft = (cfg: AdapterConfig, tensors: [string, F32Tensor][]): LoraAdapter => {
  const store = memoryStore(tensors);
  const modules = peftModules(cfg, store);
  if (E.isLeft(modules)) throw new Error(JSON.stringify(modules.left));
  return { format: 'peft', modules: modules.right, tensors: store };
};

const merged = (base: TensorStore, adapters: { adapter: LoraAdapter; weight: number }[], name: string): Float32Array => {
  const r = mergeAdapters(base, adapters);
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return readF32(r.right, name)!.data;
};

const closeTo = (got: Float32Array, want: number[]) => {
  expect(got.length).toBe(want.length);
  got.forEach((g, i) => expect(Math.abs(g - want[i])).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(want[i]))));
};

const small = fc.float({ min: -2, max: 2, noNaN: true, noDefaultInfinity: true });
const linearCase = fc.record({ out: fc.integer({ min: 1, max: 5 }), inner: fc.integer({ min: 1, max: 5 }), rank: fc.integer({ min: 1, max: 3 }), alpha: fc.integer({ min: 1, max: 16 }), rs: fc.boolean(), fanInFanOut: fc.boolean() })
  .chain((c) => fc.record({ c: fc.constant(c), w: fc.array(small, { minLength: c.out * c.inner, maxLength: c.out * c.inner }), a: fc.array(small, { minLength: c.rank * c.inner, maxLength: c.rank * c.inner }), b: fc.array(small, { minLength: c.out * c.rank, maxLength: c.out * c.rank }), weight: fc.constantFrom(1, 0.5, -1) }));

describe('LoRA merge', () => {
  test.prop([linearCase], { numRuns: 60 })('PEFT Linear and Conv1D (fan_in_fan_out): W + weight * scaling * B @ A, laid out as the base', ({ c, w, a, b, weight }) => {
    const base = memoryStore([['m.weight', t(c.fanInFanOut ? [c.inner, c.out] : [c.out, c.inner], w)]]);
    const cfg = config({ r: c.rank, lora_alpha: c.alpha, use_rslora: c.rs, fan_in_fan_out: c.fanInFanOut });
    const A = t([c.rank, c.inner], a);
    const B = t([c.out, c.rank], b);
    const adapter = peft(cfg, [['base_model.model.m.lora_A.weight', A], ['base_model.model.m.lora_B.weight', B]]);
    const scaling = c.rs ? c.alpha / Math.sqrt(c.rank) : c.alpha / c.rank;
    const delta = product(B, A, c.out, c.rank, c.inner);
    const want = c.fanInFanOut
      ? seq(c.inner * c.out, (k) => w[k] + weight * scaling * delta[(k % c.out) * c.inner + Math.floor(k / c.out)])
      : seq(c.out * c.inner, (k) => w[k] + weight * scaling * delta[k]);
    closeTo(merged(base, [{ adapter, weight }], 'm.weight'), want);
  });

  it('rank_pattern and alpha_pattern set one module its own rank and alpha', () => {
    const cfg = config({ r: 2, lora_alpha: 4, rank_pattern: { k: 1 }, alpha_pattern: { k: 3 } });
    const adapter = peft(cfg, [
      ['base_model.model.q.lora_A.weight', t([2, 1], [1, 1])], ['base_model.model.q.lora_B.weight', t([1, 2], [1, 1])],
      ['base_model.model.k.lora_A.weight', t([1, 1], [1])], ['base_model.model.k.lora_B.weight', t([1, 1], [1])],
    ]);
    expect(adapter.modules.map((m) => [m.module, m.rank, m.scaling])).toEqual([['base_model.model.k', 1, 3], ['base_model.model.q', 2, 2]]);
    const base = memoryStore([['q.weight', t([1, 1], [0])], ['k.weight', t([1, 1], [0])]]);
    expect(merged(base, [{ adapter, weight: 1 }], 'q.weight')[0]).toBe(4); // 2 * (1*1 + 1*1)
    expect(merged(base, [{ adapter, weight: 1 }], 'k.weight')[0]).toBe(3);
  });

  it('Conv2d: A [r, in, kh, kw] and B [out, r, 1, 1] give a delta of the kernel shape', () => {
    const A = t([1, 2, 2, 2], seq(8, (i) => i + 1));
    const B = t([3, 1, 1, 1], [1, -1, 2]);
    const adapter = peft(config({ r: 1, lora_alpha: 2 }), [['conv.lora_A.weight', A], ['conv.lora_B.weight', B]]);
    const base = memoryStore([['conv.weight', t([3, 2, 2, 2], seq(24, () => 0.5))]]);
    closeTo(merged(base, [{ adapter, weight: 1 }], 'conv.weight'), seq(24, (k) => 0.5 + 2 * B.data[Math.floor(k / 8)] * A.data[k % 8]));
  });

  it('several adapters at once, each with its own weight; none gives the base back', () => {
    const base = memoryStore([['m.weight', t([1, 2], [1, 1])]]);
    const one = peft(config({ r: 1, lora_alpha: 1 }), [['m.lora_A.weight', t([1, 2], [1, 2])], ['m.lora_B.weight', t([1, 1], [1])]]);
    const two = peft(config({ r: 1, lora_alpha: 2 }), [['m.lora_A.weight', t([1, 2], [3, 0])], ['m.lora_B.weight', t([1, 1], [1])]]);
    closeTo(merged(base, [{ adapter: one, weight: 0.5 }, { adapter: two, weight: -1 }], 'm.weight'), [1 + 0.5 * 1 - 2 * 3, 1 + 0.5 * 2 - 0]);
    const none = mergeAdapters(base, []);
    expect(E.isRight(none) && none.right).toBe(base);
  });

  it('Kohya / diffusers naming: lora_down, lora_up and alpha', () => {
    const store = memoryStore([
      ['lora_unet_down_blocks_0_proj_in.lora_down.weight', t([2, 2], [1, 0, 0, 1])],
      ['lora_unet_down_blocks_0_proj_in.lora_up.weight', t([2, 2], [1, 2, 3, 4])],
      ['lora_unet_down_blocks_0_proj_in.alpha', t([], [1])],
    ]);
    const modules = kohyaModules(store);
    if (E.isLeft(modules)) throw new Error(JSON.stringify(modules.left));
    expect(modules.right.map((m) => [m.rank, m.scaling])).toEqual([[2, 0.5]]);
    const base = memoryStore([['down_blocks.0.proj_in.weight', t([2, 2], [0, 0, 0, 0])], ['down_blocks.0.proj_out.weight', t([2, 2], [9, 9, 9, 9])]]);
    const adapter: LoraAdapter = { format: 'kohya', modules: modules.right, tensors: store };
    closeTo(merged(base, [{ adapter, weight: 1 }], 'down_blocks.0.proj_in.weight'), [0.5, 1, 1.5, 2]);
    closeTo(merged(base, [{ adapter, weight: 1 }], 'down_blocks.0.proj_out.weight'), [9, 9, 9, 9]);
  });

  it('names what is wrong: a lone factor, no base weight, a delta of the wrong shape', () => {
    const lone = peftModules(config({ r: 1, lora_alpha: 1 }), memoryStore([['m.lora_A.weight', t([1, 2], [1, 2])]]));
    expect(E.isLeft(lone) && lone.left._tag).toBe('InvalidAdapter');
    const adapter = peft(config({ r: 1, lora_alpha: 1 }), [['m.lora_A.weight', t([1, 2], [1, 2])], ['m.lora_B.weight', t([1, 1], [1])]]);
    const noBase = mergeAdapters(memoryStore([['other.weight', t([1, 2], [0, 0])]]), [{ adapter, weight: 1 }]);
    expect(E.isLeft(noBase) && noBase.left._tag).toBe('NoBaseWeight');
    const wrong = mergeAdapters(memoryStore([['m.weight', t([2, 3], [0, 0, 0, 0, 0, 0])]]), [{ adapter, weight: 1 }]);
    expect(E.isLeft(wrong) && wrong.left._tag).toBe('DeltaShapeMismatch');
    expect(parseLoraArgument('dir/a:0.5')).toEqual({ path: 'dir/a', weight: 0.5 });
    expect(parseLoraArgument('dir/a')).toEqual({ path: 'dir/a', weight: 1 });
  });

  it('a BatchNorm-folded target gets the folded delta (cnn_bn legacy: LoRA on the first conv)', async () => {
    const f = fixtureModels().find((x) => x.model === 'cnn_bn' && x.file === 'model_legacy.onnx')!;
    using v1 = await openCheckpoint(join(f.path, '..', 'weights_v1.safetensors'));
    const map = mapFor(traceForRefit(f.path), v1);
    const A = t([1, 3, 3, 3], seq(27, (i) => Math.sin(i)));
    const B = t([8, 1, 1, 1], seq(8, (i) => Math.cos(i)));
    const adapter = peft(config({ r: 1, lora_alpha: 1 }), [['base_model.model.0.lora_A.weight', A], ['base_model.model.0.lora_B.weight', B]]);
    const m = mergeAdapters(v1, [{ adapter, weight: 1 }]);
    if (E.isLeft(m)) throw new Error(JSON.stringify(m.left));
    const target = map.targets.find((x) => x.id === 'engine/0//0/Conv/kernel')!;
    const got = evaluateExpr(target.expr, (n) => readF32(m.right, n));
    if (E.isLeft(got)) throw new Error(JSON.stringify(got.left));
    // Independently: fold(W + delta) with the BatchNorm of module 1 (eps 1e-5).
    const w = readF32(v1, '0.weight')!.data;
    const gamma = readF32(v1, '1.weight')!.data;
    const variance = readF32(v1, '1.running_var')!.data;
    closeTo(got.right.data, seq(216, (k) => (w[k] + B.data[Math.floor(k / 27)] * A.data[k % 27]) * (gamma[Math.floor(k / 27)] / Math.sqrt(variance[Math.floor(k / 27)] + 1e-5))));
  });
});
