/**
 * Quantized checkpoints (compressed-tensors / vLLM naming) reloaded into engines: copied into a quantized
 * engine without re-quantizing (== a build from the float weights, bit for bit), dequantized into a float
 * engine, checked against the engine's format with errors that name the tensor and change nothing.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, type BuildOptions, type Engine } from '../ffi/engine.js';
import { NativeError, Status } from '../ffi/library.js';
import type { Layer, NetworkDefinition } from '../src/network/types.js';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../src/safetensors/index.js';
import { QuantError } from '../src/quant/errors.js';
import { dequantize, quantize, type QuantFormat } from '../src/quant/reference.js';
import { reloadCheckpoint } from '../src/quant/reload.js';
import { families, floatValues, randomWeights, reweight, rng, withWeights } from './support/networks.js';
import { quantizedCheckpoint } from './support/quant.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const dir = mkdtempSync(join(tmpdir(), 'quant-checkpoint-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let fileCount = 0;

const withCheckpoint = async <T>(tensors: TensorToWrite[], fn: (file: Awaited<ReturnType<typeof openSafetensors>>) => T): Promise<T> => {
  const path = join(dir, `c${fileCount++}.safetensors`);
  await writeSafetensors(path, tensors);
  using file = await openSafetensors(path);
  return fn(file);
};
const fileOf = (e: Engine) => Buffer.from(e.serialize());
const floatCheckpoint = (net: NetworkDefinition): TensorToWrite[] =>
  net.layers.flatMap((l) =>
    l.kind === 'fullyConnected' || l.kind === 'convolution'
      ? [
          { name: `${l.name}.weight`, dtype: 'F32' as const, shape: l.kernel.shape, data: new Uint8Array(floatValues(l.kernel).buffer.slice(0)) },
          ...(l.bias ? [{ name: `${l.name}.bias`, dtype: 'F32' as const, shape: l.bias.shape, data: new Uint8Array(floatValues(l.bias).buffer.slice(0)) }] : []),
        ]
      : [],
  );

/** fc0 100 -> 40, gelu, fc1 40 -> 7: K = 100 splits into 4 int4 groups of 32, 2 of 64, 1 of 128. */
const wideMlp = (seed: number): NetworkDefinition => {
  const r = rng(seed);
  const layers: Layer[] = [
    { kind: 'fullyConnected', name: 'fc0', input: 'x', output: 'h0', outFeatures: 40, kernel: randomWeights(r, 'float32', [40, 100], -1, 1), bias: randomWeights(r, 'float32', [40], -1, 1) },
    { kind: 'unary', name: 'act', input: 'h0', output: 'h1', op: 'gelu_erf' },
    { kind: 'fullyConnected', name: 'fc1', input: 'h1', output: 'y', outFeatures: 7, kernel: randomWeights(r, 'float32', [7, 40], -1, 1) },
  ];
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [3, 100] }], layers, outputs: [{ tensor: 'y', name: 'y' }] };
};

const cases: ReadonlyArray<[QuantFormat, BuildOptions]> = [
  [{ kind: 'int8' }, { weightFormat: 'int8' }],
  [{ kind: 'fp8_e4m3' }, { weightFormat: 'fp8_e4m3' }],
  [{ kind: 'int4', groupSize: 32 }, { weightFormat: 'int4', int4GroupSize: 32 }],
  [{ kind: 'int4', groupSize: 128 }, { weightFormat: 'int4', int4GroupSize: 128 }],
];
const nets = fc.oneof(families.mlp(), families.conv(), families.wide()).map((c) => c.net);
const hasBatchNorm = (net: NetworkDefinition) => net.layers.some((l) => l.kind === 'batchNorm');
/** netB as a reload of its quantized checkpoint leaves it: kernels of convolutions with a folded batch norm
 *  arrive dequantized (the engine quantizes them again after the fold); every other kernel is copied. */
