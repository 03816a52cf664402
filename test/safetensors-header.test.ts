/**
 * The header parser refuses what the reference refuses, one rule per corruption, with the rule as the
 * error's tag; the three strict rules are lifted by `lenient`. Corruptions are applied to valid files
 * built by hand (test/support), not by the writer.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { byteSize, type Dtype } from '../src/safetensors/dtypes.js';
import { parseHeader } from '../src/safetensors/header.js';
import { openSafetensors } from '../src/safetensors/reader.js';
import { SafetensorsError } from '../src/safetensors/errors.js';
import { assemble, headerJson, type RawTensor, temporaryDirectory } from './support/safetensors.js';

interface Base {
  tensors: RawTensor[];
  data: Uint8Array;
  metadata?: string;
}

const alignedDtypes: Dtype[] = ['BOOL', 'U8', 'I8', 'F8_E4M3', 'F8_E5M2', 'I16', 'F16', 'BF16', 'I32', 'F32', 'C64', 'F64', 'I64', 'U64'];
const spec = (minDim: number) =>
  fc.record({
    name: fc.stringMatching(/^[a-z][a-z0-9_]{0,8}$/),
    dtype: fc.constantFrom(...alignedDtypes),
    shape: fc.array(fc.integer({ min: minDim, max: 4 }), { minLength: minDim > 0 ? 1 : 0, maxLength: 3 }),
  });

/** A valid file: at least two non-empty tensors first, then any, laid out contiguously in random order. */
const baseArb: fc.Arbitrary<Base> = fc
  .tuple(fc.array(spec(1), { minLength: 2, maxLength: 2 }), fc.array(spec(0), { maxLength: 4 }), fc.boolean())
  .map(([first, rest, withMetadata]) => {
    const seen = new Set<string>();
    const specs = [...first, ...rest].filter((s) => !seen.has(s.name) && seen.add(s.name));
    let offset = 0;
    const tensors = specs.map((s): RawTensor => {
      const size = Number(byteSize(s.dtype, s.shape));
      const t: RawTensor = { name: s.name, dtype: s.dtype, shape: s.shape, offsets: [offset, offset + size] };
      offset += size;
      return t;
    });
    return { tensors, data: Uint8Array.from({ length: offset }, (_, i) => (i * 31 + 7) & 0xff), metadata: withMetadata ? '{"format":"pt"}' : undefined };
  })
  .filter((b) => b.tensors.length >= 2 && b.tensors[0]!.offsets[1] > 0 && b.tensors[1]!.offsets[1] > b.tensors[1]!.offsets[0]);

const build = (b: Base): Uint8Array => assemble(headerJson(b.tensors, b.metadata), b.data);
const parse = (bytes: Uint8Array, lenient = false) => parseHeader(bytes, bytes.length, 'corrupt.safetensors', { lenient });
const tagOf = (bytes: Uint8Array, lenient = false): string => {
  const result = parse(bytes, lenient);
  return E.isLeft(result) ? result.left._tag : 'accepted';
};
const setLength = (bytes: Uint8Array, length: bigint): Uint8Array => {
  const out = bytes.slice();
  new DataView(out.buffer).setBigUint64(0, length, true);
  return out;
};
const withTensor = (b: Base, index: number, change: Partial<RawTensor>): Base => ({
  ...b,
  tensors: b.tensors.map((t, i) => (i === index ? { ...t, ...change } : t)),
});
/** Moves every tensor from `index` on by `delta` bytes. */
const shiftFrom = (b: Base, index: number, delta: number): RawTensor[] =>
  b.tensors.map((t, i) => (i >= index ? { ...t, offsets: [t.offsets[0] + delta, t.offsets[1] + delta] } : t));

