/**
 * The compiled-model file, MODEL.trtr: one file holding everything a refit and a run need, so neither the
 * ONNX file nor any search is needed afterwards.
 *
 *   bytes 0..8    magic "TRTREFIT"
 *   bytes 8..12   format version (u32 LE)
 *   bytes 12..16  reserved, 0
 *   bytes 16..24  header offset in bytes (u64 LE)
 *   bytes 24..32  header length in bytes (u64 LE)
 *   bytes 32..64  sha256 of the header bytes
 *   64..          blobs, each at a 64-byte aligned offset the header gives, with its length and sha256:
 *                 every engine segment's libtrtshim engine file (with weights), and every fallback
 *                 segment's ONNX model bytes (its initializers hold the current fallback weights)
 *   then          the header: UTF-8 JSON (ModelHeaderCodec), last, so blobs stream out once while written.
 *
 * The header holds the format version, the model's inputs and outputs, the dtype and shape of every tensor
 * passed between segments, the segments in run order, the partition report, the weight map (its io-ts
 * codec), and the source digests each target holds now (so a refit moves only what changed).
 * Pure: this module encodes and decodes bytes; src/model/file.ts does the I/O.
 */
import { createHash } from 'node:crypto';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import { WeightMapCodec, type WeightMap } from '../weightmap/map.js';
import { formatWeightFormat, parseWeightFormat } from '../quant/format.js';

export const MAGIC = 'TRTREFIT';
export const FORMAT_VERSION = 1;
export const PREAMBLE_BYTES = 64;
export const BLOB_ALIGNMENT = 64;
/** A header larger than this is refused as damaged (a weight map of a million targets is far below). */
export const MAX_HEADER_BYTES = 1 << 30;

const DTypeCodec = t.keyof({
  float32: null, float16: null, bfloat16: null, float64: null, int8: null, uint8: null, int16: null, uint16: null,
  int32: null, uint32: null, int64: null, uint64: null, bool: null,
});
const Shape = t.readonlyArray(t.number);
export const TensorDescCodec = t.type({ name: t.string, dtype: DTypeCodec, shape: Shape });
export type TensorDesc = t.TypeOf<typeof TensorDescCodec>;

export const BlobRefCodec = t.type({ offset: t.number, length: t.number, sha256: t.string });
export type BlobRef = t.TypeOf<typeof BlobRefCodec>;

const SegmentBase = { index: t.number, inputs: t.readonlyArray(t.string), outputs: t.readonlyArray(t.string), blob: BlobRefCodec };
export const SegmentRecordCodec = t.union([
  t.type({ kind: t.literal('engine'), ...SegmentBase, layers: t.number, weights: t.number }),
  t.type({ kind: t.literal('fallback'), ...SegmentBase, initializers: t.readonlyArray(TensorDescCodec) }),
]);
export type SegmentRecord = t.TypeOf<typeof SegmentRecordCodec>;

export const PartitionReportCodec = t.type({
  segments: t.readonlyArray(t.type({ index: t.number, kind: t.keyof({ engine: null, fallback: null }), nodes: t.number, opTypes: t.readonlyArray(t.string) })),
  folded: t.number,
  fallbackReasons: t.readonlyArray(t.type({ node: t.string, reason: t.string })),
});
export type PartitionReport = t.TypeOf<typeof PartitionReportCodec>;

/** A weight format as `--weight-format` spells it (fp32, fp16, bf16, int8, fp8, int4:GROUP), canonical. */
export const WeightFormatTextCodec = new t.Type<string, string, unknown>(
  'WeightFormatText',
  (u): u is string => typeof u === 'string' && E.isRight(parseWeightFormat(u)),
  (u, c) => {
    if (typeof u !== 'string') return t.failure(u, c, 'expected a weight format string');
    const parsed = parseWeightFormat(u);
    return E.isRight(parsed) ? t.success(formatWeightFormat(parsed.right)) : t.failure(u, c, `not a weight format: '${u}'`);
  },
  (a) => a,
);

export const BuildInfoCodec = t.intersection([
  t.type({
    weightPrecision: t.keyof({ float32: null, float16: null, bfloat16: null }),
    tacticSearch: t.boolean,
    allowUnmapped: t.boolean,
    source: t.string,
  }),
  // Optional, so files written before it existed still read: the engines were built with weight streaming
  // (a run may then set a budget; see src/streaming).
  t.partial({ weightStreaming: t.boolean }),
  // Optional likewise: the format of GEMM and convolution kernels (absent in older files, whose engines
  // are float: weightFormatOf reads them as weightPrecision), and 'float' when convolutions stayed float.
  t.partial({ weightFormat: WeightFormatTextCodec, convWeightFormat: t.literal('float') }),
]);
export type BuildInfo = t.TypeOf<typeof BuildInfoCodec>;

/** The kernel weight format a compiled model was built with; files from before quantization are float. */
export const weightFormatOf = (build: BuildInfo): string =>
  build.weightFormat ?? { float32: 'fp32', float16: 'fp16', bfloat16: 'bf16' }[build.weightPrecision];

