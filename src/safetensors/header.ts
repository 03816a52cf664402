/**
 * The safetensors header: an 8-byte little-endian length, then that many bytes of UTF-8 JSON mapping tensor
 * names to { dtype, shape, data_offsets } (offsets relative to the data section that follows) and an
 * optional "__metadata__" object of strings. `parseHeader` is pure: it refuses everything the reference
 * implementation refuses and, unless `lenient`, also duplicate names, a header not starting with '{' and
 * unknown fields in a tensor entry (the reference accepts those three).
 */
import * as E from 'fp-ts/lib/Either.js';
import { pipe } from 'fp-ts/lib/function.js';
import * as t from 'io-ts';
import { byteSize, type Dtype, isDtype } from './dtypes.js';
import { issue, type SafetensorsIssue } from './errors.js';
import { isJsonObject, type Json, JsonFloat, parseJson } from './json.js';

export const MAX_HEADER_LENGTH = 100_000_000;
export const METADATA_KEY = '__metadata__';

export interface HeaderOptions {
  /** Accept duplicate names (the last wins), a header starting with whitespace, and unknown entry fields. */
  readonly lenient?: boolean;
}

export interface TensorInfo {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  /** [start, end) relative to the data section, as the header states them. */
  readonly dataOffsets: readonly [number, number];
  /** Absolute position of the first byte in the file. */
  readonly byteOffset: number;
  readonly byteLength: number;
}

export interface Header {
  /** Bytes of JSON (padding included) after the 8-byte length. */
  readonly headerLength: number;
  /** 8 + headerLength: where the data section starts. */
  readonly dataStart: number;
  readonly metadata: Readonly<Record<string, string>> | undefined;
  /** In file order (by data offset). */
  readonly tensors: readonly TensorInfo[];
}

// ---- io-ts codecs for the JSON shapes ------------------------------------------------------------

const isDimension = (u: unknown): u is number => typeof u === 'number' && Number.isSafeInteger(u) && u >= 0;

/** A non-negative integer written as one (not 1.0, not 1e2). */
const Dimension = new t.Type<number, number, unknown>(
  'Dimension',
  isDimension,
  (u, c) => (isDimension(u) ? t.success(u) : t.failure(u, c)),
  (a) => a,
);

const Offsets = new t.Type<readonly [number, number], readonly [number, number], unknown>(
  'DataOffsets',
  (u): u is readonly [number, number] => Array.isArray(u) && u.length === 2 && u.every(isDimension),
  (u, c) =>
    Array.isArray(u) && u.length === 2 && isDimension(u[0]) && isDimension(u[1])
      ? t.success([u[0], u[1]] as const)
      : t.failure(u, c, 'data_offsets must be [start, end]'),
  (a) => a,
);

const TensorEntry = t.type({ dtype: t.string, shape: t.array(Dimension), data_offsets: Offsets }, 'TensorEntry');
const Metadata = t.union([t.null, t.record(t.string, t.string)], 'Metadata');
const entryFields: ReadonlySet<string> = new Set(['dtype', 'shape', 'data_offsets']);

const describeDecodeErrors = (errors: t.Errors): string =>
  errors
    .slice(0, 3)
    .map((e) => {
      const where = e.context
        .map((c) => c.key)
        .filter((k) => k !== '')
        .join('.');
      const value = e.value;
      const shown =
        typeof value === 'bigint' ? `${value}` : value instanceof JsonFloat ? `${value.value} (not an integer)` : JSON.stringify(value);
      return `${where === '' ? 'value' : where}: expected ${e.context[e.context.length - 1]?.type.name ?? '?'}, found ${shown}`;
    })
    .join('; ');

/** Whether a decoding failure is only a too-large (but unsigned 64-bit) integer: representable for the
 *  reference, not for us. */
const hasLargeInteger = (value: Json): boolean =>
  typeof value === 'bigint' ? value >= 0n && value < 1n << 64n : Array.isArray(value) && value.some(hasLargeInteger);