type Corruption = (b: Base, n: number) => Uint8Array;
/** One generator per rule; `n` is a random positive integer for the generator to use. */
const corruptions: Record<string, Corruption> = {
  HeaderTooSmall: (b, n) => build(b).subarray(0, n % 8),
  HeaderTooLarge: (b, n) => setLength(build(b), 100_000_001n + BigInt(n) * 1_000_003n),
  HeaderPastEnd: (b, n) => {
    const bytes = build(b);
    return setLength(bytes, BigInt(bytes.length - 8 + 1 + (n % 1000)));
  },
  HeaderNotUtf8: (b, n) => {
    const bytes = build(b);
    const at = 8 + headerJson(b.tensors, b.metadata).indexOf(b.tensors[0]!.name);
    bytes.set([[0xff], [0xc0, 0x80], [0xed, 0xa0, 0x80]][n % 3]!, at); // invalid byte, overlong, surrogate
    return bytes;
  },
  HeaderStart: (b, n) => assemble(' \n\t'.slice(0, 1 + (n % 3)) + headerJson(b.tensors, b.metadata), b.data),
  InvalidJson: (b, n) => {
    const json = headerJson(b.tensors, b.metadata);
    const broken = [json.slice(0, -1), json.replace(':{', ':{,'), `${json}x`, json.replace('"dtype"', "'dtype'")][n % 4]!;
    return assemble(broken, b.data);
  },
  InvalidHeaderSchema: (b, n) => {
    const i = n % b.tensors.length;
    const t = b.tensors[i]!;
    const variants: Base[] = [
      withTensor(b, i, { shape: [...t.shape.slice(0, -1), '-1'] }),
      withTensor(b, i, { shape: [...t.shape, '1.0'] }),
      withTensor(b, i, { offsets: [t.offsets[0], `${t.offsets[1]},0` as unknown as number] }),
    ];
    if (n % 4 === 3) return assemble(headerJson(b.tensors, b.metadata).replace(`${JSON.stringify(t.name)}:{`, `${JSON.stringify(t.name)}:{"dtype":"F32",`), b.data);
    return build(variants[n % 3]!);
  },
  UnknownDtype: (b, n) => build(withTensor(b, n % b.tensors.length, { dtype: ['F99', 'f32', 'FLOAT', ''][n % 4]! })),
  InvalidMetadata: (b, n) => build({ ...b, metadata: ['{"format":1}', '{"a":null}', '[]', '"pt"'][n % 4]! }),
  UnknownField: (b, n) => build(withTensor(b, n % b.tensors.length, { extra: `,"extra_${n % 5}":${n}` })),
  DuplicateName: (b, n) => {
    const t = b.tensors[n % b.tensors.length]!;
    return assemble(headerJson([...b.tensors, t], b.metadata), b.data);
  },
  UnsupportedDimension: (b) => build({ ...b, tensors: [...b.tensors, { name: 'huge_but_empty', dtype: 'F32', shape: [2 ** 60, 0], offsets: [b.data.length, b.data.length] }] }),
  InvalidOffsets: (b, n) => {
    const t = b.tensors[1]!; // starts after a non-empty tensor
    return build(withTensor(b, 1, { offsets: [t.offsets[0], t.offsets[0] - 1 - (n % t.offsets[0])] }));
  },
  DataGap: (b, n) => {
    const gap = 1 + (n % 16);
    const at = n % b.tensors.length;
    const start = b.tensors[at]!.offsets[0];
    const data = new Uint8Array(b.data.length + gap);
    data.set(b.data.subarray(0, start));
    data.set(b.data.subarray(start), start + gap);
    return build({ ...b, tensors: shiftFrom(b, at, gap), data });
  },
  DataOverlap: (b, n) => {
    const previous = b.tensors[0]!.offsets[1];
    const overlap = 1 + (n % previous);
    return build({ ...b, tensors: shiftFrom(b, 1, -overlap), data: b.data.subarray(overlap) });
  },
  ShapeOverflow: (b, n) => build(withTensor(b, n % b.tensors.length, { shape: [2 ** 32, 2 ** 32, 1 + (n % 3)] })),
  MisalignedSlice: (b, n) => {
    const i = n % b.tensors.length;
    return build(withTensor(b, i, { dtype: ['F4', 'F6_E2M3', 'F6_E3M2'][n % 3]!, shape: [2 * (n % 50) + 1] }));
  },
  SpanMismatch: (b, n) => {
    const i = n % b.tensors.length;
    const t = b.tensors[i]!;
    const empty = t.offsets[1] === t.offsets[0];
    return build(withTensor(b, i, { shape: empty ? [1] : [...t.shape.map(Number), 2] }));
  },
  Truncated: (b, n) => {
    const bytes = build(b);
    return bytes.subarray(0, bytes.length - 1 - (n % b.data.length));
  },
  TrailingBytes: (b, n) => {
    const bytes = build(b);
    const out = new Uint8Array(bytes.length + 1 + (n % 64));
    out.set(bytes);
    return out;
  },
};
const lenientAccepts = new Set(['HeaderStart', 'UnknownField', 'DuplicateName']);

describe('valid files', () => {
  test.prop([baseArb])('parse, strict and lenient, with the tensors as written', (b) => {
    for (const lenient of [false, true]) {
      const result = parse(build(b), lenient);
      expect(E.isRight(result)).toBe(true);
      if (E.isRight(result)) {
        expect(result.right.tensors.map((t) => [t.name, t.dtype, t.shape, t.dataOffsets])).toEqual(
          b.tensors.map((t) => [t.name, t.dtype, t.shape, t.offsets]).sort((x, y) => (x[3] as number[])[0]! - (y[3] as number[])[0]! || (x[3] as number[])[1]! - (y[3] as number[])[1]!),
        );
        expect(result.right.metadata).toEqual(b.metadata === undefined ? undefined : { format: 'pt' });
      }
    }
  });
});

