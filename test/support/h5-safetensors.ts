/** A tiny test-only safetensors reader (8-byte little-endian header length, JSON header, data). */
import { readFileSync } from 'node:fs';
import type { Tensor } from '../../src/trace/ir.js';
import { fromBytes } from '../../src/trace/ir.js';

const dtypes: Record<string, Tensor['dtype']> = { F32: 'float32', I64: 'int64', I32: 'int32', F64: 'float64', BOOL: 'bool', U8: 'uint8' };

export const readSafetensors = (path: string): Record<string, Tensor> => {
  const bytes = new Uint8Array(readFileSync(path));
  const headerLength = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength))) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const base = 8 + headerLength;
  const out: Record<string, Tensor> = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const dtype = dtypes[info.dtype];
    if (dtype === undefined) throw new Error(`test reader: dtype ${info.dtype} of '${name}'`);
    out[name] = { dtype, shape: info.shape, data: fromBytes(dtype, bytes.subarray(base + info.data_offsets[0], base + info.data_offsets[1])) };
  }
  return out;
};
