/**
 * The trace stage's graph IR: an immutable, ONNX-shaped graph. Tensors are named; every node reads and
 * writes tensors by name ('' marks an omitted optional input, as in ONNX). Nothing here refers back to
 * protobuf: the builder DSL and the text parser produce the same values as the ONNX importer.
 */

export type DType =
  | 'float32'
  | 'float16'
  | 'bfloat16'
  | 'float64'
  | 'int8'
  | 'uint8'
  | 'int16'
  | 'uint16'
  | 'int32'
  | 'uint32'
  | 'int64'
  | 'uint64'
  | 'bool';

export const dtypes: readonly DType[] = [
  'float32', 'float16', 'bfloat16', 'float64', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', 'bool',
];

/** float16 and bfloat16 are raw 16-bit patterns; bool is one byte per element. */
export type TensorData =
  | Float32Array
  | Float64Array
  | Int8Array
  | Uint8Array
  | Int16Array
  | Uint16Array
  | Int32Array
  | Uint32Array
  | BigInt64Array
  | BigUint64Array;

export interface Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly data: TensorData;
}

/** A dimension: a size, or a symbolic name that the caller's input shapes resolve. */
export type Dim = number | string;

export interface ValueInfo {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly Dim[];
}

export type Attribute =
  | { readonly kind: 'float'; readonly value: number }
  | { readonly kind: 'int'; readonly value: number }
  | { readonly kind: 'string'; readonly value: string }
  | { readonly kind: 'tensor'; readonly value: Tensor }
  | { readonly kind: 'floats'; readonly value: readonly number[] }
  | { readonly kind: 'ints'; readonly value: readonly number[] }
  | { readonly kind: 'strings'; readonly value: readonly string[] };

export interface Node {
  /** Unique within the graph (the importer names unnamed nodes). */
  readonly name: string;
  readonly opType: string;
  /** '' is the default ONNX domain. */
  readonly domain: string;
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  readonly attributes: Readonly<Record<string, Attribute>>;
}

export interface Initializer {
  readonly name: string;
  readonly tensor: Tensor;
}

export interface Graph {
  readonly name: string;
  /** Version of the default ONNX domain's operator set. */
  readonly opset: number;
  readonly inputs: readonly ValueInfo[];
  readonly outputs: readonly string[];
  readonly initializers: readonly Initializer[];
  /** In topological order. */
  readonly nodes: readonly Node[];
}

/** The static type of a tensor once shapes are inferred. */
export interface TensorType {
  readonly dtype: DType;
  readonly shape: readonly number[];
}

export const elementCount = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

export const bytesPerElement = (dtype: DType): number => {
  switch (dtype) {
    case 'float64': case 'int64': case 'uint64': return 8;
    case 'float32': case 'int32': case 'uint32': return 4;
    case 'float16': case 'bfloat16': case 'int16': case 'uint16': return 2;
    default: return 1;
  }
};

export const isFloat = (dtype: DType): boolean =>
  dtype === 'float32' || dtype === 'float16' || dtype === 'bfloat16' || dtype === 'float64';

/** An empty typed array of the right class for a dtype. */
export const allocate = (dtype: DType, count: number): TensorData => {
  switch (dtype) {
    case 'float32': return new Float32Array(count);
    case 'float64': return new Float64Array(count);
    case 'float16': case 'bfloat16': case 'uint16': return new Uint16Array(count);
    case 'int8': return new Int8Array(count);
    case 'uint8': case 'bool': return new Uint8Array(count);
    case 'int16': return new Int16Array(count);
    case 'int32': return new Int32Array(count);
    case 'uint32': return new Uint32Array(count);
    case 'int64': return new BigInt64Array(count);
    case 'uint64': return new BigUint64Array(count);
  }
};

/** A typed array viewing a copy of `bytes` (little-endian), so that unaligned protobuf slices are safe. */
export const fromBytes = (dtype: DType, bytes: Uint8Array): TensorData => {
  const size = bytesPerElement(dtype);
  const out = allocate(dtype, Math.floor(bytes.byteLength / size));
  new Uint8Array(out.buffer, out.byteOffset, out.byteLength).set(bytes.subarray(0, out.byteLength));
  return out;
};

export const toBytes = (data: TensorData): Uint8Array => new Uint8Array(data.buffer, data.byteOffset, data.byteLength);

/** Values as plain numbers (int64 through Number: exact up to 2^53, which covers every shape). */
export const toNumbers = (t: Tensor): number[] => Array.from(t.data as ArrayLike<number | bigint>, (v) => Number(v));

export const tensorOf = (dtype: DType, shape: readonly number[], values: ArrayLike<number>): Tensor => {
  const data = allocate(dtype, values.length);
  if (data instanceof BigInt64Array || data instanceof BigUint64Array) {
    for (let i = 0; i < values.length; i++) data[i] = BigInt(Math.trunc(values[i]));
  } else {
    (data as Float32Array).set(values);
  }
  return { dtype, shape, data };
};

export const shapeString = (shape: readonly Dim[]): string => `[${shape.join(',')}]`;
