/**
 * Property: for random small networks and random exporter-style rewrites of their checkpoint weights
 * (rename, transpose, BatchNorm fold, tie, concatenate, drop or add a wrapper prefix), the weight map
 * found against checkpoint v1 recovers every weight: evaluated on an unrelated checkpoint v2, each
 * expression gives exactly what the same exporter would have written from v2.
 */
import { describe, expect } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf, type Tensor } from '../src/trace/ir.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { partitionGraph } from '../src/partition/index.js';
import { untieSharedInitializers } from '../src/weightmap/untie.js';
import { buildWeightMap, coverage } from '../src/weightmap/map.js';
import { evaluateExpr, type F32Tensor } from '../src/weightmap/evaluate.js';
import { memoryStore, readF32 } from '../src/weightmap/store.js';
import { builtValues, type Traced } from './support/weightmap.js';

/** mulberry32: a small seeded generator, so a case is reproducible from its seed. */
const generator = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let r = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  r = (r + Math.imul(r ^ (r >>> 7), 61 | r)) ^ r;
  return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
};

type Ckpt = Map<string, F32Tensor>;

/** How a block's weight reaches the graph. */
type Layout = 'asIs' | 'transposed' | 'fusedQkv';
interface Block {
  readonly layout: Layout;
  readonly out: number;
  readonly norm: boolean;
  readonly tieWithPrevious: boolean;
  readonly renamed: boolean;
}
interface Spec {
  readonly blocks: readonly Block[];
  readonly conv: { readonly channels: number; readonly renamed: boolean } | undefined;
  readonly prefix: '' | 'module.' | '_orig_mod.' | 'model.';
  readonly input: number;
}

const blockArb: fc.Arbitrary<Block> = fc.record({
  layout: fc.constantFrom<Layout>('asIs', 'transposed', 'fusedQkv'),
  out: fc.integer({ min: 2, max: 5 }),
  norm: fc.boolean(),
  tieWithPrevious: fc.boolean(),
  renamed: fc.boolean(),
});
const specArb: fc.Arbitrary<Spec> = fc.record({
  blocks: fc.array(blockArb, { minLength: 1, maxLength: 4 }),
  conv: fc.option(fc.record({ channels: fc.integer({ min: 2, max: 4 }), renamed: fc.boolean() }), { nil: undefined }),
  prefix: fc.constantFrom('' as const, 'module.' as const, '_orig_mod.' as const, 'model.' as const),
  input: fc.integer({ min: 2, max: 5 }),
});

const randomTensor = (next: () => number, shape: number[], positive = false): F32Tensor => {
  const n = shape.reduce((a, b) => a * b, 1);
  return { shape, data: Float32Array.from({ length: n }, () => (positive ? 0.5 + next() : next() * 2 - 1)) };
};

/** The checkpoint a PyTorch model of this spec would save (PyTorch layouts: Linear [out, in]). */
const checkpointOf = (spec: Spec, seed: number): Ckpt => {
  const next = generator(seed);
  const ck: Ckpt = new Map();
  const p = spec.prefix;
  let width = spec.input;
  if (spec.conv) {
    const c = spec.conv.channels;
    ck.set(`${p}stem.conv.weight`, randomTensor(next, [c, 2, 3, 3]));
    ck.set(`${p}stem.conv.bias`, randomTensor(next, [c]));
    ck.set(`${p}stem.bn.weight`, randomTensor(next, [c], true));
    ck.set(`${p}stem.bn.bias`, randomTensor(next, [c]));
    ck.set(`${p}stem.bn.running_mean`, randomTensor(next, [c]));
    ck.set(`${p}stem.bn.running_var`, randomTensor(next, [c], true));
    width = c;
  }
  let previousShape = '';
  spec.blocks.forEach((b, i) => {
    // A tie needs the previous block's weight to have this block's shape.
    const tied = b.tieWithPrevious && previousShape === `${b.out},${width}` && b.layout !== 'fusedQkv';
    previousShape = b.layout === 'fusedQkv' ? '' : `${b.out},${width}`;
    if (b.layout === 'fusedQkv') {
      for (const part of ['q', 'k', 'v']) {
        ck.set(`${p}blocks.${i}.${part}.weight`, randomTensor(next, [b.out, width]));
        ck.set(`${p}blocks.${i}.${part}.bias`, randomTensor(next, [b.out]));
      }
      width = 3 * b.out;
    } else {
      if (!tied) ck.set(`${p}blocks.${i}.linear.weight`, randomTensor(next, [b.out, width]));
      ck.set(`${p}blocks.${i}.linear.bias`, randomTensor(next, [b.out]));
      width = b.out;
    }
    if (b.norm) {
      ck.set(`${p}blocks.${i}.norm.weight`, randomTensor(next, [width], true));
      ck.set(`${p}blocks.${i}.norm.bias`, randomTensor(next, [width]));
    }
  });
  return ck;
};

