/**
 * The TypeScript reference quantizer against libtrtshim, bit for bit: values and scales quantized in
 * TypeScript and handed to the engine already quantized (setQuantizedWeights, packed without
 * re-quantizing) give the engine file that a build from the float weights gives, so the pre-quantized
 * path equals the re-quantize path. And the reference's own invariants (e4m3 codes, int4 packing, bounds).
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, type BuildOptions, type Engine } from '../ffi/engine.js';
import { NativeError, Status } from '../ffi/library.js';
import type { NetworkDefinition } from '../src/network/types.js';
import { dequantize, e4m3ToFloat, floatToE4m3, packInt4, quantize, roundEven, unpackInt4, type QuantFormat } from '../src/quant/reference.js';
import { allUpdates, families, floatValues, reweight } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const seed = fc.integer({ min: 0, max: 0x7fffffff });
const formats: ReadonlyArray<[QuantFormat, BuildOptions]> = [
  [{ kind: 'int8' }, { weightFormat: 'int8' }],
  [{ kind: 'fp8_e4m3' }, { weightFormat: 'fp8_e4m3' }],
  [{ kind: 'int4', groupSize: 32 }, { weightFormat: 'int4', int4GroupSize: 32 }],
  [{ kind: 'int4', groupSize: 64 }, { weightFormat: 'int4', int4GroupSize: 64 }],
];
const families4 = fc.oneof(families.mlp(), families.qkv(), families.conv(), families.wide(), families.fanout(), families.shape());

/** Refits every weight of netB: kernels the engine holds quantized through the TypeScript quantizer, the
 *  rest (and kernels the engine refuses pre-quantized: folded with a batch norm) as floats. */
const refitPreQuantized = (engine: Engine, net: NetworkDefinition, format: QuantFormat): number => {
  const formats = new Map(engine.kernelFormats().map((f) => [`${f.layer}/${f.role}`, f]));
  let quantized = 0;
  using refitter = engine.createRefitter();
  for (const u of allUpdates(net)) {
    const f = formats.get(`${u.layer}/${u.role}`);
    if (f === undefined || f.format === 'asPrecision') {
      refitter.setWeights(u.layer, u.role, u.weights);
      continue;
    }
    const shape = u.weights.shape;
    const geometry = { channels: shape[0], depth: shape.slice(1).reduce((a, b) => a * b, 1), transposed: true };
    const q = quantize(format, floatValues(u.weights), geometry);
    const values = format.kind === 'int4' ? packInt4(q.values as Int8Array, geometry) : q.values;
    try {
      refitter.setQuantizedWeights(u.layer, u.role, { format: f.format, groupSize: f.groupSize, values, scales: q.scales });
      quantized++;
    } catch (e) {
      expect(e).toBeInstanceOf(NativeError);
      expect((e as NativeError).status).toBe(Status.UNSUPPORTED);
      expect((e as NativeError).message).toMatch(new RegExp(`weight '${u.layer}' kernel: a batch norm is folded`));
      refitter.setWeights(u.layer, u.role, u.weights);
    }
  }
  refitter.apply();
  return quantized;
};

describe('pre-quantized path == re-quantize path (TypeScript reference == libtrtshim, bit for bit)', () => {
  for (const [format, options] of formats) {
    test.prop([families4, seed], { numRuns: runs(30) })(format.kind + (format.groupSize ?? ''), (c, seedB) => {
      const netB = reweight(c.net, seedB);
      using preQuantized = buildEngine(c.net, options);
      const count = refitPreQuantized(preQuantized, netB, format);
      using rebuilt = buildEngine(netB, options);
      expect(Buffer.from(preQuantized.serialize()).equals(Buffer.from(rebuilt.serialize()))).toBe(true);
      if (c.family === 'mlp') expect(count).toBeGreaterThan(0);
    });
  }
});

describe('reference quantizer', () => {
  it('rounds half to even', () => {
    expect([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4999, 2.5001].map(roundEven)).toEqual([0, 2, 2, 0, -2, -2, 2, 3]);
  });
  it('every finite e4m3 code round-trips through its value; NaN codes are 0x7f and 0xff', () => {
    for (let code = 0; code < 256; code++) {
      const v = e4m3ToFloat(code);
      if ((code & 0x7f) === 0x7f) expect(v).toBeNaN();
      else expect(floatToE4m3(v)).toBe(code);
    }
    expect(e4m3ToFloat(0x7e)).toBe(448);
    expect(floatToE4m3(1e9)).toBe(0x7e);
    expect(e4m3ToFloat(0x01)).toBe(2 ** -9);
  });
  test.prop([fc.integer({ min: 1, max: 9 }), fc.integer({ min: 1, max: 70 }), fc.boolean(), seed])('int4 packing round-trips', (channels, depth, transposed, s) => {
    const g = { channels, depth, transposed };
    const values = Int8Array.from({ length: channels * depth }, (_, i) => ((i * 7 + s) % 16) - 8);
    expect(Array.from(unpackInt4(packInt4(values, g), g))).toEqual(Array.from(values));
  });
  const weights = fc.integer({ min: 1, max: 6 }).chain((channels) =>
    fc.integer({ min: 1, max: 150 }).chain((depth) =>
      fc.tuple(
        fc.constant(channels),
        fc.constant(depth),
        // tiny magnitudes flushed to 0: a scale of max / 448 underflows for denormal weights (out of scope)
        fc.float32Array({ minLength: channels * depth, maxLength: channels * depth, noNaN: true, noDefaultInfinity: true, min: -1e6, max: 1e6 }).map((a) => a.map((v) => (Math.abs(v) < 1e-30 ? 0 : v))),
      ),
    ),
  );
  test.prop([weights, fc.constantFrom<QuantFormat>({ kind: 'int8' }, { kind: 'fp8_e4m3' }, { kind: 'int4', groupSize: 32 }, { kind: 'int4', groupSize: 128 })])(
    'dequantize(quantize(w)) is within half a step of w (fp8: within 2^-4 relative, or an e4m3 subnormal step)',
    ([channels, depth, w], format) => {
      const g = { channels, depth, transposed: true };
      const q = quantize(format, w, g);
      const back = dequantize(format, q, g);
      const groups = q.scales.length / channels;
      const rows = Math.ceil(depth / groups);
      for (let j = 0; j < channels; j++)
        for (let k = 0; k < depth; k++) {
          const scale = q.scales[j * groups + Math.floor(k / (format.groupSize ?? rows))];
          const err = Math.abs(back[j * depth + k] - w[j * depth + k]);
          const bound = format.kind === 'fp8_e4m3' ? Math.max(Math.abs(w[j * depth + k]) * 2 ** -4, scale * 2 ** -10) * 1.001 : (scale / 2) * 1.001 + 1e-30;
          expect(err).toBeLessThanOrEqual(bound);
        }
    },
  );
});
