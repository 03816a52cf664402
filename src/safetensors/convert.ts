/**
 * Element conversions to float32 (and float32 to F16 / BF16), in TypeScript, bit-exact with libtrtshim's
 * convert.c (the tests compare all 65536 / 256 patterns). Conversions work on bit patterns through
 * Uint32Array so NaN payloads survive. Sources may be unaligned; they are read as little-endian bytes.
 */
import type { Dtype } from './dtypes.js';

const f32 = new Float32Array(1);
const f32Bits = new Uint32Array(f32.buffer);
const bitsOf = (value: number): number => {
  f32[0] = value;
  return f32Bits[0] as number;
};

/** IEEE half to float32 bits; infinities and NaN payloads kept. */
export const f16ToF32Bits = (h: number): number => {
  const sign = (h & 0x8000) << 16;
  const exponent = (h >>> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0x1f) return (sign | 0x7f800000 | (mantissa << 13)) >>> 0;
  if (exponent === 0) return (sign | bitsOf(mantissa * 2 ** -24)) >>> 0;
  return (sign | ((exponent + 112) << 23) | (mantissa << 13)) >>> 0;
};

export const bf16ToF32Bits = (h: number): number => (h << 16) >>> 0;

/** OCP e4m3fn: bias 7, no infinities, S.1111.111 is NaN. */
export const e4m3ToF32Bits = (b: number): number => {
  const sign = (b & 0x80) << 24;
  const exponent = (b >>> 3) & 0xf;
  const mantissa = b & 0x7;
  if (exponent === 0xf && mantissa === 0x7) return (sign | 0x7fc00000) >>> 0;
  if (exponent === 0) return (sign | bitsOf(mantissa * 2 ** -9)) >>> 0;
  return (sign | ((exponent + 120) << 23) | (mantissa << 20)) >>> 0;
};

/** e5m2 is the upper byte of an IEEE half. */
export const e5m2ToF32Bits = (b: number): number => f16ToF32Bits(b << 8);

/** FNUZ forms (AMD): one NaN (0x80), no infinities, no negative zero; bias 8 (e4m3) or 16 (e5m2). */
const fnuzToF32Bits = (b: number, mantissaBits: number, bias: number): number => {
  if (b === 0x80) return 0x7fc00000;
  const sign = b & 0x80 ? -1 : 1;
  const exponent = (b & 0x7f) >>> mantissaBits;
  const mantissa = b & ((1 << mantissaBits) - 1);
  const value =
    exponent === 0
      ? mantissa * 2 ** (1 - bias - mantissaBits)
      : (1 + mantissa / (1 << mantissaBits)) * 2 ** (exponent - bias);
  return bitsOf(sign * value);
};
export const e4m3fnuzToF32Bits = (b: number): number => fnuzToF32Bits(b, 3, 8);
export const e5m2fnuzToF32Bits = (b: number): number => fnuzToF32Bits(b, 2, 16);

/** E8M0 (scale factors): 2^(b - 127), 0xff is NaN. */
export const e8m0ToF32Bits = (b: number): number => (b === 0xff ? 0x7fc00000 : bitsOf(2 ** (b - 127)));

/** float32 bits to IEEE half, round to nearest even; overflow to infinity; NaN stays quiet NaN. */
export const f32BitsToF16 = (x: number): number => {
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  const mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x200 | (mantissa >>> 13) : 0);
  const e = exponent - 112;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const significand = mantissa | 0x800000;
    const shift = 126 - exponent;
    let q = significand >>> shift;
    const rest = significand & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rest > half || (rest === half && (q & 1) === 1)) q++;
    return sign | q;
  }
  let q = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (q & 1) === 1)) q++;
  return sign | q;
};

export const f32BitsToBf16 = (x: number): number => {
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) return ((x >>> 16) | 0x40) & 0xffff;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
};

// Lookup tables, built on first use: 256 KiB for the 16-bit forms, 1 KiB for each 8-bit one.
const tables = new Map<string, Uint32Array>();
const tableOf = (key: string, size: number, fn: (bits: number) => number): Uint32Array => {
  let table = tables.get(key);
  if (table === undefined) {
    table = new Uint32Array(size);
    for (let i = 0; i < size; i++) table[i] = fn(i);
    tables.set(key, table);
  }
  return table;
};

/** Dtypes toFloat32 converts. Packed sub-byte forms (F4, F6) and complex C64 have no conversion. */
export const convertibleToFloat32 = (dtype: Dtype): boolean =>
  dtype !== 'F4' && dtype !== 'F6_E2M3' && dtype !== 'F6_E3M2' && dtype !== 'C64';

