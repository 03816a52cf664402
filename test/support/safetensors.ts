/** Helpers for the safetensors and checkpoint tests: temporary directories, fixtures, arbitraries, and a
 *  raw file builder that writes headers by hand (independent of the writer under test). */
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { fc } from '@fast-check/vitest';
import { byteSize, type Dtype, dtypes } from '../../src/safetensors/dtypes.js';
import type { TensorToWrite } from '../../src/safetensors/writer.js';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const fixturesDir = resolve(repoRoot, '..', 'shared', 'fixtures');

export const temporaryDirectory = (): { path: string } & Disposable => {
  const path = mkdtempSync(join(tmpdir(), 'trt-refit-st-'));
  return { path, [Symbol.dispose]: () => rmSync(path, { recursive: true, force: true }) };
};

/** Every .safetensors file under the fixtures folder. */
export const fixtureFiles = (): string[] => {
  const out: string[] = [];
  const walk = (directory: string): void => {
    for (const name of readdirSync(directory).sort()) {
      const path = join(directory, name);
      if (statSync(path).isDirectory()) walk(path);
      else if (name.endsWith('.safetensors')) out.push(path);
    }
  };
  walk(fixturesDir);
  return out;
};

/** A file assembled from header text (padded with spaces to a multiple of 8 unless `pad` is false) and data. */
export const assemble = (headerText: string | Uint8Array, data: Uint8Array, pad = true): Uint8Array => {
  let json = typeof headerText === 'string' ? new TextEncoder().encode(headerText) : headerText;
  if (pad && json.length % 8 !== 0) {
    const padded = new Uint8Array(Math.ceil(json.length / 8) * 8).fill(0x20);
    padded.set(json);
    json = padded;
  }
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
};

export interface RawTensor {
  name: string;
  dtype: string;
  shape: (number | string)[];
  offsets: [number, number];
  extra?: string;
}

/** Header JSON for raw entries in the given order (numbers written verbatim, so bad values can be given as strings). */
export const headerJson = (tensors: readonly RawTensor[], metadata?: string): string => {
  const parts = tensors.map(
    (t) =>
      `${JSON.stringify(t.name)}:{"dtype":${JSON.stringify(t.dtype)},"shape":[${t.shape.join(',')}],"data_offsets":[${t.offsets[0]},${t.offsets[1]}]${t.extra ?? ''}}`,
  );
  if (metadata !== undefined) parts.unshift(`"__metadata__":${metadata}`);
  return `{${parts.join(',')}}`;
};

const wholeBytes = (dtype: Dtype, shape: number[]): boolean => typeof byteSize(dtype, shape) === 'bigint';

export const dtypeArb = fc.constantFrom(...dtypes);
/** Shapes of rank 0 to 4 (dimensions 0 to 5) whose element count fills whole bytes for the dtype. */
export const tensorSpecArb = (nameArb: fc.Arbitrary<string>) =>
  fc
    .record({ name: nameArb, dtype: dtypeArb, shape: fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 }) })
    .filter((t) => wholeBytes(t.dtype, t.shape));

export const tensorNameArb = fc.oneof(
  fc.string({ unit: 'grapheme', maxLength: 12 }),
  fc.stringMatching(/^[a-z][a-z0-9_.]{0,15}$/),
).filter((n) => n !== '__metadata__');

/** Tensors with unique names and random bytes of the right length. */
export const tensorsArb = fc
  .uniqueArray(tensorSpecArb(tensorNameArb), { selector: (t) => t.name, maxLength: 8 })
  .chain((specs) =>
    fc.tuple(
      ...specs.map((s) => fc.uint8Array({ minLength: Number(byteSize(s.dtype, s.shape)), maxLength: Number(byteSize(s.dtype, s.shape)) })),
    ).map((datas): TensorToWrite[] => specs.map((s, i) => ({ ...s, data: datas[i] as Uint8Array }))),
  );

export const metadataArb = fc.option(fc.dictionary(fc.string({ unit: 'grapheme', maxLength: 8 }), fc.string({ unit: 'grapheme', maxLength: 12 }), { maxKeys: 4 }), {
  nil: undefined,
});
