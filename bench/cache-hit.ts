/**
 * Claim: with the engine cache, compiling a model whose weights changed costs a hash, a load and a refit,
 * far less than a build, and the hash does not grow with the model's bytes (it reads shapes, not values).
 *
 * Figures: per fixture, the real compile (ONNX file + checkpoint -> compiled model) on a miss (trace, map,
 * build + insert) against a hit (trace, map, hash, load + refit); a synthetic transformer of about 1 GiB of
 * weights (TRT_REFIT_BENCH_GIB to change) the same way; hash time for models from 4 MiB to 1 GiB; for N = 4
 * tensor-parallel ranks, one build plus three hits against four builds.
 *
 * Every build uses the options a real compile uses (engineBuildOptions: refittable) with tactic search on,
 * as a production build times its tactics (TensorRT always does). The tensor-parallel comparison is also
 * reported without tactic search (`tp4_no_tactics.*`), where a build is cheap and a cache gains little.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CacheStore } from '../src/cache/store.js';
import { compileWithCache } from '../src/cache/compile.js';
import { nativeEngineSteps, nativeKey } from '../src/cache/engines.js';
import { compileWithReport, engineBuildOptions } from '../src/compile/index.js';
import { compileRanks, randomCheckpoint, type TransformerSpec } from '../src/parallel/index.js';
import { defaultFixturesDir } from '../src/demo/run.js';
import type { Layer, NetworkDefinition, Weights } from '../src/network/types.js';
import { bestOf, writeResult, type Figure } from './lib.js';

const temporary = () => {
  const path = mkdtempSync(join(tmpdir(), 'trt-refit-bench-cache-'));
  return { path, [Symbol.dispose]: () => rmSync(path, { recursive: true, force: true }) };
};

/** A transformer-shaped network of `layers` blocks; weights filled with a constant (values do not
 *  matter to the cache or to timing). */
const syntheticTransformer = (layers: number, hidden: number, seq: number, value: number): NetworkDefinition => {
  const w = (shape: number[]): Weights => ({ dtype: 'float32', shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(value) });
  const out: Layer[] = [];
  let x = 'x';
  const add = (l: Layer) => (out.push(l), l.output);
  for (let l = 0; l < layers; l++) {
    const n = (s: string) => `l${l}_${s}`;
    const ln = add({ kind: 'layerNorm', name: n('ln'), output: n('ln'), input: x, axis: -1, epsilon: 1e-5, scale: w([hidden]), shift: w([hidden]) });
    const q = add({ kind: 'fullyConnected', name: n('q'), output: n('q'), input: ln, outFeatures: hidden, kernel: w([hidden, hidden]), bias: w([hidden]) });
    const k = add({ kind: 'fullyConnected', name: n('k'), output: n('k'), input: ln, outFeatures: hidden, kernel: w([hidden, hidden]), bias: w([hidden]) });
    const v = add({ kind: 'fullyConnected', name: n('v'), output: n('v'), input: ln, outFeatures: hidden, kernel: w([hidden, hidden]), bias: w([hidden]) });
    const s = add({ kind: 'matrixMultiply', name: n('s'), output: n('s'), a: q, transposeA: false, b: k, transposeB: true });
    const p = add({ kind: 'softmax', name: n('p'), output: n('p'), input: s, axis: -1 });
    const c = add({ kind: 'matrixMultiply', name: n('c'), output: n('c'), a: p, transposeA: false, b: v, transposeB: false });
    const o = add({ kind: 'fullyConnected', name: n('o'), output: n('o'), input: c, outFeatures: hidden, kernel: w([hidden, hidden]), bias: w([hidden]) });
    const r = add({ kind: 'elementwise', name: n('r'), output: n('r'), a: x, b: o, op: 'add' });
    const f1 = add({ kind: 'fullyConnected', name: n('f1'), output: n('f1'), input: r, outFeatures: 4 * hidden, kernel: w([4 * hidden, hidden]), bias: w([4 * hidden]) });
    const g = add({ kind: 'unary', name: n('g'), output: n('g'), input: f1, op: 'gelu_erf' });
    const f2 = add({ kind: 'fullyConnected', name: n('f2'), output: n('f2'), input: g, outFeatures: hidden, kernel: w([hidden, 4 * hidden]), bias: w([hidden]) });
    x = add({ kind: 'elementwise', name: n('x'), output: n('x'), a: r, b: f2, op: 'add' });
  }
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [seq, hidden] }], layers: out, outputs: [{ tensor: x, name: 'y' }] };
};
const weightBytes = (layers: number, hidden: number) => layers * (12 * hidden * hidden + 13 * hidden) * 4;

const ms = (seconds: number): Figure => ({ value: seconds * 1000, unit: 'ms' });
const time = async <T>(fn: () => Promise<T>): Promise<[T, number]> => {
  const t0 = process.hrtime.bigint();
  const v = await fn();
  return [v, Number(process.hrtime.bigint() - t0) / 1e9];
};

