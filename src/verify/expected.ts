/**
 * The digests an engine is expected to report in read-back verification (Engine.weightDigests), computed
 * in TypeScript from network-level values alone: the independent oracle the read-back is compared with.
 *
 * What an engine holds at reduced precision (libtrtshim/src/builder.c, its units):
 *   - only the B operand of a GEMM or convolution, packed for the kernel (a fully connected or convolution
 *     kernel, a float constant used as B of a matrix multiply whose A is not transposed): rounded to the
 *     engine's float16 / bfloat16 precision, or quantized (int8, fp8 e4m3, int4) when the kernel format
 *     says so, with one scale per output channel (int4: per group of depth);
 *   - a convolution kernel with a batch norm folded into it is NOT: the kernels hold only the fold, and
 *     the read-back reports the engine's float32 copies of the fold's weights, checked against the fold;
 *   - biases (fused or not), norm scales and shifts, batch norm statistics, constants read as tensors:
 *     float32, exactly the network-level values. Integer constants: their raw bytes.
 * So `held` says, besides the precision and the kernel format, whether and in what layout the weight is
 * packed (`packed`, a field added for this): Engine.heldForms() reads the whole `held` from an engine
 * (trtshim_engine_weight_held), and `packedLayouts(net)` works the layouts out from a network definition
 * with the builder's rules (tests hold the two equal). Without `packed` a weight counts as held exactly.
 * A kernel staged already quantized (a compressed-tensors checkpoint) reads back as value(q) * scale:
 * heldQuantizedDigest.
 *
 * Rounding and quantizing here use src/reference/half.ts and src/quant/reference.ts, never libtrtshim.
 */
import type { QuantizedWeights, WeightKernelFormat } from '../../ffi/engine.js';
import { networkWeights, type Layer, type NetworkDefinition, type Weights, type WeightRole } from '../network/types.js';
import { dequantize, quantize, unpackInt4, type Geometry } from '../quant/reference.js';
import { narrow16, widen16 } from '../reference/half.js';
import { valueDigest } from '../weightmap/digest.js';

/** How a packed weight is laid out: `channels` output channels (GEMM columns) of `depth` values each;
 *  transposed: the weight is [channels, depth] (a torch Linear or convolution kernel), else [depth, channels]. */
export interface PackedLayout {
  readonly transposed: boolean;
  readonly channels: number;
  readonly depth: number;
}

export interface HeldForm {
  readonly precision: 'float32' | 'float16' | 'bfloat16';
  /** The weight's entry of Engine.kernelFormats() (a quantized format applies to packed weights only). */
  readonly kernel?: WeightKernelFormat;
  /** Set when the engine packs the weight as a GEMM or convolution operand (packedLayouts gives it). */
  readonly packed?: PackedLayout;
}

const isFloat = (v: Float32Array | Int32Array | BigInt64Array): v is Float32Array => v instanceof Float32Array;

/** The values the engine holds for network-level `value`. */
export const heldValues = (value: Float32Array, held: HeldForm): Float32Array => {
  const p = held.packed;
  if (p === undefined) return value;
  if (p.channels * p.depth !== value.length) {
    throw new RangeError(`heldValues: ${value.length} values for a packed weight of ${p.channels} x ${p.depth}`);
  }
  const format = held.kernel?.format ?? 'asPrecision';
  if (format !== 'asPrecision') {
    const q = { kind: format, groupSize: held.kernel?.groupSize || 128 } as const;
    const g: Geometry = { channels: p.channels, depth: p.depth, transposed: p.transposed };
    return dequantize(q, quantize(q, value, g), g);
  }
  if (held.precision === 'float32') return value;
  return widen16(held.precision, narrow16(held.precision, value));
};

/** The digest Engine.weightDigests() should report for a weight of these network-level values. */
export const heldValueDigest = (value: Float32Array | Int32Array | BigInt64Array, held: HeldForm): string =>
  valueDigest(isFloat(value) ? heldValues(value, held) : value);

const inputsOf = (l: Layer): readonly string[] => {
  switch (l.kind) {
    case 'matrixMultiply':
    case 'elementwise':
      return [l.a, l.b];
    case 'concatenation':
      return l.inputs;
    case 'gather':
      return [l.data, l.indices];
    case 'constant':
      return [];
    default:
      return [l.input];
  }
};

const product = (dims: readonly number[]): number => dims.reduce((a, b) => a * b, 1);

