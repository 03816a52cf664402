/**
 * Claim: a refit of a whole compiled model runs near host memory bandwidth, holds little extra memory
 * (near the largest tensor, never the model), and costs a small fraction of a full compile.
 *
 * Synthetic transformer-shaped models (hidden 2048, sequence 8; per layer q/k/v/o 2048x2048, MLP
 * 2048 -> 8192 -> 2048, two layer norms) of about 1 GiB and 4 GiB (TRT_REFIT_BENCH_4G=0 skips the 4 GiB one: it needs
 * about 14 GiB and several minutes on a 2-core machine), written as NetworkDefinitions with matching
 * checkpoints A and B (writeSafetensors, in os.tmpdir()). Compiled with A, saved as .trtr, read back; then:
 * plan time for B (digests and finiteness of every tensor, one native pass), refit time to B and its GB/s
 * against host memcpy measured in the same run, peak extra anonymous memory during the refit against the
 * largest tensor, refit time against the full compile, plan and refit of the same weights again (0 bytes;
 * the plan's scans are memoized by file identity), a plan over a fresh mapping with that memo emptied (as
 * a new process would see it), writing the refitted .trtr, and read-back verification after the refit
 * (Engine.weightDigests of every engine) as a ratio to the refit without it (readback_ratio, goal <= 1.1).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { compileNetwork } from '../src/compile/index.js';
import { executePlan, planForRefit } from '../src/effect/index.js';
import { clearScanCache } from '../src/weightmap/digest.js';
import { readModelFile, writeModelFile } from '../src/model/index.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { networkWeights, type Layer, type NetworkDefinition, type Weights } from '../src/network/types.js';
import { hostMemcpyBandwidth, writeResult, type Figure } from './lib.js';

/** Seeded uniform values in [lo, hi). */
export const filler = (seed: number) => {
  let s = seed >>> 0 || 1;
  return (n: number, lo: number, hi: number): Float32Array => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      out[i] = lo + ((s >>> 0) / 4294967296) * (hi - lo);
    }
    return out;
  };
};

export interface SyntheticModel {
  readonly network: NetworkDefinition;
  readonly hidden: number;
  readonly seq: number;
  readonly layers: number;
  readonly bytes: number;
  readonly largestTensorBytes: number;
}

/** A transformer-shaped network of about `targetBytes` of float32 weights; weight values from `seed`. */
export const transformer = (targetBytes: number, seed: number, hidden = 2048, seq = 8): SyntheticModel => {
  const perLayer = 4 * (12 * hidden * hidden + 13 * hidden);
  // Whole layers, at most the target: one engine blob of a .trtr file must stay under 4 GiB (a typed array's limit).
  const count = Math.max(1, Math.floor(targetBytes / perLayer));
  const fill = filler(seed);
  const layers: Layer[] = [];
  const w = (shape: number[], lo: number, hi: number): Weights => ({ dtype: 'float32', shape, data: fill(shape.reduce((a, b) => a * b, 1), lo, hi) });
  const fc = (name: string, input: string, inF: number, outF: number): string => {
    const r = 1 / Math.sqrt(inF);
    layers.push({ kind: 'fullyConnected', name, output: name, input, outFeatures: outF, kernel: w([outF, inF], -r, r), bias: w([outF], -0.1, 0.1) });
    return name;
  };
  const add = (layer: Layer): string => {
    layers.push(layer);
    return layer.output;
  };
  let x = 'x';
  for (let l = 0; l < count; l++) {
    const p = `layers.${l}`;
    const q = fc(`${p}.q`, x, hidden, hidden);
    const k = fc(`${p}.k`, x, hidden, hidden);
    const v = fc(`${p}.v`, x, hidden, hidden);
    const scores = add({ kind: 'matrixMultiply', name: `${p}.scores`, output: `${p}.scores`, a: q, transposeA: false, b: k, transposeB: true });
    const probs = add({ kind: 'softmax', name: `${p}.softmax`, output: `${p}.softmax`, input: scores, axis: -1 });
    const ctx = add({ kind: 'matrixMultiply', name: `${p}.ctx`, output: `${p}.ctx`, a: probs, transposeA: false, b: v, transposeB: false });
    const o = fc(`${p}.o`, ctx, hidden, hidden);
    const r1 = add({ kind: 'elementwise', name: `${p}.res1`, output: `${p}.res1`, a: x, b: o, op: 'add' });
    const n1 = add({ kind: 'layerNorm', name: `${p}.ln1`, output: `${p}.ln1`, input: r1, axis: -1, epsilon: 1e-5, scale: w([hidden], 0.9, 1.1), shift: w([hidden], -0.1, 0.1) });
    const up = fc(`${p}.up`, n1, hidden, 4 * hidden);
    const g = add({ kind: 'unary', name: `${p}.gelu`, output: `${p}.gelu`, input: up, op: 'gelu_erf' });
    const down = fc(`${p}.down`, g, 4 * hidden, hidden);
    const r2 = add({ kind: 'elementwise', name: `${p}.res2`, output: `${p}.res2`, a: n1, b: down, op: 'add' });
    x = add({ kind: 'layerNorm', name: `${p}.ln2`, output: `${p}.ln2`, input: r2, axis: -1, epsilon: 1e-5, scale: w([hidden], 0.9, 1.1), shift: w([hidden], -0.1, 0.1) });
  }
  const network: NetworkDefinition = { inputs: [{ name: 'x', dtype: 'float32', shape: [seq, hidden] }], layers, outputs: [{ tensor: x, name: 'output' }] };
  const weights = networkWeights(network);
  return {
    network, hidden, seq, layers: count,
    bytes: weights.reduce((s, x) => s + x.weights.data.byteLength, 0),
    largestTensorBytes: Math.max(...weights.map((x) => x.weights.data.byteLength)),
  };
};

