/**
 * Exact-value fingerprints of float32 data: a 64-bit hash (two independent 32-bit multiply-rotate lanes) of
 * the values' bit patterns, with -0 read as +0 (the two compare equal, and exporters do not preserve the
 * sign of zero). A fingerprint only proposes a candidate: every match is confirmed element by element.
 */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

const bitsOf = (v: number): number => {
  if (v === 0) return 0;
  f32[0] = v;
  return u32[0];
};

export const hashRange = (data: Float32Array, start: number, end: number): string => {
  let a = 0x811c9dc5 ^ (end - start);
  let b = 0x01000193 + (end - start);
  for (let i = start; i < end; i++) {
    const v = bitsOf(data[i]);
    a = Math.imul(a ^ v, 0x9e3779b1);
    a = (a << 13) | (a >>> 19);
    b = Math.imul(b + v, 0x85ebca77);
    b ^= b >>> 15;
  }
  a = Math.imul(a ^ (a >>> 16), 0x7feb352d);
  b = Math.imul(b ^ (b >>> 13), 0xc2b2ae35);
  return (a >>> 0).toString(16).padStart(8, '0') + (b >>> 0).toString(16).padStart(8, '0');
};

export const fingerprint = (data: Float32Array): string => hashRange(data, 0, data.length);

/** Exact equality of values (-0 equals +0; NaN equals nothing, as a refit treats it). */
export const sameValues = (a: Float32Array, aStart: number, b: Float32Array, bStart: number, length: number): boolean => {
  for (let i = 0; i < length; i++) if (a[aStart + i] !== b[bStart + i]) return false;
  return true;
};
