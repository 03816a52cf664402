/** Writer and reader together: round trips, byte-identical rewrites, atomic writes, zero-copy views,
 *  files over 4 GiB and headers of 10,000 tensors (sparse files: cheap on disk). */
import { closeSync, existsSync, ftruncateSync, openSync, readdirSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { openSafetensors } from '../src/safetensors/reader.js';
import { parseHeader } from '../src/safetensors/header.js';
import { planLayout, serializeHeader, writeSafetensors, writeSafetensorsTE } from '../src/safetensors/writer.js';
import { SafetensorsError } from '../src/safetensors/errors.js';
import { toFloat32 } from '../src/safetensors/convert.js';
import { assemble, headerJson, metadataArb, type RawTensor, temporaryDirectory, tensorsArb } from './support/safetensors.js';

describe('round trips', () => {
  test.prop([tensorsArb, metadataArb], { numRuns: 25 })(
    'write then read gives the same tensors and metadata; writing what was read gives the same bytes',
    async (tensors, metadata) => {
      using dir = temporaryDirectory();
      const first = join(dir.path, 'a.safetensors');
      const second = join(dir.path, 'b.safetensors');
      await writeSafetensors(first, tensors, metadata);
      {
        using file = await openSafetensors(first);
        expect(file.tensors.size).toBe(tensors.length);
        expect(file.metadata).toEqual(metadata === undefined ? undefined : { ...metadata });
        for (const t of tensors) {
          const info = file.info(t.name);
          expect(info.dtype).toBe(t.dtype);
          expect(info.shape).toEqual(t.shape);
          expect(Buffer.from(file.bytes(t.name)).equals(Buffer.from(t.data as Uint8Array))).toBe(true);
        }
        await writeSafetensors(
          second,
          file.names().map((name) => ({ ...file.info(name), data: file.bytes(name) })),
          file.metadata,
        );
      }
      expect(readFileSync(second).equals(readFileSync(first))).toBe(true);
      expect(readdirSync(dir.path).sort()).toEqual(['a.safetensors', 'b.safetensors']);
    },
  );

  test.prop([tensorsArb, metadataArb], { numRuns: 200 })('the serialized header parses back to the planned layout (pure)', (tensors, metadata) => {
    const layout = planLayout(tensors, 'x');
    expect(E.isRight(layout)).toBe(true);
    if (E.isLeft(layout)) return;
    const header = serializeHeader(layout.right, metadata);
    expect(header.length % 8).toBe(0);
    const dataLength = layout.right.reduce((n, t) => n + t.dataOffsets[1] - t.dataOffsets[0], 0);
    const file = new Uint8Array(header.length + dataLength);
    file.set(header);
    const parsed = parseHeader(file, file.length, 'x');
    expect(E.isRight(parsed)).toBe(true);
    if (E.isRight(parsed)) {
      expect(parsed.right.tensors.map((t) => [t.name, t.dtype, t.shape, t.dataOffsets])).toEqual(
        layout.right.filter((t) => t).map((t) => [t.name, t.dtype, t.shape, t.dataOffsets]).sort((a, b) => (a[3] as number[])[0]! - (b[3] as number[])[0]! || (a[3] as number[])[1]! - (b[3] as number[])[1]!),
      );
      expect(parsed.right.metadata).toEqual(metadata === undefined ? undefined : { ...metadata });
    }
  });

  it('lays tensors out as the reference writer does: dtype (descending), then name by UTF-8 bytes', () => {
    const layout = planLayout(
      [
        { name: 'b', dtype: 'U8', shape: [1] },
        { name: 'a', dtype: 'F32', shape: [1] },
        { name: '\u{1F600}', dtype: 'F32', shape: [1] }, // UTF-16 would put this before U+FF5E, UTF-8 after
        { name: '\uFF5E', dtype: 'F32', shape: [1] },
        { name: 'c', dtype: 'I64', shape: [] },
      ],
      'x',
    );
    expect(E.isRight(layout) && layout.right.map((t) => t.name)).toEqual(['c', 'a', '\uFF5E', '\u{1F600}', 'b']);
  });
});

describe('the writer', () => {
  it('produces each lazy tensor only when it writes it, in layout order', async () => {
    using dir = temporaryDirectory();
    const produced: string[] = [];
    const lazy = (name: string, bytes: number) => ({
      name,
      dtype: 'U8' as const,
      shape: [bytes],
      data: async () => {
        produced.push(name);
        return new Uint8Array(bytes).fill(name.charCodeAt(0));
      },
    });
    async function* tensors() {
      yield lazy('z', 3);
      yield lazy('a', 5);
    }
    const summary = await writeSafetensors(join(dir.path, 'lazy.safetensors'), tensors());
    expect(produced).toEqual(['a', 'z']);
    using file = await openSafetensors(join(dir.path, 'lazy.safetensors'));
    expect([...file.bytes('z')]).toEqual([122, 122, 122]);
    expect(summary.bytes).toBe(file.size);
  });

  it('refuses bad tensors before touching the target, and leaves no temporary file', async () => {
    using dir = temporaryDirectory();
    const target = join(dir.path, 'model.safetensors');
    writeFileSync(target, 'previous');
    const cases = [
      { name: 'w', dtype: 'F32' as const, shape: [2], data: new Uint8Array(7) },
      { name: '__metadata__', dtype: 'F32' as const, shape: [], data: new Uint8Array(4) },
      { name: 'w', dtype: 'F4' as const, shape: [3], data: new Uint8Array(2) },
      { name: 'w', dtype: 'F32' as const, shape: [-1], data: new Uint8Array(0) },
    ];
    for (const bad of cases) {
      const result = await writeSafetensorsTE(target, [bad])();
      expect(E.isLeft(result) && result.left).toMatchObject({ _tag: 'InvalidTensor', tensor: bad.name });
    }
    const duplicate = await writeSafetensorsTE(target, [cases[1]!, { ...cases[0]!, shape: [] }, { ...cases[0]!, shape: [] }].slice(1))();
    expect(E.isLeft(duplicate) && duplicate.left._tag).toBe('InvalidTensor');
    expect(readFileSync(target, 'utf8')).toBe('previous');
    expect(readdirSync(dir.path)).toEqual(['model.safetensors']);
  });

  it('rejects with WriteFailed when the directory does not exist', async () => {
    await expect(writeSafetensors('/nonexistent-dir-h3/x.safetensors', [])).rejects.toMatchObject({ _tag: 'WriteFailed' });
  });
});

/** A sparse file: hand-written header, size set by ftruncate, a few bytes written where asked. */
const sparseFile = (path: string, tensors: RawTensor[], writes: { at: number; bytes: Uint8Array }[]): number => {
  const header = assemble(headerJson(tensors), new Uint8Array(0));
  const dataEnd = tensors.reduce((n, t) => Math.max(n, t.offsets[1]), 0);
  const fd = openSync(path, 'w');
  try {
    writeSync(fd, header);
    ftruncateSync(fd, header.length + dataEnd);
    for (const w of writes) writeSync(fd, w.bytes, 0, w.bytes.length, header.length + w.at);
  } finally {
    closeSync(fd);
  }
  return header.length;
};

describe('mapped views', () => {
  it('reads a tensor past 4 GiB in a sparse file, and refuses a view too large for one typed array', async () => {
    using dir = temporaryDirectory();
    const path = join(dir.path, 'big.safetensors');
    const filler = 4.5 * 2 ** 30;
    const values = new Float32Array([1.5, -2, 3.25, 1e-3]);
    sparseFile(
      path,
      [
        { name: 'filler', dtype: 'U8', shape: [filler], offsets: [0, filler] },
        { name: 'tail', dtype: 'F32', shape: [4], offsets: [filler, filler + 16] },
      ],
      [{ at: filler, bytes: new Uint8Array(values.buffer) }],
    );
    using file = await openSafetensors(path);
    expect(file.size).toBeGreaterThan(2 ** 32);
    expect(file.info('tail').byteOffset).toBeGreaterThan(2 ** 32);
    expect(new Float32Array(file.bytes('tail').slice().buffer)).toEqual(values);
    expect(file.toFloat32('tail')).toEqual(values);
    expect(() => file.bytes('filler')).toThrow(expect.objectContaining({ _tag: 'TensorTooLarge', tensor: 'filler' }));
  });

  it('opens 10,000 tensors (10 GiB, sparse) reading only the header', async () => {
    using dir = temporaryDirectory();
    const path = join(dir.path, 'many.safetensors');
    const size = 2 ** 20;
    const tensors = Array.from({ length: 10_000 }, (_, i): RawTensor => ({
      name: `layers.${i}.weight`,
      dtype: 'F16',
      shape: [512, 1024],
      offsets: [i * size, (i + 1) * size],
    }));
    const headerLength = sparseFile(path, tensors, [{ at: 9_999 * size, bytes: new Uint8Array([0x00, 0x3c]) }]);
    // Bytes this process read through system calls (Linux: /proc/self/io), a count instead of a time.
    const bytesRead = (): number | undefined => (existsSync('/proc/self/io') ? Number(/rchar:\s*(\d+)/.exec(readFileSync('/proc/self/io', 'utf8'))![1]) : undefined);
    const rssBefore = process.memoryUsage().rss;
    const readBefore = bytesRead();
    const started = performance.now();
    using file = await openSafetensors(path);
    const seconds = (performance.now() - started) / 1000;
    const readAfter = bytesRead();
    const rssGrowth = process.memoryUsage().rss - rssBefore;
    expect(file.tensors.size).toBe(10_000);
    expect(headerLength).toBeGreaterThan(700_000);
    // Opening read the header, not 10 GiB: counted where the system counts it, else bounded in time.
    if (readBefore !== undefined && readAfter !== undefined) expect(readAfter - readBefore).toBeLessThan(64 * 2 ** 20);
    else expect(seconds).toBeLessThan(2);
    expect(rssGrowth).toBeLessThan(256 * 2 ** 20);
    expect(file.toFloat32('layers.9999.weight')[0]).toBe(1);
  });

  it('views are zero-copy, and after close read zeros instead of crashing', async () => {
    using dir = temporaryDirectory();
    const path = join(dir.path, 'v.safetensors');
    await writeSafetensors(path, [{ name: 'w', dtype: 'U8', shape: [4], data: new Uint8Array([1, 2, 3, 4]) }]);
    const file = await openSafetensors(path);
    const a = file.bytes('w');
    const b = file.bytes('w');
    expect(a.buffer.byteLength).toBe(4); // a view of the tensor, not a copy of the file
    expect([...a]).toEqual([1, 2, 3, 4]);
    expect([...b]).toEqual([1, 2, 3, 4]);
    file.close();
    expect([...a]).toEqual([0, 0, 0, 0]);
    expect(() => file.bytes('w')).toThrow(expect.objectContaining({ _tag: 'Closed' }));
    file.close(); // twice is harmless
  });

  it('converts unaligned tensors the same natively and in TypeScript', async () => {
    using dir = temporaryDirectory();
    const path = join(dir.path, 'u.safetensors');
    const data = Uint8Array.from({ length: 1 + 8 + 4 }, (_, i) => (i * 37 + 11) & 0xff);
    writeFileSync(
      path,
      assemble(
        headerJson([
          { name: 'pad', dtype: 'U8', shape: [1], offsets: [0, 1] },
          { name: 'f32', dtype: 'F32', shape: [2], offsets: [1, 9] },
          { name: 'f16', dtype: 'F16', shape: [2], offsets: [9, 13] },
        ]),
        data,
      ),
    );
    using file = await openSafetensors(path);
    expect(file.toFloat32('f32')).toEqual(toFloat32('F32', data.subarray(1, 9)));
    expect(file.toFloat32('f16')).toEqual(toFloat32('F16', data.subarray(9, 13)));
    expect(() => file.toFloat32('nope')).toThrow(SafetensorsError);
  });

  it('refuses a missing file and a directory with FileError', async () => {
    await expect(openSafetensors('/nonexistent-h3.safetensors')).rejects.toMatchObject({ _tag: 'FileError' });
    await expect(openSafetensors('/tmp')).rejects.toMatchObject({ _tag: 'FileError' });
    expect(existsSync('/nonexistent-h3.safetensors')).toBe(false);
  });
});