// ---- parsing -----------------------------------------------------------------------------------

/** Reads the 8-byte header length from a prefix of at least 8 bytes. */
export const headerLengthOf = (prefix: Uint8Array): bigint =>
  new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Parses and validates a header. `prefix` holds the file's first min(fileSize, 8 + header length) bytes
 * (or more); `fileSize` is the whole file's size, against which the layout is checked.
 */
export const parseHeader = (
  prefix: Uint8Array,
  fileSize: number,
  file: string,
  options: HeaderOptions = {},
): E.Either<SafetensorsIssue, Header> => {
  if (fileSize < 8 || prefix.length < 8) {
    return E.left(issue('HeaderTooSmall', file, `expected at least 8 bytes, found ${Math.min(fileSize, prefix.length)}`));
  }
  const length = headerLengthOf(prefix);
  if (length > BigInt(MAX_HEADER_LENGTH)) {
    return E.left(issue('HeaderTooLarge', file, `header length ${length} exceeds ${MAX_HEADER_LENGTH}`));
  }
  const headerLength = Number(length);
  if (8 + headerLength > fileSize) {
    return E.left(issue('HeaderPastEnd', file, `header of ${headerLength} bytes ends past the file's ${fileSize} bytes`));
  }
  if (prefix.length < 8 + headerLength) {
    throw new RangeError(`parseHeader: prefix of ${prefix.length} bytes holds less than the ${8 + headerLength}-byte header`);
  }
  const bytes = prefix.subarray(8, 8 + headerLength);
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    return E.left(issue('HeaderNotUtf8', file, `header bytes are not valid UTF-8 (at or after byte ${firstInvalidUtf8(bytes) + 8})`));
  }
  if (!options.lenient && !text.startsWith('{')) {
    return E.left(issue('HeaderStart', file, `header must start with '{', found ${JSON.stringify(text.slice(0, 1))}`));
  }
  const parsed = parseJson(text);
  if (!parsed.ok) return E.left(issue('InvalidJson', file, parsed.detail));
  const root = parsed.value;
  if (!isJsonObject(root)) return E.left(issue('InvalidHeaderSchema', file, 'the header must be a JSON object'));

  for (const duplicate of parsed.duplicates) {
    const [first] = duplicate.path;
    if (duplicate.path.length === 0 || (duplicate.path.length === 1 && first === METADATA_KEY)) {
      if (!options.lenient) {
        const what = duplicate.path.length === 0 ? 'tensor name' : 'metadata key';
        return E.left(issue('DuplicateName', file, `${what} '${duplicate.key}' appears more than once`, duplicate.key));
      }
    } else if (duplicate.path.length === 1 && first !== undefined && entryFields.has(duplicate.key)) {
      return E.left(issue('InvalidHeaderSchema', file, `duplicate field '${duplicate.key}'`, first));
    }
  }

  let metadata: Readonly<Record<string, string>> | undefined;
  const entries: { name: string; dtype: Dtype; shape: number[]; offsets: readonly [number, number] }[] = [];
  for (const name of Object.keys(root)) {
    const value = root[name] as Json;
    if (name === METADATA_KEY) {
      const decoded = Metadata.decode(value);
      if (E.isLeft(decoded)) {
        return E.left(issue('InvalidMetadata', file, `__metadata__ must be an object of strings: ${describeDecodeErrors(decoded.left)}`));
      }
      metadata = decoded.right === null ? undefined : { ...decoded.right };
      continue;
    }
    if (!isJsonObject(value)) {
      return E.left(issue('InvalidHeaderSchema', file, 'expected an object with dtype, shape and data_offsets', name));
    }
    if (!options.lenient) {
      const unknown = Object.keys(value).find((k) => !entryFields.has(k));
      if (unknown !== undefined) {
        return E.left(issue('UnknownField', file, `unknown field '${unknown}' (expected only dtype, shape, data_offsets)`, name));
      }
    }
    if (typeof value.dtype === 'string' && !isDtype(value.dtype)) {
      return E.left(issue('UnknownDtype', file, `unknown dtype '${value.dtype}'`, name));
    }
    const decoded = TensorEntry.decode(value);
    if (E.isLeft(decoded)) {
      const large = hasLargeInteger(value.shape ?? null) || hasLargeInteger(value.data_offsets ?? null);
      return E.left(
        large
          ? issue('UnsupportedDimension', file, 'a dimension or offset above 2^53 cannot be represented here', name)
          : issue('InvalidHeaderSchema', file, describeDecodeErrors(decoded.left), name),
      );
    }
    entries.push({ name, dtype: decoded.right.dtype as Dtype, shape: decoded.right.shape, offsets: decoded.right.data_offsets });
  }
  return pipe(
    validateLayout(entries, 8 + headerLength, fileSize, file),
    E.map((tensors) => ({ headerLength, dataStart: 8 + headerLength, metadata, tensors })),
  );
};

