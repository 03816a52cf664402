/** Conversions to and from float32: TypeScript and libtrtshim agree bit for bit on every pattern, and
 *  both agree with values fixed by the formats' definitions. */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { nativeFromFloat32, nativeToFloat32 } from '../ffi/mapping.js';
import { fromFloat32, toFloat32 } from '../src/safetensors/convert.js';

const DT = { F32: 0, F16: 1, BF16: 2, I32: 3, I64: 4, I8: 5, U8: 6, BOOL: 7, F8_E4M3: 8, F8_E5M2: 9, F64: 10 } as const;
const bitsOf = (a: Float32Array): Uint32Array => new Uint32Array(a.buffer, a.byteOffset, a.length);
const allPatterns16 = (): Uint8Array => new Uint8Array(Uint16Array.from({ length: 65536 }, (_, i) => i).buffer);
const allPatterns8 = (): Uint8Array => Uint8Array.from({ length: 256 }, (_, i) => i);
const f32FromBits = (bits: number): number => new Float32Array(new Uint32Array([bits]).buffer)[0] as number;

describe('to float32, TypeScript against native, every pattern', () => {
  for (const dtype of ['F16', 'BF16'] as const) {
    it(`${dtype}: all 65536 patterns`, () => {
      const bytes = allPatterns16();
      expect(bitsOf(toFloat32(dtype, bytes))).toEqual(bitsOf(nativeToFloat32(DT[dtype], bytes, 65536)));
    });
  }
  for (const dtype of ['F8_E4M3', 'F8_E5M2', 'I8', 'U8', 'BOOL'] as const) {
    it(`${dtype}: all 256 patterns`, () => {
      const bytes = allPatterns8();
      expect(bitsOf(toFloat32(dtype, bytes))).toEqual(bitsOf(nativeToFloat32(DT[dtype], bytes, 256)));
    });
  }
});

describe('values fixed by the formats', () => {
  const one = (dtype: 'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2', pattern: number): number => {
    const bytes = dtype === 'F16' || dtype === 'BF16' ? new Uint8Array([pattern & 0xff, pattern >> 8]) : new Uint8Array([pattern]);
    const ts = toFloat32(dtype, bytes)[0] as number;
    const c = nativeToFloat32(DT[dtype], bytes, 1)[0] as number;
    expect(Object.is(ts, c) || (Number.isNaN(ts) && Number.isNaN(c))).toBe(true);
    return ts;
  };
  it('F16', () => {
    expect(one('F16', 0x3c00)).toBe(1);
    expect(one('F16', 0xc000)).toBe(-2);
    expect(one('F16', 0x7bff)).toBe(65504);
    expect(one('F16', 0x0001)).toBe(2 ** -24);
    expect(one('F16', 0x0400)).toBe(2 ** -14);
    expect(one('F16', 0x7c00)).toBe(Infinity);
    expect(one('F16', 0xfc00)).toBe(-Infinity);
    expect(one('F16', 0x7e00)).toBeNaN();
    expect(Object.is(one('F16', 0x8000), -0)).toBe(true);
  });
  it('BF16', () => {
    expect(one('BF16', 0x3f80)).toBe(1);
    expect(one('BF16', 0x4049)).toBe(3.140625);
    expect(one('BF16', 0x7f80)).toBe(Infinity);
    expect(one('BF16', 0x0001)).toBe(2 ** -133);
  });
  it('F8_E4M3 (e4m3fn: no infinities, S.1111.111 is NaN)', () => {
    expect(one('F8_E4M3', 0x38)).toBe(1);
    expect(one('F8_E4M3', 0x7e)).toBe(448);
    expect(one('F8_E4M3', 0xfe)).toBe(-448);
    expect(one('F8_E4M3', 0x01)).toBe(2 ** -9);
    expect(one('F8_E4M3', 0x08)).toBe(2 ** -6);
    expect(one('F8_E4M3', 0x78)).toBe(256);
    expect(one('F8_E4M3', 0x7f)).toBeNaN();
    expect(one('F8_E4M3', 0xff)).toBeNaN();
  });
  it('F8_E5M2', () => {
    expect(one('F8_E5M2', 0x3c)).toBe(1);
    expect(one('F8_E5M2', 0x7b)).toBe(57344);
    expect(one('F8_E5M2', 0x01)).toBe(2 ** -16);
    expect(one('F8_E5M2', 0x7c)).toBe(Infinity);
    expect(one('F8_E5M2', 0x7d)).toBeNaN();
  });
  it('TS-only forms: FNUZ and E8M0', () => {
    expect(toFloat32('F8_E4M3FNUZ', new Uint8Array([0x40, 0x80, 0x7f, 0x01]))).toEqual(new Float32Array([1, NaN, 240, 2 ** -10]));
    expect(toFloat32('F8_E5M2FNUZ', new Uint8Array([0x40, 0x80, 0x7f, 0x01]))).toEqual(new Float32Array([1, NaN, 57344, 2 ** -17]));
    expect(toFloat32('F8_E8M0', new Uint8Array([127, 0, 254, 255]))).toEqual(new Float32Array([1, 2 ** -127, 2 ** 127, NaN]));
  });
});

