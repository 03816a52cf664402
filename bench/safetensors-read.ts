/**
 * safetensors-read: header parse time for 10,000 tensors, and read throughput of a 2 GiB file through the
 * mapped views against a plain sequential read (fs.readSync in 64 MiB chunks) of the same file, in the
 * same run. Both reads sum every 32-bit word, so both touch every byte. The file is written just before,
 * so it is warm in the page cache (dropping the cache needs root); the figures say so.
 *
 * Then the ways a refit plan can read a fresh mapping at native speed (trtshim_digest's non-finite count,
 * every core), each on a newly opened mapping so its pages are not mapped yet: no advice, WILLNEED,
 * SEQUENTIAL, POPULATE (one madvise maps the range) per tensor, against pread into one reused 64 MiB
 * buffer and the same count; and the first JavaScript pass over a fresh mapping (new views, page faults)
 * against the steady state.
 * SAFETENSORS_BENCH_BYTES overrides the file size.
 */
import { closeSync, openSync, readSync, rmSync } from 'node:fs';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { nativeDigest, type Advice } from '../ffi/mapping.js';
import { parseHeader } from '../src/safetensors/header.js';
import { openSafetensors } from '../src/safetensors/reader.js';
import { planLayout, serializeHeader, writeSafetensors } from '../src/safetensors/writer.js';
import { bestOf, writeResult } from './lib.js';

const sumWords = (bytes: Uint8Array): number => {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 2);
  let sum = 0;
  for (let i = 0; i < words.length; i++) sum = (sum + (words[i] as number)) | 0;
  return sum;
};