/** The reference's layout checks: sorted by offsets, tensors tile the data section from 0 without gaps or
 *  overlaps, each span equals its shape's bytes, and the file ends where the data ends. */
const validateLayout = (
  entries: readonly { name: string; dtype: Dtype; shape: number[]; offsets: readonly [number, number] }[],
  dataStart: number,
  fileSize: number,
  file: string,
): E.Either<SafetensorsIssue, readonly TensorInfo[]> => {
  const sorted = [...entries].sort((a, b) => a.offsets[0] - b.offsets[0] || a.offsets[1] - b.offsets[1]);
  const tensors: TensorInfo[] = [];
  let expectedStart = 0;
  for (const { name, dtype, shape, offsets } of sorted) {
    const [start, end] = offsets;
    if (end < start) return E.left(issue('InvalidOffsets', file, `data_offsets [${start}, ${end}] end before they start`, name));
    if (start > expectedStart) {
      return E.left(issue('DataGap', file, `data starts at ${start}, expected ${expectedStart} (bytes nobody owns before it)`, name));
    }
    if (start < expectedStart) {
      return E.left(issue('DataOverlap', file, `data starts at ${start}, inside the previous tensor's bytes (ending at ${expectedStart})`, name));
    }
    const size = byteSize(dtype, shape);
    if (size === 'overflow') {
      return E.left(issue('ShapeOverflow', file, `shape [${shape.join(', ')}] of ${dtype} overflows 64 bits`, name));
    }
    if (size === 'misaligned') {
      return E.left(issue('MisalignedSlice', file, `shape [${shape.join(', ')}] of ${dtype} is not a whole number of bytes`, name));
    }
    if (BigInt(end - start) !== size) {
      return E.left(
        issue('SpanMismatch', file, `data_offsets [${start}, ${end}] span ${end - start} bytes, shape [${shape.join(', ')}] of ${dtype} needs ${size}`, name),
      );
    }
    tensors.push({ name, dtype, shape, dataOffsets: [start, end], byteOffset: dataStart + start, byteLength: end - start });
    expectedStart = end;
  }
  const expectedSize = dataStart + expectedStart;
  if (fileSize < expectedSize) {
    return E.left(issue('Truncated', file, `expected ${expectedSize} bytes (8 + header + data), found ${fileSize}`));
  }
  if (fileSize > expectedSize) {
    return E.left(issue('TrailingBytes', file, `expected ${expectedSize} bytes (8 + header + data), found ${fileSize}`));
  }
  return E.right(tensors);
};

const firstInvalidUtf8 = (bytes: Uint8Array): number => {
  // Binary search for the shortest prefix that fails to decode: the bad sequence starts near its end.
  let low = 0;
  let high = bytes.length;
  const decodes = (n: number): boolean => {
    try {
      new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(0, n), { stream: true });
      return true;
    } catch {
      return false;
    }
  };
  while (low < high) {
    const mid = (low + high) >> 1;
    if (decodes(mid + 1)) low = mid + 1;
    else high = mid;
  }
  return low;
};