describe('from float32 (round to nearest even)', () => {
  const ulpNeighbours = (): Float32Array => {
    // Every F16 value, its F32 neighbours and the midpoints to the next F16 value: where rounding decides.
    const halves = bitsOf(toFloat32('F16', allPatterns16()));
    const out = new Uint32Array(65536 * 5);
    for (let i = 0; i < 65536; i++) {
      const b = halves[i] as number;
      out.set([b, b + 1, b - 1, b + 0x1000, b + 0xfff], i * 5);
    }
    return new Float32Array(out.buffer);
  };
  for (const dtype of ['F16', 'BF16'] as const) {
    it(`${dtype}: TypeScript equals native around every F16 value and its rounding midpoints`, () => {
      const values = ulpNeighbours();
      expect(Buffer.from(fromFloat32(values, dtype)).equals(Buffer.from(nativeFromFloat32(values, DT[dtype])))).toBe(true);
    });
    test.prop([fc.array(fc.integer({ min: 0, max: 0xffffffff }), { minLength: 1, maxLength: 2000 })])(
      `${dtype}: TypeScript equals native on random float32 bit patterns`,
      (patterns) => {
        const values = new Float32Array(Uint32Array.from(patterns).buffer);
        expect(Buffer.from(fromFloat32(values, dtype)).equals(Buffer.from(nativeFromFloat32(values, DT[dtype])))).toBe(true);
      },
    );
  }

  test.prop([fc.float({ noNaN: true, noDefaultInfinity: true }), fc.constantFrom('F16' as const, 'BF16' as const)])(
    'the result is the nearest representable value, ties to an even pattern',
    (x, dtype) => {
      const pattern = new Uint16Array(fromFloat32(new Float32Array([x]), dtype).buffer)[0] as number;
      const decode = (p: number): number => toFloat32(dtype, new Uint8Array([p & 0xff, p >> 8]))[0] as number;
      const got = decode(pattern);
      const max = dtype === 'F16' ? 65504 : f32FromBits(0x7f7f0000);
      const overflowAt = dtype === 'F16' ? 65520 : f32FromBits(0x7f7f8000);
      if (Math.abs(x) >= overflowAt) {
        expect(got).toBe(Math.sign(x) * Infinity);
        return;
      }
      expect(Math.abs(got)).toBeLessThanOrEqual(max);
      const error = Math.abs(x - got);
      for (const neighbour of [pattern - 1, pattern + 1]) {
        const other = decode(neighbour & 0xffff);
        if (!Number.isFinite(other) || Math.sign(other) * Math.sign(got) < 0) continue;
        const otherError = Math.abs(x - other);
        expect(error).toBeLessThanOrEqual(otherError);
        if (error === otherError && x !== got) expect(pattern & 1).toBe(0);
      }
      if (x === 0) expect(Object.is(got, x)).toBe(true);
    },
  );

  it('NaN stays NaN and overflow becomes infinity', () => {
    const values = new Float32Array([NaN, 1e6, -1e6, 3.4e38]);
    expect(toFloat32('F16', fromFloat32(values, 'F16'))).toEqual(new Float32Array([NaN, Infinity, -Infinity, Infinity]));
    expect(toFloat32('BF16', fromFloat32(values, 'BF16'))[3]).toBe(Infinity);
  });
});

describe('integer and float64 sources, TypeScript against native', () => {
  test.prop([fc.array(fc.double(), { maxLength: 200 })])('F64', (values) => {
    const bytes = new Uint8Array(Float64Array.from(values).buffer);
    const ts = toFloat32('F64', bytes);
    const c = nativeToFloat32(DT.F64, bytes, values.length);
    ts.forEach((v, i) => expect(Object.is(v, c[i]) || (Number.isNaN(v) && Number.isNaN(c[i] as number))).toBe(true));
  });
  test.prop([fc.array(fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }), { maxLength: 200 })])('I64 (rounded once)', (values) => {
    const bytes = new Uint8Array(BigInt64Array.from(values).buffer);
    expect(bitsOf(toFloat32('I64', bytes))).toEqual(bitsOf(nativeToFloat32(DT.I64, bytes, values.length)));
  });
  it('I64 just above a float32 midpoint rounds up (double rounding would not)', () => {
    // float32 steps by 2^39 in [2^62, 2^63); 2^62 + 2^38 + 1 is just above the midpoint. Through a double it
    // would first become 2^62 + 2^38 (a tie) and then 2^62.
    const above = (1n << 62n) + (1n << 38n) + 1n;
    const bytes = new Uint8Array(BigInt64Array.from([above, -above]).buffer);
    const expected = new Float32Array([2 ** 62 + 2 ** 39, -(2 ** 62 + 2 ** 39)]);
    expect(toFloat32('I64', bytes)).toEqual(expected);
    expect(nativeToFloat32(DT.I64, bytes, 2)).toEqual(expected);
  });
  test.prop([fc.array(fc.integer(), { maxLength: 200 })])('I32', (values) => {
    const bytes = new Uint8Array(Int32Array.from(values).buffer);
    expect(bitsOf(toFloat32('I32', bytes))).toEqual(bitsOf(nativeToFloat32(DT.I32, bytes, values.length)));
  });
  test.prop([fc.uint8Array({ maxLength: 64 }), fc.integer({ min: 0, max: 3 })])('unaligned F32 and F16 sources', (raw, shift) => {
    const buffer = new Uint8Array(raw.length + shift);
    buffer.set(raw, shift);
    const f32 = buffer.subarray(shift, shift + raw.length - (raw.length % 4));
    expect(bitsOf(toFloat32('F32', f32))).toEqual(bitsOf(nativeToFloat32(DT.F32, f32, f32.length / 4)));
    const f16 = buffer.subarray(shift, shift + raw.length - (raw.length % 2));
    expect(bitsOf(toFloat32('F16', f16))).toEqual(bitsOf(nativeToFloat32(DT.F16, f16, f16.length / 2)));
  });
});