describe('each corruption gives its own typed error', () => {
  for (const [rule, corrupt] of Object.entries(corruptions)) {
    test.prop([baseArb, fc.nat({ max: 1_000_000 })], { numRuns: 60 })(rule, (b, n) => {
      const bytes = corrupt(b, n);
      expect(tagOf(bytes)).toBe(rule);
      expect(tagOf(bytes, true)).toBe(lenientAccepts.has(rule) ? 'accepted' : rule);
    });
  }

  test.prop([baseArb, fc.nat({ max: 1_000_000 }), fc.constantFrom(...Object.keys(corruptions))], { numRuns: 30 })(
    'through the file reader too: a rejection naming the file and the rule, never a crash',
    async (b, n, rule) => {
      using dir = temporaryDirectory();
      const path = join(dir.path, 'corrupt.safetensors');
      writeFileSync(path, (corruptions[rule] as Corruption)(b, n));
      const error = await openSafetensors(path).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(SafetensorsError);
      expect((error as SafetensorsError)._tag).toBe(rule);
      expect((error as SafetensorsError).message).toContain(path);
    },
  );

  test.prop([baseArb, fc.uint8Array({ minLength: 1, maxLength: 16 }), fc.nat()], { numRuns: 300 })(
    'random byte damage in the header: refused or parsed consistently, never thrown',
    (b, garbage, at) => {
      const bytes = build(b);
      const position = 8 + (at % (bytes.length - 8));
      bytes.set(garbage.subarray(0, bytes.length - position), position);
      const result = parse(bytes);
      if (E.isRight(result)) {
        // Whatever was accepted still tiles the data section exactly.
        let end = 0;
        for (const t of result.right.tensors) {
          expect(t.dataOffsets[0]).toBe(end);
          end = t.dataOffsets[1];
        }
        expect(result.right.dataStart + end).toBe(bytes.length);
      }
    },
  );
});

describe('errors name the tensor', () => {
  it('a span mismatch names the tensor and both sizes', () => {
    const bytes = assemble(headerJson([{ name: 'w', dtype: 'F32', shape: [3], offsets: [0, 8] }]), new Uint8Array(8));
    const result = parse(bytes);
    expect(E.isLeft(result) && result.left).toMatchObject({ _tag: 'SpanMismatch', tensor: 'w', file: 'corrupt.safetensors' });
    expect(E.isLeft(result) && result.left.detail).toMatch(/8 bytes.*needs 12/);
  });
  it('lenient duplicates keep the last entry, as the reference does', () => {
    const json = `{"a":{"dtype":"U8","shape":[9],"data_offsets":[0,9]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`;
    const result = parse(assemble(json, new Uint8Array(2)), true);
    expect(E.isRight(result) && result.right.tensors).toEqual([expect.objectContaining({ name: 'a', shape: [2] })]);
  });
  it('an empty header object is a valid empty file; so is a null __metadata__', () => {
    expect(tagOf(assemble('{}', new Uint8Array(0)))).toBe('accepted');
    expect(tagOf(assemble('{"__metadata__":null}', new Uint8Array(0)))).toBe('accepted');
  });
});

describe('the strict JSON parser', () => {
  it('agrees with JSON.parse on valid JSON (numbers within 2^53, no duplicates)', async () => {
    const { parseJson, JsonFloat } = await import('../src/safetensors/json.js');
    fc.assert(
      fc.property(fc.jsonValue({ maxDepth: 4 }), (value) => {
        const text = JSON.stringify(value);
        const parsed = parseJson(text);
        expect(parsed.ok).toBe(true);
        const plain = (v: unknown): unknown =>
          typeof v === 'bigint' ? Number(v) : v instanceof JsonFloat ? v.value : Array.isArray(v) ? v.map(plain) : v !== null && typeof v === 'object' ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)])) : v;
        if (parsed.ok) expect(plain(parsed.value)).toEqual(JSON.parse(text));
      }),
    );
  });
  it('reports duplicates with their path, big integers as bigint, and refuses what JSON refuses', async () => {
    const { parseJson, JsonFloat } = await import('../src/safetensors/json.js');
    const parsed = parseJson('{"a":{"x":1,"x":2},"b":18446744073709551615,"c":1.0,"d":1e2}');
    expect(parsed.ok && parsed.duplicates).toEqual([{ path: ['a'], key: 'x' }]);
    expect(parsed.ok && (parsed.value as Record<string, unknown>).b).toBe(18446744073709551615n);
    expect(parsed.ok && (parsed.value as Record<string, unknown>).c).toBeInstanceOf(JsonFloat);
    for (const bad of ['{"a":01}', '{"a":-}', '{"a":1.}', '[1,]', '"\\ud800"', '"\u0001"', '{"a" 1}', '[' .repeat(200) + ']'.repeat(200)]) {
      expect(parseJson(bad).ok).toBe(false);
    }
  });
});