/**
 * The packed weights of a network and their layouts, keyed `${layer}\u0000${role}`, by the builder's rules:
 * every fully connected kernel ([out, in]); every convolution kernel ([out, in / groups * kh * kw]) except
 * one whose output only a batch norm reads (folded); a float constant used as B of a matrix multiply with
 * A not transposed and B's leading dimensions all 1 (transposeB: [n, k], else [k, n]).
 */
export const packedLayouts = (net: NetworkDefinition): Map<string, PackedLayout> => {
  const uses = new Map<string, number>();
  const reader = new Map<string, Layer>();
  for (const l of net.layers)
    for (const t of inputsOf(l)) {
      uses.set(t, (uses.get(t) ?? 0) + 1);
      reader.set(t, l);
    }
  const outputs = new Set(net.outputs.map((o) => o.tensor));
  const constants = new Map<string, Layer & { kind: 'constant' }>();
  for (const l of net.layers) if (l.kind === 'constant') constants.set(l.output, l);
  const out = new Map<string, PackedLayout>();
  const key = (layer: string, role: WeightRole) => `${layer}\u0000${role}`;
  for (const l of net.layers) {
    if (l.kind === 'fullyConnected') {
      out.set(key(l.name, 'kernel'), { transposed: true, channels: l.outFeatures, depth: product(l.kernel.shape) / l.outFeatures });
    } else if (l.kind === 'convolution') {
      const next = reader.get(l.output);
      const folded = uses.get(l.output) === 1 && !outputs.has(l.output) && next?.kind === 'batchNorm';
      if (!folded) {
        out.set(key(l.name, 'kernel'), { transposed: true, channels: l.params.outChannels, depth: product(l.kernel.shape) / l.params.outChannels });
      }
    } else if (l.kind === 'matrixMultiply' && !l.transposeA) {
      const c = constants.get(l.b);
      const w = c?.weights;
      if (c === undefined || w === undefined || w.dtype === 'int32' || w.dtype === 'int64') continue;
      const s = w.shape;
      if (s.length < 2 || s.slice(0, -2).some((d) => d !== 1)) continue;
      const rows = s[s.length - 2];
      const cols = s[s.length - 1];
      out.set(key(c.name, 'constant'), l.transposeB ? { transposed: true, channels: rows, depth: cols } : { transposed: false, channels: cols, depth: rows });
    }
  }
  return out;
};

/** Network-level values of weights as heldValueDigest takes them: float weights as float32 (16-bit patterns
 *  widened), integer constants as they are. */
export const networkValues = (w: Weights): Float32Array | Int32Array | BigInt64Array =>
  w.dtype === 'float16' || w.dtype === 'bfloat16' ? widen16(w.dtype, w.data as Uint16Array) : (w.data as Float32Array | Int32Array | BigInt64Array);

/**
 * The digest every weight of `net` should read back as, keyed `${layer}\u0000${role}` like
 * Engine.weightDigests(), for an engine of that structure built at `precision` whose kernel formats are
 * `kernelFormats` (Engine.kernelFormats(); empty for float kernels).
 */
export const expectedHeldDigests = (
  net: NetworkDefinition,
  precision: HeldForm['precision'],
  kernelFormats: readonly WeightKernelFormat[] = [],
): Map<string, string> => {
  const formats = new Map(kernelFormats.map((f) => [`${f.layer}\u0000${f.role}`, f]));
  const packed = packedLayouts(net);
  const out = new Map<string, string>();
  for (const w of networkWeights(net)) {
    const k = `${w.layer}\u0000${w.role}`;
    out.set(k, heldValueDigest(networkValues(w.weights), { precision, kernel: formats.get(k), packed: packed.get(k) }));
  }
  return out;
};

/**
 * The digest an engine should report for a kernel staged already quantized (Refitter.setQuantizedWeights:
 * values and scales of a compressed-tensors checkpoint, zero points all 0): the dequantized values
 * value(q) * scale in float32, in the weight's declared layout. `held` must be packed (heldForms()).
 */
export const heldQuantizedDigest = (q: QuantizedWeights, held: HeldForm): string => {
  const p = held.packed;
  if (p === undefined) throw new RangeError('heldQuantizedDigest: the weight is not held as a packed operand');
  const g: Geometry = { channels: p.channels, depth: p.depth, transposed: p.transposed };
  const format = { kind: q.format, groupSize: q.groupSize ?? held.kernel?.groupSize ?? 128 } as const;
  const bytes = new Uint8Array(q.values.buffer, q.values.byteOffset, q.values.byteLength);
  const values =
    q.format === 'int4' ? unpackInt4(bytes, g) : q.format === 'int8' ? new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : bytes;
  return valueDigest(dequantize(format, { values, scales: q.scales }, g));
};
