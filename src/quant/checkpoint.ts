/**
 * Quantized tensors in a checkpoint, named as compressed-tensors and vLLM name them:
 *   <m>.weight             I8 (int8), F8_E4M3 (fp8) or U8 (int4, two per byte along K, offset binary)
 *   <m>.weight_scale       float (F32, F16 or BF16): [] or [1] per tensor, [N] or [N, 1] per channel, [N, G] int4 groups
 *   <m>.weight_zero_point  optional, I8 or I32, shaped as the scale (asymmetric when any is non-zero)
 * What is found is decoded with io-ts into QuantizedEntry; nothing is read but the header.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import type { QuantIssue } from './errors.js';

/** What the reload needs from a checkpoint: a SafetensorsFile fits. */
export interface TensorSource {
  names(): string[];
  info(name: string): { readonly dtype: string; readonly shape: readonly number[] };
  /** The tensor's bytes (a view, no copy). */
  bytes(name: string): Uint8Array;
}

const Dim = t.refinement(t.number, (n) => Number.isSafeInteger(n) && n >= 0, 'Dim');
export const QuantKindCodec = t.keyof({ int8: null, fp8_e4m3: null, int4: null });
export const ScaleDtype = t.keyof({ F32: null, F16: null, BF16: null });
export const QuantizedEntry = t.type({
  module: t.string,
  weight: t.string,
  scale: t.string,
  zeroPoint: t.union([t.string, t.undefined]),
  kind: QuantKindCodec,
  valuesShape: t.array(Dim),
  scaleShape: t.array(Dim),
  scaleDtype: ScaleDtype,
  zeroPointDtype: t.union([t.keyof({ I8: null, I32: null }), t.undefined]),
});
export type QuantizedEntry = t.TypeOf<typeof QuantizedEntry>;

const kindOfDtype: Record<string, QuantizedEntry['kind'] | undefined> = { I8: 'int8', F8_E4M3: 'fp8_e4m3', U8: 'int4' };
const shapeText = (s: readonly number[]) => `[${s.join(', ')}]`;

/** Every quantized weight of the checkpoint (each `<m>.weight_scale` with its `<m>.weight`). */
export const findQuantized = (source: TensorSource): E.Either<QuantIssue, QuantizedEntry[]> => {
  const names = new Set(source.names());
  const out: QuantizedEntry[] = [];
  for (const scale of [...names].filter((n) => n.endsWith('.weight_scale')).sort()) {
    const module = scale.slice(0, -'.weight_scale'.length);
    const weight = `${module}.weight`;
    if (!names.has(weight)) return E.left({ _tag: 'MissingQuantizedWeight', tensor: scale, detail: `a weight scale without its weight '${weight}'` });
    const w = source.info(weight);
    const s = source.info(scale);
    const kind = kindOfDtype[w.dtype];
    if (kind === undefined) return E.left({ _tag: 'BadQuantizedTensor', tensor: weight, expected: 'dtype I8, F8_E4M3 or U8 (int4 packed two per byte)', found: w.dtype });
    if (w.shape.length < 2) return E.left({ _tag: 'BadQuantizedTensor', tensor: weight, expected: 'a kernel of rank 2 or more', found: shapeText(w.shape) });
    const zeroName = names.has(`${module}.weight_zero_point`) ? `${module}.weight_zero_point` : undefined;
    const z = zeroName === undefined ? undefined : source.info(zeroName);
    const decoded = QuantizedEntry.decode({
      module,
      weight,
      scale,
      zeroPoint: zeroName,
      kind,
      valuesShape: [...w.shape],
      scaleShape: [...s.shape],
      scaleDtype: s.dtype,
      zeroPointDtype: z?.dtype,
    });
    if (E.isLeft(decoded)) {
      if (!ScaleDtype.is(s.dtype)) return E.left({ _tag: 'BadQuantizedTensor', tensor: scale, expected: 'dtype F32, F16 or BF16', found: s.dtype });
      return E.left({ _tag: 'BadQuantizedTensor', tensor: zeroName ?? weight, expected: 'a zero point of dtype I8 or I32', found: z?.dtype ?? '?' });
    }
    const entry = decoded.right;
    const channels = entry.valuesShape[0];
    const scaleCount = entry.scaleShape.reduce((a, b) => a * b, 1);
    const perTensor = scaleCount === 1;
    const leadingOk = perTensor || entry.scaleShape[0] === channels;
    const rankOk = entry.scaleShape.length <= 2 && (entry.kind === 'int4' || perTensor || scaleCount === channels);
    if (!leadingOk || !rankOk) {
      const expected = entry.kind === 'int4' ? `[${channels}, groups] (or one scale per tensor)` : `[${channels}] or [${channels}, 1] (or one scale per tensor)`;
      return E.left({ _tag: 'ShapeMismatch', tensor: scale, expected, found: shapeText(entry.scaleShape) });
    }
    if (z !== undefined && z.shape.reduce((a, b) => a * b, 1) !== scaleCount) {
      return E.left({ _tag: 'ShapeMismatch', tensor: zeroName!, expected: `as many zero points as scales (${scaleCount})`, found: shapeText(z.shape) });
    }
    out.push(entry);
  }
  return E.right(out);
};
