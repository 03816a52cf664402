/**
 * ONNX ModelProto bytes -> Graph. Pure: external data files are supplied by a resolver, so the file
 * system stays at the edge (load.ts). Every malformed input becomes a TraceErrorDetail, never a throw.
 */
import * as E from 'fp-ts/lib/Either.js';
import { ModelProtoType, OnnxAttributeType, OnnxDataType, type Int64Like, type RawAttribute, type RawModel, type RawNode, type RawTensor, type RawValueInfo } from './onnx-schema.js';
import { allocate, bytesPerElement, fromBytes, type Attribute, type DType, type Dim, type Graph, type Initializer, type Node, type Tensor, type TensorData, type ValueInfo } from './ir.js';
import type { TraceErrorDetail } from './errors.js';

export const MIN_OPSET = 13;
export const MAX_OPSET = 21;
/** A tensor larger than this is refused as malformed rather than allocated. */
const MAX_ELEMENTS = 2 ** 31 - 1;

/**
 * Returns bytes [offset, offset + length) of the external data file named by a tensor's `location`, or a
 * reason. Only that range is read; a range past the file's end is a reason, as is a file that is not a
 * regular file or lies outside the model's folder (see load.ts).
 */
export type ExternalDataResolver = (location: string, range: { readonly offset: number; readonly length: number }) => E.Either<string, Uint8Array>;

const onnxToDType: Record<number, DType> = {
  [OnnxDataType.FLOAT]: 'float32',
  [OnnxDataType.UINT8]: 'uint8',
  [OnnxDataType.INT8]: 'int8',
  [OnnxDataType.UINT16]: 'uint16',
  [OnnxDataType.INT16]: 'int16',
  [OnnxDataType.INT32]: 'int32',
  [OnnxDataType.INT64]: 'int64',
  [OnnxDataType.BOOL]: 'bool',
  [OnnxDataType.FLOAT16]: 'float16',
  [OnnxDataType.DOUBLE]: 'float64',
  [OnnxDataType.UINT32]: 'uint32',
  [OnnxDataType.UINT64]: 'uint64',
  [OnnxDataType.BFLOAT16]: 'bfloat16',
};

export const dtypeFromOnnx = (code: number): DType | undefined => onnxToDType[code];
export const dtypeToOnnx = (dtype: DType): number => {
  const entry = Object.entries(onnxToDType).find(([, d]) => d === dtype);
  return Number(entry![0]);
};

const num = (v: Int64Like | undefined): number => (v === undefined ? 0 : typeof v === 'number' ? v : v.toNumber());
const big = (v: Int64Like): bigint => (typeof v === 'number' ? BigInt(v) : BigInt(v.toString()));

class Failure {
  constructor(readonly detail: TraceErrorDetail) {}
}
const fail = (detail: TraceErrorDetail): never => {
  throw new Failure(detail);
};