/** What a real compile builds with, tactic search on. */
const production = engineBuildOptions({ tacticSearch: true });

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};

  // Fixtures through the real compile: a miss, then a hit (other weights do not matter to the cost).
  const fixtures = defaultFixturesDir();
  for (const model of ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny']) {
    const onnx = join(fixtures, model, 'model_dynamo.onnx');
    const weights = join(fixtures, model, 'weights_v1.safetensors');
    let miss = Infinity;
    let hit = Infinity;
    let hitBuildFree = Infinity;
    for (let i = 0; i < 3; i++) {
      using dir = temporary();
      const cache = new CacheStore({ root: dir.path });
      const a = await compileWithReport(onnx, weights, { tacticSearch: true, cache });
      a.model[Symbol.dispose]();
      const b = await compileWithReport(onnx, weights, { tacticSearch: true, cache });
      b.model[Symbol.dispose]();
      if (a.cache !== 'miss' || b.cache !== 'hit') throw new Error(`${model}: expected miss then hit`);
      miss = Math.min(miss, a.timings.totalMs);
      hit = Math.min(hit, b.timings.totalMs);
      hitBuildFree = Math.min(hitBuildFree, b.timings.hashMs + b.timings.lookupMs + (b.timings.loadMs ?? 0));
    }
    figures[`${model}.compile_miss`] = { value: miss, unit: 'ms' };
    figures[`${model}.compile_hit`] = { value: hit, unit: 'ms' };
    figures[`${model}.hit_hash_lookup_load_refit`] = { value: hitBuildFree, unit: 'ms' };
    ratios[`${model}.hit_over_miss`] = hit / miss;
  }

  // Hash time against model size (hidden 1024, seq 8; 1 to 20 blocks: ~48 MiB to ~1 GiB).
  for (const layers of [1, 5, 21]) {
    const net = syntheticTransformer(layers, 1024, 8, 0.01);
    const seconds = await bestOf(5, () => nativeKey([{ kind: 'engine', network: net }], production));
    figures[`hash.${Math.round(weightBytes(layers, 1024) / 2 ** 20)}MiB`] = ms(seconds);
  }
  ratios['hash_1GiB_over_48MiB'] = figures[`hash.${Math.round(weightBytes(21, 1024) / 2 ** 20)}MiB`].value / figures[`hash.${Math.round(weightBytes(1, 1024) / 2 ** 20)}MiB`].value;

  // The ~1 GiB synthetic model: miss (build + insert) against hit (hash + load + refit).
  const gib = Number(process.env.TRT_REFIT_BENCH_GIB ?? '1');
  const blocks = Math.max(1, Math.round((gib * 2 ** 30) / weightBytes(1, 1024)));
  {
    using dir = temporary();
    const cache = new CacheStore({ root: dir.path });
    const first = syntheticTransformer(blocks, 1024, 8, 0.01);
    const [a, missSeconds] = await time(() => compileWithCache(cache, nativeEngineSteps([first], production)));
    a.value[Symbol.dispose]();
    const second = syntheticTransformer(blocks, 1024, 8, 0.02);
    const [b, hitSeconds] = await time(() => compileWithCache(cache, nativeEngineSteps([second], production)));
    b.value[Symbol.dispose]();
    if (a.cache !== 'miss' || b.cache !== 'hit') throw new Error('synthetic: expected miss then hit');
    figures['synthetic.weight_bytes'] = { value: weightBytes(blocks, 1024), unit: 'bytes' };
    figures['synthetic.compile_miss'] = ms(missSeconds);
    figures['synthetic.compile_hit'] = ms(hitSeconds);
    figures['synthetic.hit_hash'] = { value: b.timings.hashMs, unit: 'ms' };
    figures['synthetic.hit_load_refit'] = { value: b.timings.loadMs ?? 0, unit: 'ms' };
    ratios['synthetic.hit_over_miss'] = hitSeconds / missSeconds;
    ratios['synthetic.hash_share_of_hit'] = b.timings.hashMs / (hitSeconds * 1000);
  }

  // N = 4 tensor-parallel ranks: one build + three hits against four builds, with the production build
  // options, and without tactic search for comparison.
  const spec: TransformerSpec = { layers: 4, hidden: 1024, heads: 8, ffn: 4096, seq: 16 };
  const checkpoint = randomCheckpoint(spec, 7);
  figures['tp4.weight_bytes_per_rank'] = { value: (spec.layers * (4 * spec.hidden * spec.hidden + 2 * spec.hidden * spec.ffn) * 4) / 4, unit: 'bytes' };
  for (const [prefix, options] of [['tp4', production], ['tp4_no_tactics', engineBuildOptions({ tacticSearch: false })]] as const) {
    let cachedSeconds = Infinity;
    let uncachedSeconds = Infinity;
    for (let i = 0; i < 3; i++) {
      // Alternate, best of three each, so neither side gets the warm-up.
      const [uncached, u] = await time(() => compileRanks(spec, checkpoint, 4, undefined, options));
      uncached[Symbol.dispose]();
      uncachedSeconds = Math.min(uncachedSeconds, u);
      using dir = temporary();
      const cache = new CacheStore({ root: dir.path });
      const [cached, c] = await time(() => compileRanks(spec, checkpoint, 4, cache, options));
      if (cached.ranks.map((r) => r.cache).join() !== 'miss,hit,hit,hit') throw new Error(`${prefix}: expected one miss and three hits`);
      cached[Symbol.dispose]();
      cachedSeconds = Math.min(cachedSeconds, c);
    }
    figures[`${prefix}.one_build_three_hits`] = ms(cachedSeconds);
    figures[`${prefix}.four_builds`] = ms(uncachedSeconds);
    ratios[`${prefix}.cached_over_uncached`] = cachedSeconds / uncachedSeconds;
  }
  writeResult('cache-hit', figures, ratios);
};
