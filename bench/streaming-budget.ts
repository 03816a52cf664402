/**
 * Claim: a streaming engine runs under any weight budget at about the bound max(compute time, streamed
 * bytes / copy bandwidth), because the prefetching worker overlaps copies with compute; and its resident
 * weight memory stays within budget + window.
 *
 * A 1 GiB synthetic MLP (16 fully connected layers of 4096 x 4096 float32: 256M weights), run on a batch
 * of rows at budgets of 0%, 10%, 25%, 50% and 100% of its streamable weights. Compute time is the latency
 * at 100% (nothing streamed); the copy bandwidth is the host memcpy bandwidth measured in the same run.
 * Set STREAMING_BENCH_LAYERS / STREAMING_BENCH_WIDTH / STREAMING_BENCH_ROWS for a smaller model, and
 * STREAMING_BENCH_THREADS for the engine's compute threads (default: one per core).
 */
import { buildEngine, type Engine } from '../ffi/index.js';
import type { Layer, NetworkDefinition } from '../src/network/types.js';
import { bestOf, hostMemcpyBandwidth, writeResult, type Figure } from './lib.js';

const envInt = (name: string, fallback: number): number => {
  const v = Number(process.env[name]);
  return Number.isInteger(v) && v > 0 ? v : fallback;
};

/** Small deterministic values (a multiplicative hash), cheap to make for 256M weights. */
const weights = (count: number, salt: number): Float32Array => {
  const out = new Float32Array(count);
  let h = salt | 0;
  for (let i = 0; i < count; i++) {
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) + 0x6d2b79f5;
    out[i] = ((h >>> 8) / 16777216 - 0.5) * 0.03;
  }
  return out;
};

export const streamingMlp = (layers: number, width: number, rows: number): NetworkDefinition => {
  const ls: Layer[] = [];
  for (let i = 0; i < layers; i++) {
    ls.push({
      kind: 'fullyConnected',
      name: `fc${i}`,
      output: `fc${i}`,
      input: i === 0 ? 'x' : `act${i - 1}`,
      outFeatures: width,
      kernel: { dtype: 'float32', shape: [width, width], data: weights(width * width, i + 1) },
      bias: { dtype: 'float32', shape: [width], data: weights(width, 1000 + i) },
    });
    if (i + 1 < layers) ls.push({ kind: 'unary', name: `act${i}`, output: `act${i}`, input: `fc${i}`, op: 'gelu_tanh' });
  }
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [rows, width] }], layers: ls, outputs: [{ tensor: `fc${layers - 1}`, name: 'y' }] };
};

const budgets = [0, 10, 25, 50, 100] as const;

export const run = async (): Promise<void> => {
  const layers = envInt('STREAMING_BENCH_LAYERS', 16);
  const width = envInt('STREAMING_BENCH_WIDTH', 4096);
  const rows = envInt('STREAMING_BENCH_ROWS', 16);
  const numThreads = envInt('STREAMING_BENCH_THREADS', 0);
  let engine: Engine;
  {
    const net = streamingMlp(layers, width, rows);
    engine = buildEngine(net, { weightStreaming: true, numThreads });
  } // the network's own copy of the weights can go now
  using _engine = engine;
  const total = engine.streamableWeightBytes();
  const x = new Float32Array(rows * width).map((_, i) => Math.sin(i * 0.37));
  const y = new Float32Array(rows * width);
  using context = engine.createContext();
  context.setTensor('x', x);
  context.setTensor('y', y);
  const bandwidth = await hostMemcpyBandwidth();

  const figures: Record<string, Figure> = {
    streamable_weights: { value: total / 2 ** 20, unit: 'MiB' },
    copy_bandwidth: { value: bandwidth / 1e9, unit: 'GB/s' },
  };
  const ratios: Record<string, number> = {};
  const measured: Array<{ percent: number; latency: number; streamed: number }> = [];
  for (const percent of [...budgets].reverse()) {
    // 100% first: its latency is the compute time of the bound.
    engine.setWeightStreamingBudget(Math.floor((total * percent) / 100));
    const latency = await bestOf(3, () => context.execute(), 1); // the warm-up run fills the resident arena
    const s = engine.weightStreamingStats();
    measured.push({ percent, latency, streamed: s.streamedBytes });
    figures[`latency_${percent}pct`] = { value: latency * 1e3, unit: 'ms' };
    figures[`resident_weights_${percent}pct`] = { value: s.residentBytes / 2 ** 20, unit: 'MiB' };
    figures[`window_${percent}pct`] = { value: s.windowBytes / 2 ** 20, unit: 'MiB' };
    figures[`peak_weight_memory_${percent}pct`] = { value: s.peakBytes / 2 ** 20, unit: 'MiB' };
    figures[`streamed_per_run_${percent}pct`] = { value: s.streamedBytes / 2 ** 20, unit: 'MiB' };
    ratios[`peak_weight_memory_over_budget_plus_window_${percent}pct`] = s.peakBytes / Math.max(1, s.budgetBytes + s.windowBytes);
  }
  const compute = measured.find((m) => m.percent === 100)!.latency;
  figures.compute_time = { value: compute * 1e3, unit: 'ms' };
  for (const m of measured) {
    const bound = Math.max(compute, m.streamed / bandwidth);
    figures[`bound_${m.percent}pct`] = { value: bound * 1e3, unit: 'ms' };
    ratios[`latency_over_bound_${m.percent}pct`] = m.latency / bound;
  }
  writeResult('streaming-budget', figures, ratios);
};