const decodeTensor = (raw: RawTensor, fallbackName: string, external: ExternalDataResolver | undefined): Tensor => {
  const name = raw.name || fallbackName;
  const dtype = onnxToDType[raw.dataType ?? 0] ?? fail({ _tag: 'UnsupportedDataType', tensor: name, dataType: `ONNX data type ${raw.dataType ?? 0}` });
  const shape = (raw.dims ?? []).map(num);
  let count = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) fail({ _tag: 'MalformedModel', reason: `tensor '${name}' has dimension ${d}; expected a non-negative integer` });
    count *= d;
    if (count > MAX_ELEMENTS) fail({ _tag: 'MalformedModel', reason: `tensor '${name}' of shape [${shape}] has more than ${MAX_ELEMENTS} elements` });
  }
  const size = bytesPerElement(dtype);
  const fromRaw = (bytes: Uint8Array, where: string): TensorData => {
    if (bytes.byteLength !== count * size) {
      fail({ _tag: 'MalformedModel', reason: `tensor '${name}' (${dtype}[${shape}]) needs ${count * size} bytes of ${where}; found ${bytes.byteLength}` });
    }
    return fromBytes(dtype, bytes);
  };
  let data: TensorData;
  if ((raw.dataLocation ?? 0) === 1) {
    const entries = new Map((raw.externalData ?? []).map((e) => [e.key ?? '', e.value ?? '']));
    const location = entries.get('location') ?? '';
    if (location === '') fail({ _tag: 'ExternalData', tensor: name, file: '', reason: 'no location given' });
    if (external === undefined) fail({ _tag: 'ExternalData', tensor: name, file: location, reason: 'the model was given as bytes with no directory to resolve external data from' });
    const offset = Number(entries.get('offset') ?? '0');
    const length = entries.has('length') ? Number(entries.get('length')) : count * size;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      fail({ _tag: 'ExternalData', tensor: name, file: location, reason: `offset '${entries.get('offset') ?? 0}' / length '${entries.get('length') ?? length}' are not byte counts` });
    }
    // The declared length must be the tensor's size before anything is read (a huge length is not read).
    if (length !== count * size) {
      fail({ _tag: 'MalformedModel', reason: `tensor '${name}' (${dtype}[${shape}]) needs ${count * size} bytes of external data; found ${length}` });
    }
    const file = external!(location, { offset, length });
    if (E.isLeft(file)) fail({ _tag: 'ExternalData', tensor: name, file: location, reason: file.left });
    data = fromRaw((file as E.Right<Uint8Array>).right, `external data`);
  } else if (raw.rawData !== undefined && raw.rawData.length > 0) {
    data = fromRaw(raw.rawData, 'raw_data');
  } else {
    const typed: ArrayLike<number | Int64Like> =
      dtype === 'float32' ? raw.floatData ?? []
      : dtype === 'float64' ? raw.doubleData ?? []
      : dtype === 'int64' ? raw.int64Data ?? []
      : dtype === 'uint32' || dtype === 'uint64' ? raw.uint64Data ?? []
      : raw.int32Data ?? [];
    if (typed.length !== count) {
      fail({ _tag: 'MalformedModel', reason: `tensor '${name}' (${dtype}[${shape}]) needs ${count} values; found ${typed.length}` });
    }
    data = allocate(dtype, count);
    for (let i = 0; i < count; i++) {
      const v = typed[i] as Int64Like;
      if (data instanceof BigInt64Array || data instanceof BigUint64Array) data[i] = big(v);
      else data[i] = num(v);
    }
  }
  return { dtype, shape, data };
};

const utf8 = new TextDecoder('utf-8', { fatal: false });

const decodeAttribute = (raw: RawAttribute, node: string, external: ExternalDataResolver | undefined): Attribute => {
  const name = raw.name ?? '';
  // The type field is authoritative; files from old writers may omit it, so fall back on the populated field.
  let type = raw.type ?? 0;
  if (type === 0) {
    type = raw.t ? OnnxAttributeType.TENSOR
      : raw.floats?.length ? OnnxAttributeType.FLOATS
      : raw.ints?.length ? OnnxAttributeType.INTS
      : raw.strings?.length ? OnnxAttributeType.STRINGS
      : raw.s?.length ? OnnxAttributeType.STRING
      : raw.f ? OnnxAttributeType.FLOAT
      : OnnxAttributeType.INT;
  }
  switch (type) {
    case OnnxAttributeType.FLOAT: return { kind: 'float', value: raw.f ?? 0 };
    case OnnxAttributeType.INT: return { kind: 'int', value: num(raw.i) };
    case OnnxAttributeType.STRING: return { kind: 'string', value: utf8.decode(raw.s ?? new Uint8Array()) };
    case OnnxAttributeType.TENSOR:
      if (!raw.t) return fail({ _tag: 'MalformedModel', reason: `node '${node}' attribute '${name}' is a tensor attribute with no tensor` });
      return { kind: 'tensor', value: decodeTensor(raw.t, `${node}.${name}`, external) };
    case OnnxAttributeType.FLOATS: return { kind: 'floats', value: [...(raw.floats ?? [])] };
    case OnnxAttributeType.INTS: return { kind: 'ints', value: (raw.ints ?? []).map(num) };
    case OnnxAttributeType.STRINGS: return { kind: 'strings', value: (raw.strings ?? []).map((s) => utf8.decode(s)) };
    case OnnxAttributeType.GRAPH:
    case OnnxAttributeType.GRAPHS:
      return fail({ _tag: 'UnsupportedOperator', node, opType: '(control flow)', reason: `attribute '${name}' holds a subgraph; control flow is not supported` });
    default:
      return fail({ _tag: 'MalformedModel', reason: `node '${node}' attribute '${name}' has attribute type ${type}, which is not supported` });
  }
};

