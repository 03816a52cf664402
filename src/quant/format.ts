/**
 * Weight formats as users name them (`--weight-format fp32|fp16|bf16|int8|fp8|int4[:GROUP]`) and the build
 * options they stand for.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { BuildOptions } from '../../ffi/engine.js';
import type { QuantIssue } from './errors.js';

export type WeightFormat =
  | { readonly kind: 'fp32' | 'fp16' | 'bf16' }
  | { readonly kind: 'int8' | 'fp8' }
  | { readonly kind: 'int4'; readonly groupSize: 32 | 64 | 128 };

export const WEIGHT_FORMATS = ['fp32', 'fp16', 'bf16', 'int8', 'fp8', 'int4'] as const;

export const parseWeightFormat = (text: string): E.Either<QuantIssue, WeightFormat> => {
  const [name, group, ...rest] = text.trim().toLowerCase().split(':');
  const bad = (detail: string): E.Either<QuantIssue, WeightFormat> => E.left({ _tag: 'BadWeightFormat', text, detail });
  if (rest.length > 0) return bad('expected NAME or int4:GROUP');
  if (name === 'int4') {
    if (group === undefined || group === '') return E.right({ kind: 'int4', groupSize: 128 });
    const g = Number(group);
    return g === 32 || g === 64 || g === 128 ? E.right({ kind: 'int4', groupSize: g }) : bad(`int4 group size must be 32, 64 or 128, got '${group}'`);
  }
  if (group !== undefined) return bad(`only int4 takes a group size (int4:32, int4:64, int4:128)`);
  if (name === 'fp32' || name === 'fp16' || name === 'bf16' || name === 'int8' || name === 'fp8') return E.right({ kind: name });
  return bad(`expected one of ${WEIGHT_FORMATS.join(', ')} (int4 optionally with :32, :64 or :128)`);
};

export const formatWeightFormat = (f: WeightFormat): string => (f.kind === 'int4' ? `int4:${f.groupSize}` : f.kind);

/** Build options of a weight format: float formats set the precision, quantized ones the kernel format of
 *  GEMM and convolution weights (everything else stays float32). */
export const weightFormatOptions = (f: WeightFormat): BuildOptions => {
  switch (f.kind) {
    case 'fp32':
      return { weightPrecision: 'float32' };
    case 'fp16':
      return { weightPrecision: 'float16' };
    case 'bf16':
      return { weightPrecision: 'bfloat16' };
    case 'int8':
      return { weightFormat: 'int8' };
    case 'fp8':
      return { weightFormat: 'fp8_e4m3' };
    case 'int4':
      return { weightFormat: 'int4', int4GroupSize: f.groupSize };
  }
};
