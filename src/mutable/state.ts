/**
 * A state dict: tensors by name, in memory, as PyTorch's `state_dict()` holds them. Float tensors are held
 * as float32 (the engines' refit input); other dtypes (`num_batches_tracked`, int64 buffers) are kept as
 * they are and only carried along. Pure helpers: reading a checkpoint into a state dict, viewing a state
 * dict as the TensorStore the weight map and the effect read, and the signature (names, dtypes, shapes)
 * whose change means a recompile.
 */
import * as E from 'fp-ts/lib/Either.js';
import { elementCount, fromBytes, toBytes, type DType, type Tensor, type TensorData } from '../trace/ir.js';
import { isFloatDtype, type StoredTensorInfo, type TensorStore } from '../weightmap/store.js';

/** One tensor of a state dict. Float tensors are float32. */
export type StateTensor = Tensor;

/** Tensors by name, in a stable order. */
export type StateDict = ReadonlyMap<string, StateTensor>;

/** What `set` and `loadStateDict` accept: a tensor, or a float32 tensor given as shape and values. */
export type TensorInput = Tensor | { readonly shape: readonly number[]; readonly data: Float32Array };

export type StateErrorDetail =
  | { readonly _tag: 'InvalidTensor'; readonly name: string; readonly detail: string }
  | { readonly _tag: 'UnsupportedDtype'; readonly name: string; readonly dtype: string };

const irOf: Readonly<Record<string, DType>> = {
  F32: 'float32', F64: 'float64', F16: 'float16', BF16: 'bfloat16', I8: 'int8', U8: 'uint8', I16: 'int16', U16: 'uint16',
  I32: 'int32', U32: 'uint32', I64: 'int64', U64: 'uint64', BOOL: 'bool',
};
const storedOf: Readonly<Record<DType, string>> = {
  float32: 'F32', float64: 'F64', float16: 'F16', bfloat16: 'BF16', int8: 'I8', uint8: 'U8', int16: 'I16', uint16: 'U16',
  int32: 'I32', uint32: 'U32', int64: 'I64', uint64: 'U64', bool: 'BOOL',
};

/** Copies every tensor of a store into a state dict (float tensors converted to float32). */
export const stateFromStore = (store: TensorStore): E.Either<StateErrorDetail, Map<string, StateTensor>> => {
  const out = new Map<string, StateTensor>();
  for (const [name, info] of store.tensors) {
    if (isFloatDtype(info.dtype)) {
      out.set(name, { dtype: 'float32', shape: [...info.shape], data: Float32Array.from(store.toFloat32(name)) });
      continue;
    }
    const dtype = irOf[info.dtype];
    if (dtype === undefined) return E.left({ _tag: 'UnsupportedDtype', name, dtype: info.dtype });
    const bytes = store.bytes(name);
    out.set(name, { dtype, shape: [...info.shape], data: fromBytes(dtype, Uint8Array.from(bytes)) });
  }
  return E.right(out);
};

/** Checks a tensor given by the caller and copies it (so later changes to the caller's array are not
 *  silently half-applied); floats of other widths become float32. */
export const normalizeTensor = (name: string, given: TensorInput): E.Either<StateErrorDetail, StateTensor> => {
  const dtype: DType = 'dtype' in given ? given.dtype : 'float32';
  const shape = [...given.shape];
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) return E.left({ _tag: 'InvalidTensor', name, detail: `shape [${shape}] is not a list of sizes` });
  if (!ArrayBuffer.isView(given.data)) return E.left({ _tag: 'InvalidTensor', name, detail: 'its data is not a typed array' });
  if (given.data.length !== elementCount(shape)) return E.left({ _tag: 'InvalidTensor', name, detail: `shape [${shape}] holds ${elementCount(shape)} values; ${given.data.length} were given` });
  if (dtype === 'float32' || dtype === 'float64') {
    if (!(given.data instanceof Float32Array || given.data instanceof Float64Array)) return E.left({ _tag: 'InvalidTensor', name, detail: `a ${dtype} tensor needs a Float32Array or Float64Array` });
    return E.right({ dtype: 'float32', shape, data: Float32Array.from(given.data) });
  }
  if (dtype === 'float16' || dtype === 'bfloat16') return E.left({ _tag: 'UnsupportedDtype', name, dtype });
  return E.right({ dtype, shape, data: (given.data as TensorData).slice() as TensorData });
};

/** A state dict as the TensorStore the weight map, the plan and the effect read (views, no copies). */
export const stateStore = (state: StateDict): TensorStore => {
  const tensors = new Map<string, StoredTensorInfo>([...state].map(([name, t]) => [name, { dtype: storedOf[t.dtype], shape: t.shape }]));
  return {
    tensors,
    bytes: (name) => toBytes(state.get(name)!.data),
    toFloat32: (name) => {
      const t = state.get(name)!;
      return t.data instanceof Float32Array ? t.data : Float32Array.from(t.data as ArrayLike<number>, Number);
    },
  };
};

/** `dtype[shape]` of every tensor: what a compiled model fixes. */
export const signatureOf = (state: StateDict): Map<string, string> => new Map([...state].map(([name, t]) => [name, `${t.dtype}[${t.shape.join(',')}]`]));

/** Why two signatures differ (undefined when they are equal): names added, removed, reshaped. */
export const signatureChange = (compiled: ReadonlyMap<string, string>, now: ReadonlyMap<string, string>): string | undefined => {
  const added = [...now.keys()].filter((n) => !compiled.has(n));
  const removed = [...compiled.keys()].filter((n) => !now.has(n));
  const reshaped = [...now].filter(([n, s]) => compiled.has(n) && compiled.get(n) !== s).map(([n, s]) => `'${n}' ${compiled.get(n)} -> ${s}`);
  const parts = [
    ...(reshaped.length > 0 ? [`changed shape or dtype: ${reshaped.join(', ')}`] : []),
    ...(added.length > 0 ? [`added: ${added.map((n) => `'${n}'`).join(', ')}`] : []),
    ...(removed.length > 0 ? [`removed: ${removed.map((n) => `'${n}'`).join(', ')}`] : []),
  ];
  return parts.length === 0 ? undefined : parts.join('; ');
};
