/**
 * Quantized tensors of a refit checkpoint (a TensorStore) as the plan and the effect meet them: the store
 * seen as a TensorSource, its quantized entries by weight name, and the companions (`*_scale`,
 * `*_zero_point`) each quantized weight brings along.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { TensorStore } from '../weightmap/store.js';
import { findQuantized, type QuantizedEntry, type TensorSource } from './checkpoint.js';
import type { QuantIssue } from './errors.js';

export const tensorSourceOf = (store: TensorStore): TensorSource => ({
  names: () => [...store.tensors.keys()],
  info: (name) => store.tensors.get(name)!,
  bytes: (name) => store.bytes(name),
});

/** The store's quantized weights by weight name (empty for a float checkpoint: no `*.weight_scale`). */
export const quantizedIn = (store: TensorStore): E.Either<QuantIssue, ReadonlyMap<string, QuantizedEntry>> => {
  if (![...store.tensors.keys()].some((n) => n.endsWith('.weight_scale'))) return E.right(new Map());
  return E.map((entries: QuantizedEntry[]) => new Map(entries.map((e) => [e.weight, e] as const)))(findQuantized(tensorSourceOf(store)));
};

/** The tensors a quantized weight's values depend on: the weight, its scale and zero point. */
export const companionsOf = (entry: QuantizedEntry): string[] => [entry.weight, entry.scale, ...(entry.zeroPoint !== undefined ? [entry.zeroPoint] : [])];
