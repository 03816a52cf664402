/**
 * safetensors-read: header parse time for 10,000 tensors, and read throughput of a 2 GiB file through the
 * mapped views against a plain sequential read (fs.readSync in 64 MiB chunks) of the same file, in the
 * same run. Both reads sum every 32-bit word, so both touch every byte. The file is written just before,
 * so it is warm in the page cache (dropping the cache needs root); the figures say so.
 * SAFETENSORS_BENCH_BYTES overrides the file size.
 */
import { closeSync, openSync, readSync, rmSync } from 'node:fs';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
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
      },
      { mapped_vs_sequential: sequentialSeconds / mappedSeconds },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
};