const transpose2 = (t: F32Tensor): F32Tensor => {
  const [r, c] = t.shape;
  const out = new Float32Array(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = t.data[i * c + j];
  return { shape: [c, r], data: out };
};
const concatRows = (ts: F32Tensor[]): F32Tensor => ({ shape: [ts.reduce((s, t) => s + t.shape[0], 0), ...ts[0].shape.slice(1)], data: Float32Array.from(ts.flatMap((t) => [...t.data])) });
/** The legacy exporter's BatchNorm fold, written independently of the evaluator under test (float64, rounded once). */
const foldBn = (w: F32Tensor, b: F32Tensor, gamma: F32Tensor, beta: F32Tensor, mean: F32Tensor, variance: F32Tensor): [F32Tensor, F32Tensor] => {
  const c = gamma.data.length;
  const inner = w.data.length / c;
  const s = Array.from(gamma.data, (g, k) => g / Math.sqrt(variance.data[k] + 1e-5));
  return [
    { shape: w.shape, data: Float32Array.from(w.data, (v, i) => v * s[Math.floor(i / inner)]) },
    { shape: b.shape, data: Float32Array.from(b.data, (v, k) => (v - mean.data[k]) * s[k] + beta.data[k]) },
  ];
};

const t32 = (t: F32Tensor): Tensor => tensorOf('float32', t.shape, t.data);

/** The graph an exporter would write from checkpoint `ck`: names changed, layouts rewritten. */
const graphOf = (spec: Spec, ck: Ckpt) => {
  const p = spec.prefix;
  const g = new GraphBuilder('random', 18);
  let serial = 0;
  const name = (original: string, renamed: boolean) => (renamed ? `val_${serial++}` : original.slice(p.length));
  const get = (n: string) => ck.get(n)!;
  let x: string;
  if (spec.conv) {
    const img = g.input('img', 'float32', [1, 2, 5, 5]);
    const [w, b] = foldBn(get(`${p}stem.conv.weight`), get(`${p}stem.conv.bias`), get(`${p}stem.bn.weight`), get(`${p}stem.bn.bias`), get(`${p}stem.bn.running_mean`), get(`${p}stem.bn.running_var`));
    const conv = g.op('Conv', [img, g.initializer(name('onnx::Conv_w', true), t32(w)), g.initializer(name('onnx::Conv_b', true), t32(b))], { pads: [1, 1, 1, 1] });
    x = g.op('Flatten', [g.op('GlobalAveragePool', [g.op('Relu', [conv])])]);
  } else {
    x = g.input('x', 'float32', [1, spec.input]);
  }
  let lastWeight: string | undefined;
  spec.blocks.forEach((b, i) => {
    const base = `${p}blocks.${i}`;
    if (b.layout === 'fusedQkv') {
      const w = concatRows(['q', 'k', 'v'].map((k) => get(`${base}.${k}.weight`)));
      const bias = { shape: [3 * b.out], data: Float32Array.from(['q', 'k', 'v'].flatMap((k) => [...get(`${base}.${k}.bias`).data])) };
      x = g.op('Gemm', [x, g.initializer(name(`${base}.qkv.weight`, true), t32(w)), g.initializer(name(`${base}.qkv.bias`, true), t32(bias))], { transB: 1 });
      lastWeight = undefined;
    } else {
      const tied = !ck.has(`${base}.linear.weight`);
      const wName = tied ? lastWeight! : `${base}.linear.weight`;
      const w = get(wName);
      const bias = g.initializer(name(`${base}.linear.bias`, b.renamed), t32(get(`${base}.linear.bias`)));
      if (b.layout === 'transposed') {
        // The dynamo exporter's MatMul form: x @ W^T, W^T stored under a new name.
        x = g.op('Add', [g.op('MatMul', [x, g.initializer(name(`${wName}.T`, true), t32(transpose2(w)))]), bias]);
      } else {
        x = g.op('Gemm', [x, g.initializer(name(wName, b.renamed), t32(w)), bias], { transB: 1 });
      }
      lastWeight = wName;
    }
    if (b.norm) {
      x = g.op('LayerNormalization', [x, g.initializer(name(`${base}.norm.weight`, b.renamed), t32(get(`${base}.norm.weight`))), g.initializer(name(`${base}.norm.bias`, b.renamed), t32(get(`${base}.norm.bias`)))], { axis: -1 });
    }
    x = g.op('Tanh', [x]);
  });
  g.output(x);
  return g.build();
};

const trace = (spec: Spec, ck: Ckpt): Traced => {
  const analyzed = analyzeGraph(untieSharedInitializers(graphOf(spec, ck)));
  if (E.isLeft(analyzed)) throw new Error(JSON.stringify(analyzed.left));
  const partition = partitionGraph(analyzed.right);
  if (E.isLeft(partition)) throw new Error(JSON.stringify(partition.left));
  return { analyzed: analyzed.right, partition: partition.right, scopes: new Map() };
};

describe('weight map recovery under exporter rewrites', () => {
  test.prop([specArb, fc.integer(), fc.integer()], { numRuns: Number(process.env.TRT_REFIT_FUZZ ?? 0) > 0 ? 2000 : 60 })(
    'every weight maps, and evaluating the map on another checkpoint gives what the exporter would write from it',
    (spec, seed1, seed2) => {
      const v1 = checkpointOf(spec, seed1);
      const v2 = checkpointOf(spec, seed1 === seed2 ? seed2 + 1 : seed2);
      const traced1 = trace(spec, v1);
      const map = buildWeightMap({ analyzed: traced1.analyzed, segments: traced1.partition.segments, checkpoint: memoryStore(v1) });
      if (E.isLeft(map)) expect.fail(JSON.stringify(map.left));
      const report = coverage(map.right);
      expect(report.unmapped).toEqual([]);
      expect(report.constant).toBe(0);
      // What the exporter would have written from v2, lowered the same way.
      const want = builtValues(trace(spec, v2));
      const store2 = memoryStore(v2);
      for (const target of map.right.targets) {
        const got = evaluateExpr(target.expr, (n) => readF32(store2, n));
        if (E.isLeft(got)) expect.fail(`${target.id}: ${JSON.stringify(got.left)}`);
        const expected = want.get(target.id)!.data as Float32Array;
        const folded = target.methods.includes('bn-fold');
        expect(got.right.shape).toEqual([...want.get(target.id)!.shape]);
        for (let i = 0; i < expected.length; i++) {
          const ok = folded ? Math.abs(got.right.data[i] - expected[i]) <= 1e-6 * Math.max(1, Math.abs(expected[i])) : got.right.data[i] === expected[i];
          if (!ok) expect.fail(`${target.id}[${i}]: ${got.right.data[i]} != ${expected[i]} (${JSON.stringify(target.expr)})`);
        }
      }
      // Tied weights are reported.
      const tiedBlocks = spec.blocks.filter((_, i) => !v1.has(`${spec.prefix}blocks.${i}.linear.weight`) && spec.blocks[i].layout !== 'fusedQkv');
      expect(map.right.tied.filter((t) => t.source.endsWith('.linear.weight')).length).toBeGreaterThanOrEqual(tiedBlocks.length > 0 ? 1 : 0);
    },
  );
});