const decodeValueInfo = (raw: RawValueInfo, what: string): ValueInfo => {
  const name = raw.name ?? '';
  if (name === '') fail({ _tag: 'MalformedModel', reason: `${what} has no name` });
  const tensorType = raw.type?.tensorType;
  if (!tensorType) fail({ _tag: 'MalformedModel', reason: `${what} '${name}' has no tensor type` });
  const dtype = onnxToDType[tensorType!.elemType ?? 0] ?? fail({ _tag: 'UnsupportedDataType', tensor: name, dataType: `ONNX data type ${tensorType!.elemType ?? 0}` });
  const shape: Dim[] = (tensorType!.shape?.dim ?? []).map((d, i) => {
    if (d.dimParam) return d.dimParam;
    const v = num(d.dimValue);
    if (!Number.isSafeInteger(v) || v < 0) return fail({ _tag: 'MalformedModel', reason: `${what} '${name}' dimension ${i} is ${v}` });
    return v;
  });
  return { name, dtype, shape };
};

const decodeNode = (raw: RawNode, index: number, used: Set<string>, external: ExternalDataResolver | undefined): Node => {
  const opType = raw.opType ?? '';
  if (opType === '') fail({ _tag: 'MalformedModel', reason: `node ${index} has no op_type` });
  // Names are optional in ONNX; ours are unique because weights and segments are addressed by them.
  let name = raw.name || `${opType}_${index}`;
  if (used.has(name)) name = `${name}__${index}`;
  used.add(name);
  const attributes: Record<string, Attribute> = {};
  for (const a of raw.attribute ?? []) {
    if (!a.name) fail({ _tag: 'MalformedModel', reason: `node '${name}' has an attribute with no name` });
    attributes[a.name!] = decodeAttribute(a, name, external);
  }
  return { name, opType, domain: raw.domain === 'ai.onnx' ? '' : raw.domain ?? '', inputs: [...(raw.input ?? [])], outputs: [...(raw.output ?? [])], attributes };
};

const fromRawModel = (model: RawModel, external: ExternalDataResolver | undefined): Graph => {
  const graph = model.graph ?? fail({ _tag: 'MalformedModel', reason: 'the model has no graph' });
  const defaultOpset = (model.opsetImport ?? []).find((o) => o.domain === '' || o.domain === 'ai.onnx' || o.domain === undefined);
  if (defaultOpset === undefined) fail({ _tag: 'MalformedModel', reason: 'the model imports no version of the default ONNX operator set' });
  const opset = num(defaultOpset!.version);
  if (opset < MIN_OPSET || opset > MAX_OPSET) fail({ _tag: 'UnsupportedOpset', domain: '', version: opset });
  const initializers: Initializer[] = [];
  const names = new Set<string>();
  (graph.initializer ?? []).forEach((raw, i) => {
    if (!raw.name) fail({ _tag: 'MalformedModel', reason: `initializer ${i} has no name` });
    if (names.has(raw.name!)) fail({ _tag: 'DuplicateTensor', tensor: raw.name! });
    names.add(raw.name!);
    initializers.push({ name: raw.name!, tensor: decodeTensor(raw, raw.name!, external) });
  });
  // Before IR version 4 initializers were also listed as inputs; they are not inputs to feed.
  const inputs = (graph.input ?? []).filter((v) => !names.has(v.name ?? '')).map((v) => decodeValueInfo(v, 'graph input'));
  const outputs = (graph.output ?? []).map((v, i) => v.name || fail({ _tag: 'MalformedModel', reason: `graph output ${i} has no name` }));
  if (outputs.length === 0) fail({ _tag: 'MalformedModel', reason: `graph '${graph.name ?? ''}' has no outputs: it would compute nothing` });
  const used = new Set<string>();
  const nodes = (graph.node ?? []).map((n, i) => decodeNode(n, i, used, external));
  return { name: graph.name ?? '', opset, inputs, outputs, initializers, nodes };
};

/** Decodes ONNX ModelProto bytes into a Graph. */
export const decodeOnnx = (bytes: Uint8Array, external?: ExternalDataResolver): E.Either<TraceErrorDetail, Graph> => {
  let model: RawModel;
  try {
    model = ModelProtoType.decode(bytes) as unknown as RawModel;
  } catch (e) {
    return E.left({ _tag: 'MalformedModel', reason: `protobuf decoding failed: ${(e as Error).message}` });
  }
  try {
    return E.right(fromRawModel(model, external));
  } catch (e) {
    if (e instanceof Failure) return E.left(e.detail);
    // A decoded message of the wrong shape (fuzzed bytes) can still trip over a field of an unexpected kind.
    return E.left({ _tag: 'MalformedModel', reason: `inconsistent model contents: ${(e as Error).message}` });
  }
};
