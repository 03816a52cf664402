/**
 * Claim: reloading a model into a quantized engine, from a full-precision or an already-quantized
 * checkpoint, takes peak extra memory of at most one layer (never a second copy of the model); quantized
 * kernels cut weight memory, at an inference latency measured here against float32.
 *
 * A 1 GiB synthetic FC stack (16 layers of 4096 x 4096 float32). For each format (fp32, int8, fp8, int4
 * groups of 128): reload time and peak anonymous-memory growth in a fresh process (test/support/
 * quant-reload-child.ts), from the float32 checkpoint and from a checkpoint quantized by the reference
 * quantizer (compressed-tensors naming); and run latency on a batch of 4 rows. Ratios: peak growth over
 * one layer's float32 bytes, reload throughput over host memcpy bandwidth, latency over float32's.
 * QUANT_BENCH_LAYERS / QUANT_BENCH_WIDTH make the model smaller.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildEngine, type BuildOptions } from '../ffi/engine.js';
import { packInt4, quantize, type QuantFormat } from '../src/quant/reference.js';
import { writeSafetensors, type TensorToWrite } from '../src/safetensors/index.js';
import { fcStack } from '../test/support/fc-stack.js';
import { bestOf, hostMemcpyBandwidth, writeResult, type Figure } from './lib.js';

const envInt = (name: string, fallback: number): number => {
  const v = Number(process.env[name]);
  return Number.isInteger(v) && v > 0 ? v : fallback;
};
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const child = join(root, 'test', 'support', 'quant-reload-child.ts');

const layerWeights = (width: number, salt: number): Float32Array => {
  const out = new Float32Array(width * width);
  let h = salt | 0;
  for (let i = 0; i < out.length; i++) {
    h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d) + 0x6d2b79f5;
    out[i] = ((h >>> 8) / 16777216 - 0.5) * 0.03;
  }
  return out;
};
const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** Tensors produced one layer at a time as the writer reaches them (the bench never holds the model). */
const checkpoint = (layers: number, width: number, format: QuantFormat | 'fp32'): TensorToWrite[] => {
  const g = { channels: width, depth: width, transposed: true };
  const cache = new Map<number, { values: Uint8Array; scales: Float32Array }>();
  const quantized = (i: number) => {
    if (format === 'fp32') throw new Error('unreachable');
    let q = cache.get(i);
    if (q === undefined) {
      cache.clear();
      const r = quantize(format, layerWeights(width, i + 1), g);
      q = { values: format.kind === 'int4' ? packInt4(r.values as Int8Array, g) : bytes(r.values), scales: r.scales };
      cache.set(i, q);
    }
    return q;
  };
  return Array.from({ length: layers }, (_, i): TensorToWrite[] =>
    format === 'fp32'
      ? [{ name: `fc${i}.weight`, dtype: 'F32', shape: [width, width], data: () => bytes(layerWeights(width, i + 1)) }]
      : [
          { name: `fc${i}.weight`, dtype: format.kind === 'int4' ? 'U8' : format.kind === 'int8' ? 'I8' : 'F8_E4M3', shape: format.kind === 'int4' ? [width, width / 2] : [width, width], data: () => quantized(i).values },
          { name: `fc${i}.weight_scale`, dtype: 'F32', shape: format.kind === 'int4' ? [width, Math.ceil(width / 128)] : [width, 1], data: () => bytes(quantized(i).scales) },
        ],
  ).flat();
};

const formats: Array<{ name: string; quant: QuantFormat | 'fp32'; options: BuildOptions }> = [
  { name: 'fp32', quant: 'fp32', options: {} },
  { name: 'int8', quant: { kind: 'int8' }, options: { weightFormat: 'int8' } },
  { name: 'fp8', quant: { kind: 'fp8_e4m3' }, options: { weightFormat: 'fp8_e4m3' } },
  { name: 'int4', quant: { kind: 'int4', groupSize: 128 }, options: { weightFormat: 'int4', int4GroupSize: 128 } },
];

export const run = async () => {
  const layers = envInt('QUANT_BENCH_LAYERS', 16);
  const width = envInt('QUANT_BENCH_WIDTH', 4096);
  const layerBytes = width * width * 4;
  const dir = mkdtempSync(join(tmpdir(), 'quant-bench-'));
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  try {
    const bandwidth = await hostMemcpyBandwidth();
    figures.host_memcpy_bandwidth = { value: bandwidth / 1e9, unit: 'GB/s' };
    figures.model_fp32_bytes = { value: layers * layerBytes, unit: 'bytes' };
    figures.layer_fp32_bytes = { value: layerBytes, unit: 'bytes' };
    for (const f of formats) {
      await writeSafetensors(join(dir, `${f.name}.safetensors`), checkpoint(layers, width, f.quant));
    }
    const inputs = { x: new Float32Array(4 * width).fill(0.5) };
    let fp32Latency = 0;
    for (const f of formats) {
      // Inference latency of the format against float32.
      {
        using engine = buildEngine(fcStack(layers, width, 0.001), f.options);
        using context = engine.createContext();
        const latency = await bestOf(5, () => context.run(inputs));
        if (f.name === 'fp32') fp32Latency = latency;
        figures[`latency_${f.name}`] = { value: latency * 1e3, unit: 'ms' };
        figures[`weight_bytes_${f.name}`] = { value: engine.info().weightBytes, unit: 'bytes' };
        ratios[`latency_${f.name}_over_fp32`] = latency / fp32Latency;
      }
      // Reloads in a fresh process: from float32, and from the checkpoint of the engine's own format.
      const sources = f.name === 'fp32' ? ['fp32', 'int8'] : ['fp32', f.name];
      for (const source of sources) {
        const r = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', child, join(dir, `${source}.safetensors`), String(layers), String(width), f.name], {
          cwd: root,
          encoding: 'utf8',
          maxBuffer: 1 << 20,
        });
        if (r.status !== 0) throw new Error(`reload child failed: ${r.stderr}`);
        const m = JSON.parse(r.stdout) as { peakGrowth: number; seconds: number };
        const key = `reload_${f.name}_from_${source === 'fp32' ? 'fp32' : source === f.name ? 'prequantized' : source}`;
        figures[`${key}_seconds`] = { value: m.seconds, unit: 's' };
        figures[`${key}_peak_extra_bytes`] = { value: m.peakGrowth, unit: 'bytes' };
        ratios[`${key}_peak_extra_over_one_layer`] = m.peakGrowth / layerBytes;
        ratios[`${key}_fp32_bytes_per_second_over_memcpy`] = (layers * layerBytes) / m.seconds / bandwidth;
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const result = writeResult('quant-reload', figures, ratios);
  for (const [k, v] of Object.entries(result.figures)) console.log(`${k.padEnd(52)} ${v.value.toPrecision(4)} ${v.unit}`);
  for (const [k, v] of Object.entries(result.ratios)) console.log(`${k.padEnd(52)} ${v.toPrecision(3)}`);
  return result;
};