export const run = async (): Promise<void> => {
  // Header parse, 10,000 tensors.
  const layout = planLayout(
    Array.from({ length: 10_000 }, (_, i) => ({ name: `model.layers.${i}.mlp.weight`, dtype: 'BF16' as const, shape: [1024, 256] })),
    'bench',
  );
  if (E.isLeft(layout)) throw new Error(layout.left.detail);
  const header = serializeHeader(layout.right);
  const fileSize = header.length + (layout.right.at(-1)?.dataOffsets[1] ?? 0);
  const parseSeconds = await bestOf(5, () => {
    const parsed = parseHeader(header, fileSize, 'bench');
    if (E.isLeft(parsed)) throw new Error(parsed.left.detail);
  });

  // 2 GiB file.
  const total = Number(process.env.SAFETENSORS_BENCH_BYTES ?? 2 ** 31);
  const tensorBytes = 64 * 2 ** 20;
  const count = Math.max(1, Math.round(total / tensorBytes));
  const dir = mkdtempSync(join(tmpdir(), 'trt-refit-bench-'));
  const path = join(dir, 'bench.safetensors');
  try {
    await writeSafetensors(
      path,
      Array.from({ length: count }, (_, i) => ({
        name: `t${i}`,
        dtype: 'F32' as const,
        shape: [tensorBytes / 4],
        data: () => new Uint8Array(tensorBytes).fill(i + 1),
      })),
    );
    // First pass over a fresh mapping, in JavaScript: new views and page faults included.
    let firstPassSeconds: number;
    {
      using fresh = await openSafetensors(path);
      const start = process.hrtime.bigint();
      let sum = 0;
      for (const name of fresh.names()) sum = (sum + sumWords(fresh.bytes(name))) | 0;
      firstPassSeconds = Number(process.hrtime.bigint() - start) / 1e9;
      if (sum === 0x7fffffff) console.log(sum); // keep the loop
    }
    // Native reads of a fresh mapping, per advice; best of 3 fresh mappings each.
    const nativeFresh = async (advice: Advice | undefined): Promise<number> => {
      let best = Infinity;
      for (let rep = 0; rep < 3; rep++) {
        using fresh = await openSafetensors(path);
        const start = process.hrtime.bigint();
        for (const name of fresh.names()) {
          const info = fresh.info(name);
          if (advice !== undefined) (fresh as unknown as { mapping: { advise(o: number, l: number, a: Advice): void } }).mapping.advise(info.byteOffset, info.byteLength, advice);
          nativeDigest(fresh.bytes(name), 0, { digest: false });
        }
        best = Math.min(best, Number(process.hrtime.bigint() - start) / 1e9);
      }
      return best;
    };
    const nativeNone = await nativeFresh(undefined);
    const nativeWillneed = await nativeFresh('willneed');
    const nativeSequential = await nativeFresh('sequential');
    const nativePopulate = await nativeFresh('populate');
    const preadChunk = new Uint8Array(tensorBytes);
    const preadSeconds = await bestOf(3, () => {
      const fd = openSync(path, 'r');
      try {
        const headerBytes = new Uint8Array(8);
        readSync(fd, headerBytes, 0, 8, 0);
        let position = 8 + Number(new DataView(headerBytes.buffer).getBigUint64(0, true));
        for (;;) {
          const n = readSync(fd, preadChunk, 0, preadChunk.length, position);
          if (n === 0) break;
          nativeDigest(preadChunk.subarray(0, n - (n % 4)), 0, { digest: false });
          position += n;
        }
      } finally {
        closeSync(fd);
      }
    });

    const file = await openSafetensors(path);
    let mappedSum = 0;
    const mappedSeconds = await bestOf(3, () => {
      mappedSum = 0;
      for (const name of file.names()) mappedSum = (mappedSum + sumWords(file.bytes(name))) | 0;
    });
    const convertSeconds = await bestOf(3, () => {
      for (const name of file.names()) file.toFloat32(name);
    });
    const fileBytes = file.size;
    file.close();

    let sequentialSum = 0;
    const chunk = new Uint8Array(tensorBytes);
    const sequentialSeconds = await bestOf(3, () => {
      sequentialSum = 0;
      const fd = openSync(path, 'r');
      try {
        // The header first, then the data in chunks; only the data is summed, as above.
        const headerBytes = new Uint8Array(8);
        readSync(fd, headerBytes, 0, 8, 0);
        let position = 8 + Number(new DataView(headerBytes.buffer).getBigUint64(0, true));
        for (;;) {
          const n = readSync(fd, chunk, 0, chunk.length, position);
          if (n === 0) break;
          sequentialSum = (sequentialSum + sumWords(chunk.subarray(0, n - (n % 4)))) | 0;
          position += n;
        }
      } finally {
        closeSync(fd);
      }
    });
    if (mappedSum !== sequentialSum) throw new Error(`sums differ: mapped ${mappedSum}, sequential ${sequentialSum}`);

    writeResult(
      'safetensors-read',
      {
        header_parse_10k_tensors: { value: parseSeconds * 1000, unit: 'ms' },
        header_bytes_10k_tensors: { value: header.length, unit: 'bytes' },
        file_bytes: { value: fileBytes, unit: 'bytes' },
        page_cache_warm: { value: 1, unit: 'bool (file written just before reading)' },
        mapped_read_sum: { value: fileBytes / mappedSeconds / 1e9, unit: 'GB/s' },
        sequential_read_sum: { value: fileBytes / sequentialSeconds / 1e9, unit: 'GB/s' },
        mapped_to_float32_native: { value: fileBytes / convertSeconds / 1e9, unit: 'GB/s' },
        mapped_read_sum_first_pass: { value: fileBytes / firstPassSeconds / 1e9, unit: 'GB/s (fresh mapping)' },
        native_scan_fresh_mapping: { value: fileBytes / nativeNone / 1e9, unit: 'GB/s' },
        native_scan_fresh_mapping_willneed: { value: fileBytes / nativeWillneed / 1e9, unit: 'GB/s' },
        native_scan_fresh_mapping_sequential: { value: fileBytes / nativeSequential / 1e9, unit: 'GB/s' },
        native_scan_fresh_mapping_populate: { value: fileBytes / nativePopulate / 1e9, unit: 'GB/s' },
        native_scan_pread_reused_buffer: { value: fileBytes / preadSeconds / 1e9, unit: 'GB/s' },
      },
      {
        mapped_vs_sequential: sequentialSeconds / mappedSeconds,
        mapped_first_pass_vs_sequential: sequentialSeconds / firstPassSeconds,
        native_populate_vs_no_advice: nativeNone / nativePopulate,
        native_populate_vs_pread: preadSeconds / nativePopulate,
      },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
};
