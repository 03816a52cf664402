/**
 * The reference quantizer and dequantizer: the numerics of libtrtshim's quantized kernels (gemm.h,
 * "quantized weights"), written again in TypeScript so that they can be checked bit for bit and used to
 * dequantize a quantized checkpoint for a float engine.
 *
 * Every step is one float32 operation (Math.fround of an exact double result is the float32 result):
 *   scale = max |w| over the column (int4: over its group of K rows) / 127 (int8), / 448 (fp8), / 7 (int4)
 *   q     = w / scale, rounded to nearest even (int: clamped to +-127 / +-7; fp8: to e4m3, saturated at 448)
 *   w'    = value(q) * scale
 * Layouts are those of gemm_quant_quantize: `transposed` = the weight is [channels, K] (a torch Linear
 * weight), values in the same layout, scales [channels, groups]; otherwise [K, channels] and [groups, channels].
 */
export type QuantKind = 'int8' | 'fp8_e4m3' | 'int4';
export interface QuantFormat {
  readonly kind: QuantKind;
  /** int4: 32, 64 or 128 rows of K per scale; ignored otherwise. */
  readonly groupSize?: number;
}
export interface Geometry {
  /** Output channels (N). */
  readonly channels: number;
  /** Values per channel (K: in_features, or in/groups * kh * kw for a convolution). */
  readonly depth: number;
  /** true: [channels, K] (torch layout); false: [K, channels]. */
  readonly transposed: boolean;
}
/** One value per element (int8 for int8 and int4, the e4m3 code for fp8) and float32 scales. */
export interface Quantized {
  readonly values: Int8Array | Uint8Array;
  readonly scales: Float32Array;
}

const f32 = Math.fround;
const maxCode = (kind: QuantKind) => (kind === 'int4' ? 7 : 127);

export const groupsOf = (format: QuantFormat, depth: number): number =>
  format.kind === 'int4' ? (depth > 0 ? Math.ceil(depth / (format.groupSize ?? 128)) : 0) : 1;

/** nearbyint in the default rounding mode: to nearest, ties to even. */
export const roundEven = (x: number): number => {
  const floor = Math.floor(x);
  const d = x - floor;
  if (d < 0.5) return floor;
  if (d > 0.5) return floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
};

const bits = new DataView(new ArrayBuffer(4));
const floatBits = (x: number): number => {
  bits.setFloat32(0, x, true);
  return bits.getUint32(0, true);
};
const bitsFloat = (u: number): number => {
  bits.setUint32(0, u >>> 0, true);
  return bits.getFloat32(0, true);
};

/** e4m3 code -> value (0x7f and 0xff are NaN). */
export const e4m3ToFloat = (code: number): number => {
  const exponent = (code >> 3) & 15;
  const mantissa = code & 7;
  let magnitude: number;
  if ((code & 0x7f) === 0x7f) magnitude = Number.NaN;
  else if (exponent === 0) magnitude = mantissa * 2 ** -9;
  else magnitude = bitsFloat(((exponent + 120) << 23) | (mantissa << 20));
  return code & 0x80 ? -magnitude : magnitude;
};

/** A finite float32 -> e4m3 code, round to nearest even, saturated at +-448. */
export const floatToE4m3 = (x: number): number => {
  const sign = x < 0 || Object.is(x, -0) ? 0x80 : 0;
  let a = Math.abs(x);
  if (a > 448) a = 448;
  if (a < 2 ** -6) return sign | roundEven(a * 512);
  let u = floatBits(a);
  u = (u + 0x7ffff + ((u >>> 20) & 1)) >>> 0;
  return (sign | ((u >>> 20) - (120 << 3))) & 0xff;
};

const valueOf = (kind: QuantKind, q: number): number => (kind === 'fp8_e4m3' ? e4m3ToFloat(q) : q);

const at = (g: Geometry, k: number, j: number) => (g.transposed ? j * g.depth + k : k * g.channels + j);
const scaleAt = (g: Geometry, groups: number, group: number, j: number) => (g.transposed ? j * groups + group : group * g.channels + j);

/** Quantizes a float32 weight (every value finite) as libtrtshim does. */
export const quantize = (format: QuantFormat, w: Float32Array, g: Geometry): Quantized => {
  if (w.length !== g.channels * g.depth) throw new RangeError(`quantize: ${w.length} values for ${g.channels} x ${g.depth}`);
  const groups = groupsOf(format, g.depth);
  const rows = format.kind === 'int4' ? (format.groupSize ?? 128) : g.depth;
  const values = format.kind === 'fp8_e4m3' ? new Uint8Array(w.length) : new Int8Array(w.length);
  const scales = new Float32Array(g.channels * groups);
  const divisor = format.kind === 'fp8_e4m3' ? 448 : maxCode(format.kind);
  for (let j = 0; j < g.channels; j++) {
    for (let group = 0; group < groups; group++) {
      const begin = group * rows;
      const end = Math.min(begin + rows, g.depth);
      let largest = 0;
      for (let k = begin; k < end; k++) largest = Math.max(largest, Math.abs(w[at(g, k, j)]));
      const scale = f32(largest / divisor);
      scales[scaleAt(g, groups, group, j)] = scale;
      for (let k = begin; k < end; k++) {
        let q = 0;
        if (scale > 0) {
          const x = f32(w[at(g, k, j)] / scale);
          if (format.kind === 'fp8_e4m3') q = floatToE4m3(x);
          else q = Math.max(-divisor, Math.min(divisor, roundEven(x)));
        }
        values[at(g, k, j)] = q;
      }
    }
  }
  return { values, scales };
};

/** w = value(q) * scale in float32; zero points (asymmetric checkpoints), when given: (q - zero) * scale. */
export const dequantize = (format: QuantFormat, q: Quantized, g: Geometry, zeroPoints?: ArrayLike<number>): Float32Array => {
  const groups = groupsOf(format, g.depth);
  const rows = format.kind === 'int4' ? (format.groupSize ?? 128) : g.depth;
  const out = new Float32Array(g.channels * g.depth);
  for (let j = 0; j < g.channels; j++)
    for (let k = 0; k < g.depth; k++) {
      const s = scaleAt(g, groups, Math.floor(k / rows), j);
      const v = valueOf(format.kind, q.values[at(g, k, j)]);
      out[at(g, k, j)] = f32((zeroPoints === undefined ? v : v - zeroPoints[s]) * q.scales[s]);
    }
  return out;
};

/** int4 values (one per element, -8..7) -> two per byte along K, offset binary (q + 8), low nibble first. */
export const packInt4 = (values: Int8Array, g: Geometry): Uint8Array => {
  const half = Math.ceil(g.depth / 2);
  const out = new Uint8Array(g.channels * half);
  for (let j = 0; j < g.channels; j++)
    for (let k = 0; k < g.depth; k++) {
      const nibble = (values[at(g, k, j)] + 8) & 15;
      const byte = g.transposed ? j * half + (k >> 1) : (k >> 1) * g.channels + j;
      out[byte] |= nibble << (4 * (k & 1));
    }
  return out;
};

/** The inverse of packInt4. */
export const unpackInt4 = (packed: Uint8Array, g: Geometry): Int8Array => {
  const half = Math.ceil(g.depth / 2);
  const out = new Int8Array(g.channels * g.depth);
  for (let j = 0; j < g.channels; j++)
    for (let k = 0; k < g.depth; k++) {
      const byte = packed[g.transposed ? j * half + (k >> 1) : (k >> 1) * g.channels + j];
      out[at(g, k, j)] = ((byte >> (4 * (k & 1))) & 15) - 8;
    }
  return out;
};