const sourceName = (layer: string, role: string) => `${layer}.${role === 'kernel' || role === 'scale' ? 'weight' : 'bias'}`;

/** Writes the network's weights as a checkpoint in PyTorch naming; `seed` set: fresh values of the same
 *  shapes, made one tensor at a time while writing (the model is never held twice). */
export const writeCheckpointOf = async (path: string, model: SyntheticModel, seed?: number): Promise<void> => {
  const fill = seed === undefined ? undefined : filler(seed);
  await writeSafetensors(path, networkWeights(model.network).map((x) => ({
    name: sourceName(x.layer, x.role), dtype: 'F32' as const, shape: x.weights.shape,
    data: () => {
      const data = fill ? fill(x.weights.data.length, -0.05, 0.05) : (x.weights.data as Float32Array);
      return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    },
  })));
};

/** Peak resident memory (VmHWM) since the last resetPeakRss, bytes (Linux). */
const vm = (key: string): number => {
  const m = new RegExp(`${key}:\\s+(\\d+) kB`).exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) * 1024 : NaN;
};
const resetPeakRss = (): void => {
  try {
    writeFileSync('/proc/self/clear_refs', '5');
  } catch {
    // not Linux, or not allowed: the peak then covers the whole process
  }
};

/** Anonymous resident memory of this process, bytes (Linux). */
export const rssAnon = (): number => {
  const m = /RssAnon:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) * 1024 : process.memoryUsage().rss;
};

const seconds = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e9;
const gc = (): void => (globalThis as { gc?: () => void }).gc?.();