const asReloaded = (netB: NetworkDefinition, format: QuantFormat): NetworkDefinition => {
  const folded = new Set(netB.layers.filter((l) => l.kind === 'batchNorm').map((l) => (l as { input: string }).input));
  return withWeights(netB, (layer, role, w) => {
    const l = netB.layers.find((x) => x.name === layer)!;
    if (role !== 'kernel' || l.kind !== 'convolution' || !folded.has(l.output)) return w;
    const g = { channels: w.shape[0], depth: w.shape.slice(1).reduce((a, b) => a * b, 1), transposed: true };
    return { ...w, data: dequantize(format, quantize(format, floatValues(w), g), g) };
  });
};

describe('a quantized checkpoint into an engine of its format', () => {
  for (const [format, options] of cases) {
    test.prop([nets, fc.integer({ min: 0, max: 1e9 })], { numRuns: runs(8) })(`${format.kind}${format.groupSize ?? ''}: reload == build from the float weights`, async (net, seedB) => {
      const netB = reweight(net, seedB);
      using engine = buildEngine(net, options);
      const summary = await withCheckpoint(quantizedCheckpoint(netB, { format, scaleShape: 'n1' }), (file) => reloadCheckpoint(engine, file));
      using rebuilt = buildEngine(asReloaded(netB, format), options);
      expect(fileOf(engine).equals(fileOf(rebuilt))).toBe(true);
      expect(summary.copied + summary.dequantized).toBeGreaterThan(0);
      if (!hasBatchNorm(net)) expect(summary.dequantized).toBe(0);
    });
  }
  it('int4 groups along a K of 100 (4 groups of 32), reload of a stripped engine', async () => {
    const netB = wideMlp(2);
    using stripped = buildEngine(wideMlp(1), { weightFormat: 'int4', int4GroupSize: 32, stripWeights: true });
    const summary = await withCheckpoint(quantizedCheckpoint(netB, { format: { kind: 'int4', groupSize: 32 } }), (file) => reloadCheckpoint(stripped, file));
    expect(summary).toMatchObject({ copied: 2, dequantized: 0, untouched: 0 });
    using rebuilt = buildEngine(netB, { weightFormat: 'int4', int4GroupSize: 32 });
    expect(fileOf(stripped).equals(fileOf(rebuilt))).toBe(true);
  });
  it('a full-precision checkpoint into a quantized engine is quantized by the engine', async () => {
    const netB = wideMlp(4);
    using engine = buildEngine(wideMlp(3), { weightFormat: 'fp8_e4m3' });
    const summary = await withCheckpoint(floatCheckpoint(netB), (file) => reloadCheckpoint(engine, file));
    expect(summary).toMatchObject({ copied: 0, float: 3 });
    using rebuilt = buildEngine(netB, { weightFormat: 'fp8_e4m3' });
    expect(fileOf(engine).equals(fileOf(rebuilt))).toBe(true);
  });
});

describe('a quantized checkpoint into a float engine is dequantized (w = q * scale)', () => {
  for (const [format] of cases) {
    it(`${format.kind}${format.groupSize ?? ''}`, async () => {
      const netB = wideMlp(6);
      using engine = buildEngine(wideMlp(5));
      const summary = await withCheckpoint(quantizedCheckpoint(netB, { format }), (file) => reloadCheckpoint(engine, file));
      expect(summary.dequantized).toBe(2);
      const expected = withWeights(netB, (layer, role, w) => {
        if (role !== 'kernel') return w;
        const g = { channels: w.shape[0], depth: w.shape[1], transposed: true };
        return { ...w, data: dequantize(format, quantize(format, floatValues(w), g), g) };
      });
      using rebuilt = buildEngine(expected);
      expect(fileOf(engine).equals(fileOf(rebuilt))).toBe(true);
    });
  }
  it('an asymmetric checkpoint: w = (q - zero_point) * scale', async () => {
    const netB = wideMlp(8);
    using engine = buildEngine(wideMlp(7));
    await withCheckpoint(quantizedCheckpoint(netB, { format: { kind: 'int8' }, zeroPoint: 3 }), (file) => reloadCheckpoint(engine, file));
    const expected = withWeights(netB, (layer, role, w) => {
      if (role !== 'kernel') return w;
      const g = { channels: w.shape[0], depth: w.shape[1], transposed: true };
      const q = quantize({ kind: 'int8' }, floatValues(w), g);
      return { ...w, data: dequantize({ kind: 'int8' }, q, g, new Int32Array(q.scales.length).fill(3)) };
    });
    using rebuilt = buildEngine(expected);
    expect(fileOf(engine).equals(fileOf(rebuilt))).toBe(true);
  });
});

