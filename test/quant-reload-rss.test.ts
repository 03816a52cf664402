/**
 * Layerwise reload memory, measured through the process: a fresh process holding an engine of 6 FC layers
 * of 2048 x 2048 (16 MiB each in float32, 96 MiB in all) reloads a checkpoint, and its anonymous memory
 * never grows by more than one layer's float32 weights plus a fixed slack for the runtime, from a
 * full-precision source and from a pre-quantized one, into quantized and float engines (a quantized
 * checkpoint into a float engine is dequantized one layer at a time). Linux only (/proc/self/status).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeSafetensors } from '../src/safetensors/index.js';
import { packInt4, quantize, type QuantFormat } from '../src/quant/reference.js';
import type { TensorToWrite } from '../src/safetensors/index.js';
import { rng } from './support/networks.js';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const child = join(repoRoot, 'test', 'support', 'quant-reload-child.ts');
const LAYERS = 6;
const WIDTH = 2048;
const layerBytes = WIDTH * WIDTH * 4;
const slack = 8 << 20; // V8, koffi and allocator overhead (the sampler itself allocates nothing per sample)

/** A checkpoint of the FC stack: float32, or quantized (compressed-tensors naming) with the reference quantizer. */
export const stackCheckpoint = (layers: number, width: number, format: QuantFormat | 'fp32', seed = 1): TensorToWrite[] => {
  const r = rng(seed);
  const out: TensorToWrite[] = [];
  const g = { channels: width, depth: width, transposed: true };
  for (let i = 0; i < layers; i++) {
    const w = new Float32Array(width * width);
    for (let k = 0; k < w.length; k++) w[k] = (r() - 0.5) * 0.04;
    const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    if (format === 'fp32') out.push({ name: `fc${i}.weight`, dtype: 'F32', shape: [width, width], data: bytes(w) });
    else {
      const q = quantize(format, w, g);
      if (format.kind === 'int4') out.push({ name: `fc${i}.weight`, dtype: 'U8', shape: [width, width / 2], data: packInt4(q.values as Int8Array, g) });
      else out.push({ name: `fc${i}.weight`, dtype: format.kind === 'int8' ? 'I8' : 'F8_E4M3', shape: [width, width], data: bytes(q.values) });
      out.push({ name: `fc${i}.weight_scale`, dtype: 'F32', shape: [width, q.scales.length / width], data: bytes(q.scales) });
    }
    out.push({ name: `fc${i}.bias`, dtype: 'F32', shape: [width], data: bytes(new Float32Array(width).fill(0.01)) });
  }
  return out;
};

export const runReloadChild = (checkpoint: string, layers: number, width: number, format: string) => {
  const r = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', child, checkpoint, String(layers), String(width), format], { cwd: repoRoot, encoding: 'utf8', env: process.env });
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout) as { peakGrowth: number; seconds: number; summary: { copied: number; dequantized: number; float: number }; weightBytes: number };
};

describe.runIf(existsSync('/proc/self/status'))('peak extra memory of a layerwise reload is bounded by one layer', () => {
  let dir = '';
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'quant-reload-'));
    await writeSafetensors(join(dir, 'fp32.safetensors'), stackCheckpoint(LAYERS, WIDTH, 'fp32'));
    await writeSafetensors(join(dir, 'int8.safetensors'), stackCheckpoint(LAYERS, WIDTH, { kind: 'int8' }));
    await writeSafetensors(join(dir, 'int4.safetensors'), stackCheckpoint(LAYERS, WIDTH, { kind: 'int4', groupSize: 128 }));
  }, 120_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const cases: Array<[string, string, 'copied' | 'dequantized' | 'float']> = [
    ['fp32', 'int8', 'float'], // the engine quantizes into its own buffers
    ['int8', 'int8', 'copied'], // pre-quantized: views of the mapped checkpoint
    ['int4', 'int4', 'copied'], // pre-quantized int4: unpacked one layer at a time in C
    ['int8', 'fp32', 'dequantized'], // dequantized one layer at a time into a reused buffer
    ['fp32', 'fp32', 'float'],
  ];
  for (const [source, engine, mode] of cases) {
    it(`${source} checkpoint into a ${engine} engine`, () => {
      const m = runReloadChild(join(dir, `${source}.safetensors`), LAYERS, WIDTH, engine);
      expect(m.summary[mode]).toBe(LAYERS * (mode === 'float' ? 2 : 1));
      expect(m.peakGrowth).toBeLessThan(layerBytes + slack);
      expect(layerBytes + slack).toBeLessThan(LAYERS * layerBytes); // the bound is below a second copy of the model
    }, 60_000);
  }
});