const measure = async (label: string, targetBytes: number, memcpy: number, figures: Record<string, Figure>, ratios: Record<string, number>): Promise<void> => {
  const dir = mkdtempSync(join(tmpdir(), 'trt-refit-bench-'));
  try {
    let synthetic: SyntheticModel | undefined = transformer(targetBytes, 1);
    const { bytes, largestTensorBytes, layers } = synthetic;
    const a = join(dir, 'a.safetensors');
    const b = join(dir, 'b.safetensors');
    await writeCheckpointOf(a, synthetic);
    await writeCheckpointOf(b, synthetic, 2);
    const file = join(dir, 'model.trtr');
    let compileSeconds: number;
    {
      using ckptA = await openCheckpoint(a);
      const start = process.hrtime.bigint();
      const compiled = compileNetwork(synthetic.network, ckptA);
      compileSeconds = seconds(start);
      if (E.isLeft(compiled)) throw new Error(JSON.stringify(compiled.left));
      using model = compiled.right;
      await writeModelFile(model, file);
    }
    synthetic = undefined;
    gc();
    using model = await readModelFile(file);
    using ckptB = await openCheckpoint(b);
    let start = process.hrtime.bigint();
    const plan = planForRefit(model, ckptB);
    const planSeconds = seconds(start);
    gc();
    const baseline = rssAnon();
    let peak = baseline;
    const rssBefore = vm('VmRSS');
    resetPeakRss();
    start = process.hrtime.bigint();
    const report = await executePlan(model, plan, ckptB, {}, { onProgress: () => (peak = Math.max(peak, rssAnon())) });
    const refitSeconds = seconds(start);
    peak = Math.max(peak, rssAnon());
    const peakRss = vm('VmHWM');
    // Read-back verification after the refit: every engine reports the digests of what its kernels hold.
    start = process.hrtime.bigint();
    let readbackWeights = 0;
    for (const stage of model.stages) if (stage.kind === 'engine') readbackWeights += stage.engine.weightDigests().size;
    const readbackSeconds = seconds(start);
    if (readbackWeights === 0) throw new Error('read-back verification reported no weights');
    start = process.hrtime.bigint();
    const again = planForRefit(model, ckptB);
    const planAgainSeconds = seconds(start);
    const againReport = await executePlan(model, again, ckptB);
    const againSeconds = seconds(start);
    // A fresh process would not have the scan cache: plan again over a new mapping with it cleared.
    clearScanCache();
    let planColdCacheSeconds: number;
    {
      using reopened = await openCheckpoint(b);
      start = process.hrtime.bigint();
      planForRefit(model, reopened);
      planColdCacheSeconds = seconds(start);
    }
    start = process.hrtime.bigint();
    await writeModelFile(model, file);
    const saveSeconds = seconds(start);

    figures[`${label}_model_bytes`] = { value: bytes, unit: 'B' };
    figures[`${label}_layers`] = { value: layers, unit: 'layers' };
    figures[`${label}_largest_tensor_bytes`] = { value: largestTensorBytes, unit: 'B' };
    figures[`${label}_compile_seconds`] = { value: compileSeconds, unit: 's' };
    figures[`${label}_plan_seconds`] = { value: planSeconds, unit: 's' };
    figures[`${label}_refit_seconds`] = { value: refitSeconds, unit: 's' };
    figures[`${label}_refit_bytes_moved`] = { value: report.bytesMoved, unit: 'B' };
    figures[`${label}_refit_throughput`] = { value: report.bytesMoved / refitSeconds, unit: 'B/s' };
    figures[`${label}_refit_batches`] = { value: report.batches, unit: 'batches' };
    figures[`${label}_refit_peak_extra_anon_bytes`] = { value: peak - baseline, unit: 'B' };
    // Includes the checkpoint's mapped file pages the refit read (zero-copy views, reclaimable page cache).
    figures[`${label}_refit_peak_extra_rss_with_mapped_pages_bytes`] = { value: peakRss - rssBefore, unit: 'B' };
    figures[`${label}_readback_seconds`] = { value: readbackSeconds, unit: 's' };
    figures[`${label}_readback_throughput`] = { value: bytes / readbackSeconds, unit: 'B/s' };
    figures[`${label}_plan_again_seconds`] = { value: planAgainSeconds, unit: 's' };
    figures[`${label}_plan_fresh_mapping_empty_scan_cache_seconds`] = { value: planColdCacheSeconds, unit: 's' };
    figures[`${label}_refit_same_again_seconds`] = { value: againSeconds, unit: 's' };
    figures[`${label}_refit_same_again_bytes_moved`] = { value: againReport.bytesMoved, unit: 'B' };
    figures[`${label}_save_trtr_seconds`] = { value: saveSeconds, unit: 's' };
    ratios[`${label}_refit_throughput_vs_memcpy`] = report.bytesMoved / refitSeconds / memcpy;
    ratios[`${label}_refit_vs_compile_time`] = refitSeconds / compileSeconds;
    // The cost of read-back verification: (refit + weightDigests) against the refit alone (goal <= 1.1).
    ratios[`${label}_readback_ratio`] = (refitSeconds + readbackSeconds) / refitSeconds;
    ratios[`${label}_readback_throughput_vs_memcpy`] = bytes / readbackSeconds / memcpy;
    ratios[`${label}_plan_vs_refit_time`] = planSeconds / refitSeconds;
    ratios[`${label}_plan_read_throughput_vs_memcpy`] = bytes / planSeconds / memcpy;
    ratios[`${label}_peak_extra_memory_vs_largest_tensor`] = (peak - baseline) / largestTensorBytes;
    ratios[`${label}_peak_extra_memory_vs_model`] = (peak - baseline) / bytes;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
};

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  const memcpy = await hostMemcpyBandwidth();
  figures.host_memcpy_bandwidth = { value: memcpy, unit: 'B/s' };
  await measure('1GiB', 2 ** 30, memcpy, figures, ratios);
  // The 4 GiB model needs about 14 GiB of memory and a few minutes; TRT_REFIT_BENCH_4G=0 skips it.
  if (process.env.TRT_REFIT_BENCH_4G !== '0') await measure('4GiB', 4 * 2 ** 30, memcpy, figures, ratios);
  else figures['4GiB_skipped'] = { value: 1, unit: 'flag (TRT_REFIT_BENCH_4G=0)' };
  writeResult('refit-e2e', figures, ratios);
};