/** Runs fn, expects a QuantError of `tag` whose message names `tensor`, and the engine unchanged. */
const expectRefused = async (engine: Engine, tensors: TensorToWrite[], tag: string, tensor: string) => {
  const before = fileOf(engine);
  const error = await withCheckpoint(tensors, (file) => {
    try {
      reloadCheckpoint(engine, file);
    } catch (e) {
      return e;
    }
    return undefined;
  });
  expect(error).toBeInstanceOf(QuantError);
  expect((error as QuantError)._tag).toBe(tag);
  expect((error as QuantError).message).toContain(tensor);
  expect(fileOf(engine).equals(before)).toBe(true);
};

describe('mismatched checkpoints are refused, naming the tensor, and change nothing', () => {
  it('wrong dtype (int8 values for an int4 engine)', async () => {
    using engine = buildEngine(wideMlp(1), { weightFormat: 'int4', int4GroupSize: 32 });
    await expectRefused(engine, quantizedCheckpoint(wideMlp(2), { format: { kind: 'int8' } }), 'FormatMismatch', 'fc0.weight');
  });
  it('wrong group size (groups of 32 for an engine of 64)', async () => {
    using engine = buildEngine(wideMlp(1), { weightFormat: 'int4', int4GroupSize: 64 });
    await expectRefused(engine, quantizedCheckpoint(wideMlp(2), { format: { kind: 'int4', groupSize: 32 } }), 'GroupSizeMismatch', 'fc0.weight_scale');
  });
  it('wrong shape (a checkpoint of another width)', async () => {
    using engine = buildEngine(wideMlp(1), { weightFormat: 'int8' });
    const other = wideMlp(2);
    const narrower = { ...other, layers: other.layers.map((l) => (l.kind === 'fullyConnected' && l.name === 'fc1' ? { ...l, kernel: randomWeights(rng(1), 'float32', [7, 20], -1, 1) } : l)) };
    await expectRefused(engine, quantizedCheckpoint(narrower, { format: { kind: 'int8' } }), 'ShapeMismatch', 'fc1.weight');
  });
  it('a non-zero zero point into a quantized engine', async () => {
    using engine = buildEngine(wideMlp(1), { weightFormat: 'int8' });
    await expectRefused(engine, quantizedCheckpoint(wideMlp(2), { format: { kind: 'int8' }, zeroPoint: 1 }), 'AsymmetricUnsupported', 'fc0.weight_zero_point');
  });
  it('a zero zero point is symmetric and accepted', async () => {
    using engine = buildEngine(wideMlp(1), { weightFormat: 'int8' });
    await withCheckpoint(quantizedCheckpoint(wideMlp(2), { format: { kind: 'int8' }, zeroPoint: 0 }), (file) => reloadCheckpoint(engine, file));
    using rebuilt = buildEngine(wideMlp(2), { weightFormat: 'int8' });
    expect(fileOf(engine).equals(fileOf(rebuilt))).toBe(true);
  });
  it('a NaN scale is refused by validation before any layer changes', async () => {
    using engine = buildEngine(wideMlp(1), { weightFormat: 'int8' });
    const tensors = quantizedCheckpoint(wideMlp(2), { format: { kind: 'int8' } });
    const scale = tensors.find((t) => t.name === 'fc1.weight_scale')!;
    new DataView((scale.data as Uint8Array).buffer, (scale.data as Uint8Array).byteOffset).setFloat32(4, Number.NaN, true);
    await expectRefused(engine, tensors, 'RefitFailed', 'fc1.weight');
  });
});

