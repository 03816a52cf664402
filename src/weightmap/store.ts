/**
 * What the weight map reads from a checkpoint: names with dtype and shape, and the values. The checkpoint
 * module's Checkpoint (mapped safetensors, sharded or not) satisfies it as is; `memoryStore` holds tensors
 * in memory (tests, merged LoRA weights).
 */
import type { F32Tensor } from './evaluate.js';

export interface StoredTensorInfo {
  /** A safetensors dtype name (F32, F16, BF16, F64, I64, ...). */
  readonly dtype: string;
  readonly shape: readonly number[];
}

export interface TensorStore {
  readonly tensors: ReadonlyMap<string, StoredTensorInfo>;
  /** The stored bytes, little-endian. */
  bytes(name: string): Uint8Array;
  toFloat32(name: string): Float32Array;
}

export const floatDtypes: ReadonlySet<string> = new Set(['F32', 'F16', 'BF16', 'F64']);
export const isFloatDtype = (dtype: string): boolean => floatDtypes.has(dtype);

const bytesOf = (a: Float32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** Float32 tensors held in memory, in the given order. */
export const memoryStore = (tensors: Iterable<readonly [string, F32Tensor]>): TensorStore => {
  const values = new Map<string, F32Tensor>(tensors);
  return {
    tensors: new Map([...values].map(([name, t]) => [name, { dtype: 'F32', shape: t.shape }])),
    bytes: (name) => bytesOf(values.get(name)!.data),
    toFloat32: (name) => values.get(name)!.data,
  };
};

/** `base` with some tensors replaced or added (replacements are float32). Order: base's, then new names. */
export const overlayStore = (base: TensorStore, overrides: ReadonlyMap<string, F32Tensor>): TensorStore => {
  const infos = new Map<string, StoredTensorInfo>(base.tensors);
  for (const [name, t] of overrides) infos.set(name, { dtype: 'F32', shape: t.shape });
  return {
    tensors: infos,
    bytes: (name) => {
      const o = overrides.get(name);
      return o ? bytesOf(o.data) : base.bytes(name);
    },
    toFloat32: (name) => overrides.get(name)?.data ?? base.toFloat32(name),
  };
};

/** A float tensor of the store as F32Tensor, or undefined for absent or non-float tensors. */
export const readF32 = (store: TensorStore, name: string): F32Tensor | undefined => {
  const info = store.tensors.get(name);
  if (info === undefined || !isFloatDtype(info.dtype)) return undefined;
  return { shape: info.shape, data: store.toFloat32(name) };
};