/** Exact int64/uint64 to float32, rounding once (Number() then fround would round twice above 2^53). */
const bigToF32 = (value: bigint): number => {
  const negative = value < 0n;
  const magnitude = negative ? -value : value;
  if (magnitude < 1n << 53n) return Math.fround(Number(value));
  const shift = BigInt(magnitude.toString(2).length - 26);
  const sticky = (magnitude & ((1n << shift) - 1n)) !== 0n ? 1n : 0n;
  const kept = Number((magnitude >> shift) | sticky) * 2 ** Number(shift);
  return Math.fround(negative ? -kept : kept);
};

/** Converts little-endian elements of `dtype` to float32. Throws RangeError for a dtype without conversion
 *  or a byte length that is not a whole number of elements. */
export const toFloat32 = (dtype: Dtype, bytes: Uint8Array): Float32Array => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const perElement = (n: number): number => {
    if (bytes.length % n !== 0) throw new RangeError(`${bytes.length} bytes is not a whole number of ${dtype} elements`);
    return bytes.length / n;
  };
  const byTable8 = (table: Uint32Array): Float32Array => {
    const bits = new Uint32Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) bits[i] = table[bytes[i] as number] as number;
    return new Float32Array(bits.buffer);
  };
  const byTable16 = (table: Uint32Array): Float32Array => {
    const count = perElement(2);
    const bits = new Uint32Array(count);
    for (let i = 0; i < count; i++) bits[i] = table[view.getUint16(2 * i, true)] as number;
    return new Float32Array(bits.buffer);
  };
  const numeric = (size: number, read: (offset: number) => number): Float32Array => {
    const count = perElement(size);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) out[i] = read(size * i);
    return out;
  };
  switch (dtype) {
    case 'F32': {
      const count = perElement(4);
      const out = new Uint8Array(count * 4);
      out.set(bytes);
      return new Float32Array(out.buffer);
    }
    case 'F16':
      return byTable16(tableOf('F16', 65536, f16ToF32Bits));
    case 'BF16':
      return byTable16(tableOf('BF16', 65536, bf16ToF32Bits));
    case 'F8_E4M3':
      return byTable8(tableOf('F8_E4M3', 256, e4m3ToF32Bits));
    case 'F8_E5M2':
      return byTable8(tableOf('F8_E5M2', 256, e5m2ToF32Bits));
    case 'F8_E4M3FNUZ':
      return byTable8(tableOf('F8_E4M3FNUZ', 256, e4m3fnuzToF32Bits));
    case 'F8_E5M2FNUZ':
      return byTable8(tableOf('F8_E5M2FNUZ', 256, e5m2fnuzToF32Bits));
    case 'F8_E8M0':
      return byTable8(tableOf('F8_E8M0', 256, e8m0ToF32Bits));
    case 'BOOL':
      return numeric(1, (o) => (view.getUint8(o) !== 0 ? 1 : 0));
    case 'U8':
      return numeric(1, (o) => view.getUint8(o));
    case 'I8':
      return numeric(1, (o) => view.getInt8(o));
    case 'I16':
      return numeric(2, (o) => view.getInt16(o, true));
    case 'U16':
      return numeric(2, (o) => view.getUint16(o, true));
    case 'I32':
      return numeric(4, (o) => view.getInt32(o, true));
    case 'U32':
      return numeric(4, (o) => view.getUint32(o, true));
    case 'F64':
      return numeric(8, (o) => view.getFloat64(o, true));
    case 'I64':
      return numeric(8, (o) => bigToF32(view.getBigInt64(o, true)));
    case 'U64':
      return numeric(8, (o) => bigToF32(view.getBigUint64(o, true)));
    case 'F4':
    case 'F6_E2M3':
    case 'F6_E3M2':
    case 'C64':
      throw new RangeError(`no conversion from ${dtype} to float32`);
  }
};

/** float32 to little-endian F32, F16 or BF16 bytes (round to nearest even). */
export const fromFloat32 = (values: Float32Array, dtype: 'F32' | 'F16' | 'BF16'): Uint8Array => {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  if (dtype === 'F32') return new Uint8Array(new Uint32Array(bits).buffer);
  const out = new Uint16Array(values.length);
  const convert = dtype === 'F16' ? f32BitsToF16 : f32BitsToBf16;
  for (let i = 0; i < values.length; i++) out[i] = convert(bits[i] as number);
  return new Uint8Array(out.buffer);
};