describe('Refitter.setQuantizedWeights checks against the engine (libtrtshim)', () => {
  const net = wideMlp(1);
  const g = { channels: 40, depth: 100, transposed: true };
  const errorOf = (fn: () => void): NativeError => {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(NativeError);
      return e as NativeError;
    }
    return expect.fail('expected a NativeError');
  };
  it('dtype, element counts, group size and zero points', () => {
    using engine = buildEngine(net, { weightFormat: 'int4', int4GroupSize: 32 });
    using r = engine.createRefitter();
    const q = quantize({ kind: 'int4', groupSize: 32 }, new Float32Array(4000).fill(0.5), g);
    const packed = new Uint8Array(40 * 50);
    expect(errorOf(() => r.setQuantizedWeights('fc0', 'kernel', { format: 'int8', values: new Int8Array(4000), scales: q.scales })).message).toMatch(
      /weight 'fc0' kernel: the engine holds int4 kernels in groups of 32, so the values must be uint8 \(two per byte along K\); got int8/,
    );
    expect(errorOf(() => r.setQuantizedWeights('fc0', 'kernel', { format: 'int4', groupSize: 64, values: packed, scales: q.scales })).message).toMatch(
      /weight 'fc0' kernel: the engine holds int4 kernels in groups of 32; the checkpoint's group size is 64/,
    );
    expect(errorOf(() => r.setQuantizedWeights('fc0', 'kernel', { format: 'int4', groupSize: 32, values: packed.subarray(1), scales: q.scales })).message).toMatch(
      /weight 'fc0' kernel: expected uint8 values \[40, 50\] \(2000\), got 1999/,
    );
    expect(errorOf(() => r.setQuantizedWeights('fc0', 'kernel', { format: 'int4', groupSize: 32, values: packed, scales: q.scales.subarray(40) })).message).toMatch(
      /weight 'fc0' kernel: expected float32 scales \[40, 4\] \(160\)/,
    );
    const e = errorOf(() => r.setQuantizedWeights('fc0', 'kernel', { format: 'int4', groupSize: 32, values: packed, scales: q.scales, zeroPoints: new Int8Array(160).fill(2) }));
    expect(e.status).toBe(Status.UNSUPPORTED);
    expect(e.message).toMatch(/weight 'fc0' kernel: zero point 0 is not 0: asymmetric/);
    expect(errorOf(() => r.setQuantizedWeights('fc0', 'bias', { format: 'int4', groupSize: 32, values: packed, scales: q.scales })).message).toMatch(/weight 'fc0' bias: not a GEMM or convolution kernel/);
  });
  it('a float engine refuses quantized values', () => {
    using engine = buildEngine(net);
    using r = engine.createRefitter();
    expect(errorOf(() => r.setQuantizedWeights('fc1', 'kernel', { format: 'int8', values: new Int8Array(280), scales: new Float32Array(7) })).message).toMatch(
      /weight 'fc1' kernel: the engine holds it as float32, not quantized/,
    );
  });
  it('an fp8 NaN code is refused at apply, and nothing changes', () => {
    using engine = buildEngine(net, { weightFormat: 'fp8_e4m3' });
    const before = fileOf(engine);
    using r = engine.createRefitter();
    const values = new Uint8Array(280).fill(0x38);
    values[17] = 0xff;
    r.setQuantizedWeights('fc1', 'kernel', { format: 'fp8_e4m3', values, scales: new Float32Array(7).fill(0.1) });
    expect(errorOf(() => r.apply()).message).toMatch(/weight 'fc1' kernel: value 17 is the e4m3 NaN code 0xff/);
    expect(fileOf(engine).equals(before)).toBe(true);
  });
});
