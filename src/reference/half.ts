/**
 * 16-bit float conversions for the reference evaluator and the tests: float16 (IEEE binary16) and bfloat16
 * bit patterns to float32 values and back (round to nearest, ties to even, as trtshim_convert_from_f32).
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The float32 value of a bfloat16 bit pattern (exact: bfloat16 is the top half of a float32). */
export const bfloat16ToFloat = (bits: number): number => {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
};

/** The value of a float16 bit pattern (exact in float32). */
export const float16ToFloat = (bits: number): number => {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24; // zero and subnormals
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
};

/** The bfloat16 bit pattern nearest to a float32 value (ties to even; NaN stays a quiet NaN). */
export const floatToBfloat16 = (value: number): number => {
  f32[0] = value;
  const bits = u32[0];
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return ((bits >>> 16) | 0x40) & 0xffff;
  const roundingBias = 0x7fff + ((bits >>> 16) & 1);
  return ((bits + roundingBias) >>> 16) & 0xffff;
};

/** The float16 bit pattern nearest to a float32 value (ties to even, overflow to infinity). */
export const floatToFloat16 = (value: number): number => {
  f32[0] = value;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x200 : 0);
  const e = exponent - 127 + 15; // rebiased exponent
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal float16 (or zero): shift the full significand into place and round.
    if (e < -10) return sign;
    const significand = mantissa | 0x800000;
    const shift = 14 - e; // 24-bit significand down to the subnormal's 10 bits
    const half = 1 << (shift - 1);
    const rest = significand & ((1 << shift) - 1);
    let out = significand >>> shift;
    if (rest > half || (rest === half && (out & 1) === 1)) out += 1;
    return sign | out;
  }
  let out = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (out & 1) === 1)) out += 1; // may carry into the exponent: correct
  return sign | out;
};

/** Float32 values widened from 16-bit patterns. */
export const widen16 = (dtype: 'float16' | 'bfloat16', bits: Uint16Array): Float32Array => {
  const out = new Float32Array(bits.length);
  const convert = dtype === 'float16' ? float16ToFloat : bfloat16ToFloat;
  for (let i = 0; i < bits.length; i++) out[i] = convert(bits[i]);
  return out;
};

/** 16-bit patterns of float32 values, rounded to nearest even. */
export const narrow16 = (dtype: 'float16' | 'bfloat16', values: Float32Array): Uint16Array => {
  const out = new Uint16Array(values.length);
  const convert = dtype === 'float16' ? floatToFloat16 : floatToBfloat16;
  for (let i = 0; i < values.length; i++) out[i] = convert(values[i]);
  return out;
};
