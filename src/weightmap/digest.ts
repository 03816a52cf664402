/**
 * Content digests (sha256, hex). A checkpoint tensor's digest covers its name, dtype, shape and bytes; a
 * weight's source digest combines the digests of the tensors its expression reads, in order, so a refit
 * can tell unchanged weights without evaluating anything.
 */
import { createHash } from 'node:crypto';
import type { TensorStore } from './store.js';

export const tensorDigest = (store: TensorStore, name: string): string => {
  const info = store.tensors.get(name);
  if (info === undefined) return createHash('sha256').update(`missing\n${name}`).digest('hex');
  return createHash('sha256').update(`${name}\n${info.dtype}\n${info.shape.join(',')}\n`).update(store.bytes(name)).digest('hex');
};

export const combineDigests = (digests: readonly string[]): string =>
  digests.length === 1 ? digests[0] : createHash('sha256').update(digests.join('\n')).digest('hex');

/** Digests of tensors, memoized per store (tied tensors and folds read the same tensor several times). */
export const digestCache = (store: TensorStore): ((name: string) => string) => {
  const cache = new Map<string, string>();
  return (name) => {
    let d = cache.get(name);
    if (d === undefined) cache.set(name, (d = tensorDigest(store, name)));
    return d;
  };
};

export const valueDigest = (data: ArrayBufferView): string =>
  createHash('sha256').update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)).digest('hex');