export interface ModelHeader {
  readonly format: 'trt-refit-model';
  readonly version: 1;
  readonly inputs: readonly TensorDesc[];
  readonly outputs: readonly string[];
  /** dtype and shape of every model input, segment boundary tensor and model output. */
  readonly tensors: readonly TensorDesc[];
  readonly segments: readonly SegmentRecord[];
  readonly partition: PartitionReport;
  readonly build: BuildInfo;
  readonly weightMap: WeightMap;
  /** Source digest each mapped target holds now, by target id. */
  readonly current: Readonly<Record<string, string>>;
}

export const ModelHeaderCodec: t.Type<ModelHeader> = t.type({
  format: t.literal('trt-refit-model'),
  version: t.literal(1),
  inputs: t.readonlyArray(TensorDescCodec),
  outputs: t.readonlyArray(t.string),
  tensors: t.readonlyArray(TensorDescCodec),
  segments: t.readonlyArray(SegmentRecordCodec),
  partition: PartitionReportCodec,
  build: BuildInfoCodec,
  weightMap: WeightMapCodec,
  current: t.record(t.string, t.string),
}) as unknown as t.Type<ModelHeader>;

/** sha256 in chunks (one update call refuses more than 2 GiB). */
export const sha256 = (bytes: Uint8Array): string => {
  const hash = createHash('sha256');
  for (let at = 0; at < bytes.byteLength; at += 1 << 30) hash.update(bytes.subarray(at, Math.min(bytes.byteLength, at + (1 << 30))));
  return hash.digest('hex');
};
export const align = (n: number): number => Math.ceil(n / BLOB_ALIGNMENT) * BLOB_ALIGNMENT;

export const encodePreamble = (headerOffset: number, header: Uint8Array): Uint8Array => {
  const out = new Uint8Array(PREAMBLE_BYTES);
  out.set(new TextEncoder().encode(MAGIC), 0);
  const view = new DataView(out.buffer);
  view.setUint32(8, FORMAT_VERSION, true);
  view.setUint32(12, 0, true);
  view.setBigUint64(16, BigInt(headerOffset), true);
  view.setBigUint64(24, BigInt(header.byteLength), true);
  out.set(createHash('sha256').update(header).digest(), 32);
  return out;
};

/** Checks the preamble; Right: where the header is and its expected digest. */
export const decodePreamble = (preamble: Uint8Array, fileSize: number): E.Either<string, { headerOffset: number; headerLength: number; headerSha256: string }> => {
  if (fileSize < PREAMBLE_BYTES || preamble.byteLength < PREAMBLE_BYTES) return E.left(`the file has ${fileSize} bytes; a compiled model has at least ${PREAMBLE_BYTES}`);
  const magic = new TextDecoder().decode(preamble.subarray(0, 8));
  if (magic !== MAGIC) return E.left(`not a trt-refit compiled model: expected magic "${MAGIC}", found ${JSON.stringify(magic)}`);
  const view = new DataView(preamble.buffer, preamble.byteOffset, PREAMBLE_BYTES);
  const version = view.getUint32(8, true);
  if (version !== FORMAT_VERSION) return E.left(`format version ${version}; this build reads version ${FORMAT_VERSION}`);
  const offset = view.getBigUint64(16, true);
  const length = view.getBigUint64(24, true);
  if (offset < BigInt(PREAMBLE_BYTES) || length > BigInt(MAX_HEADER_BYTES) || offset + length !== BigInt(fileSize)) {
    return E.left(`the header [${offset}, ${offset + length}) does not end the file (${fileSize} bytes): the file is truncated or damaged`);
  }
  return E.right({ headerOffset: Number(offset), headerLength: Number(length), headerSha256: Buffer.from(preamble.subarray(32, 64)).toString('hex') });
};

/** Decodes and checks the header: digest, JSON, codec, and blobs inside the file without overlaps. */
export const decodeHeader = (bytes: Uint8Array, expectedSha256: string, headerOffset: number): E.Either<string, ModelHeader> => {
  if (sha256(bytes) !== expectedSha256) return E.left('the header does not match its sha256 (the file is damaged)');
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (e) {
    return E.left(`the header is not JSON: ${(e as Error).message}`);
  }
  const decoded = ModelHeaderCodec.decode(json);
  if (E.isLeft(decoded)) return E.left(`the header is not a compiled model's: ${PathReporter.report(decoded).slice(0, 3).join('; ')}`);
  const header = decoded.right;
  const blobs = header.segments.map((s) => ({ index: s.index, ...s.blob })).sort((a, b) => a.offset - b.offset);
  let end = PREAMBLE_BYTES;
  for (const b of blobs) {
    if (!Number.isSafeInteger(b.offset) || !Number.isSafeInteger(b.length) || b.length < 0) return E.left(`segment ${b.index}: blob offset ${b.offset} / length ${b.length} are not byte counts`);
    if (b.offset < end) return E.left(`segment ${b.index}: blob at ${b.offset} overlaps the preamble or another blob (ends at ${end})`);
    end = b.offset + b.length;
    if (end > headerOffset) return E.left(`segment ${b.index}: blob [${b.offset}, ${end}) runs into the header at ${headerOffset}`);
  }
  const targets = new Set(header.weightMap.targets.map((x) => x.id));
  for (const id of Object.keys(header.current)) if (!targets.has(id)) return E.left(`current digests name '${id}', which the weight map does not have`);
  const crossChecked = crossCheckHeader(header);
  return crossChecked === undefined ? E.right(header) : E.left(crossChecked);
};

const isCount = (n: unknown): boolean => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

/**
 * The header's fields checked against each other before anything uses them (a damaged or hostile header
 * is an error naming the field, never a crash later): tensor names unique with valid shapes; model inputs
 * and outputs and every segment's inputs and outputs in the tensor table; segment indices unique; every
 * segment input a model input or an output of an earlier segment; weight map targets unique and naming an
 * existing segment of their kind. Undefined when consistent, else the problem.
 */
export const crossCheckHeader = (header: ModelHeader): string | undefined => {
  const types = new Map<string, TensorDesc>();
  for (const [i, t] of header.tensors.entries()) {
    if (types.has(t.name)) return `tensors[${i}]: tensor '${t.name}' is listed twice`;
    if (!t.shape.every(isCount)) return `tensors[${i}] ('${t.name}'): shape [${t.shape.join(', ')}] is not a list of non-negative integers`;
    types.set(t.name, t);
  }
  const available = new Set<string>();
  for (const [i, t] of header.inputs.entries()) {
    if (!t.shape.every(isCount)) return `inputs[${i}] ('${t.name}'): shape [${t.shape.join(', ')}] is not a list of non-negative integers`;
    if (available.has(t.name)) return `inputs[${i}]: input '${t.name}' is listed twice`;
    const known = types.get(t.name);
    if (known === undefined) return `inputs[${i}]: input '${t.name}' is not in the header's tensor table`;
    if (known.dtype !== t.dtype) return `inputs[${i}]: input '${t.name}' is ${t.dtype}, but the tensor table says ${known.dtype}`;
    available.add(t.name);
  }
  const kinds = new Map<number, SegmentRecord['kind']>();
  for (const [i, s] of header.segments.entries()) {
    if (!isCount(s.index)) return `segments[${i}].index: ${s.index} is not a non-negative integer`;
    if (kinds.has(s.index)) return `segments[${i}].index: segment ${s.index} is listed twice`;
    kinds.set(s.index, s.kind);
    if (s.kind === 'engine' && (!isCount(s.layers) || !isCount(s.weights))) return `segments[${i}] (segment ${s.index}): layers ${s.layers} / weights ${s.weights} are not counts`;
    if (s.kind === 'fallback') {
      for (const [k, t] of s.initializers.entries()) {
        if (!t.shape.every(isCount)) return `segments[${i}].initializers[${k}] ('${t.name}'): shape [${t.shape.join(', ')}] is not a list of non-negative integers`;
      }
    }
    for (const [k, name] of s.inputs.entries()) {
      if (!types.has(name)) return `segments[${i}].inputs[${k}] (segment ${s.index}): tensor '${name}' is not in the header's tensor table`;
      if (!available.has(name)) return `segments[${i}].inputs[${k}] (segment ${s.index}): tensor '${name}' is neither a model input nor an output of an earlier segment`;
    }
    for (const [k, name] of s.outputs.entries()) {
      if (!types.has(name)) return `segments[${i}].outputs[${k}] (segment ${s.index}): tensor '${name}' is not in the header's tensor table`;
    }
    for (const name of s.outputs) available.add(name);
  }
  for (const [i, name] of header.outputs.entries()) {
    if (!types.has(name)) return `outputs[${i}]: output '${name}' is not in the header's tensor table`;
    if (!available.has(name)) return `outputs[${i}]: output '${name}' is neither a model input nor an output of any segment`;
  }
  const ids = new Set<string>();
  for (const [i, t] of header.weightMap.targets.entries()) {
    if (ids.has(t.id)) return `weightMap.targets[${i}]: target '${t.id}' is listed twice`;
    ids.add(t.id);
    const kind = kinds.get(t.segment);
    if (kind === undefined) return `weightMap.targets[${i}]: target '${t.id}' names segment ${t.segment}, which the header has no segment of`;
    if (kind !== t.kind) return `weightMap.targets[${i}]: target '${t.id}' is a ${t.kind} weight, but segment ${t.segment} is a ${kind} segment`;
    if (!t.shape.every(isCount)) return `weightMap.targets[${i}] ('${t.id}'): shape [${t.shape.join(', ')}] is not a list of non-negative integers`;
  }
  return undefined;
};

