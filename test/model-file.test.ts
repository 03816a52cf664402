import { beforeAll, afterAll, describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { readFileSync, writeFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { compile } from '../src/compile/index.js';
import { decodePreamble, ModelFileError, ModelHeaderCodec, PREAMBLE_BYTES, readModelFile, readModelHeader, writeModelFile, type ModelHeader } from '../src/model/index.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixture, outputBytes, temporaryDirectory } from './e2e-support.js';

let dir: { path: string } & Disposable;
let file: string;
let bytes: Uint8Array;
let expected: Buffer;
let compiledSegments: string[];
const inputs = readSafetensors(fixture('gpt2_tiny', 'inputs.safetensors'));

beforeAll(async () => {
  dir = temporaryDirectory();
  file = join(dir.path, 'gpt2.trtr');
  using model = await compile(fixture('gpt2_tiny', 'model_dynamo.onnx'), fixture('gpt2_tiny', 'weights_v1.safetensors'));
  expected = outputBytes(await model.run(inputs));
  compiledSegments = model.stages.map((s) => `${s.kind}${s.record.index}`);
  const summary = await writeModelFile(model, file);
  bytes = new Uint8Array(readFileSync(file));
  expect(summary.bytes).toBe(bytes.byteLength);
});
afterAll(() => dir[Symbol.dispose]());

const rejection = (p: Promise<unknown>) => p.then(() => undefined, (e: unknown) => e);

describe('the compiled-model file (.trtr)', () => {
  it('reads back: same outputs bit for bit, same map and digests, and no temporary files are left', async () => {
    using model = await readModelFile(file);
    expect(outputBytes(await model.run(inputs))).toEqual(expected);
    const header = await readModelHeader(file);
    expect(E.isRight(ModelHeaderCodec.decode(JSON.parse(JSON.stringify(header))))).toBe(true);
    expect(header.weightMap).toEqual(model.weightMap);
    expect(header.current).toEqual(model.current);
    expect(header.segments.map((s) => `${s.kind}${s.index}`)).toEqual(compiledSegments);
    expect(header.segments.filter((s) => s.kind === 'engine').length).toBe(3);
    expect(header.inputs.map((i) => i.name)).toEqual(['input_ids']);
    expect(header.outputs).toEqual(['output']);
    expect(readdirSync(dir.path).filter((n) => n.includes('.tmp-'))).toEqual([]);
    // Writing what was read gives the same bytes (deterministic).
    const again = join(dir.path, 'again.trtr');
    await writeModelFile(model, again);
    expect(Buffer.from(readFileSync(again)).equals(Buffer.from(bytes))).toBe(true);
  });

  it('refuses a missing file, another format, a truncated file and a bad header with ModelFileError', async () => {
    const cases: [string, Uint8Array | undefined, string][] = [
      ['missing.trtr', undefined, 'ModelFileUnreadable'],
      ['empty.trtr', new Uint8Array(0), 'ModelFileInvalid'],
      ['onnx.trtr', new Uint8Array(readFileSync(fixture('mlp', 'model_dynamo.onnx'))), 'ModelFileInvalid'],
      ['truncated.trtr', bytes.subarray(0, bytes.byteLength - 10), 'ModelFileInvalid'],
    ];
    for (const [name, content, tag] of cases) {
      const path = join(dir.path, name);
      if (content) writeFileSync(path, content);
      const e = await rejection(readModelFile(path));
      expect(e).toBeInstanceOf(ModelFileError);
      expect((e as ModelFileError)._tag).toBe(tag);
      expect((e as Error).message).toContain(path);
    }
    // A header that decodes as JSON but not as a model's is named as such.
    const preamble = decodePreamble(bytes.subarray(0, PREAMBLE_BYTES), bytes.byteLength);
    expect(E.isRight(preamble)).toBe(true);
    if (E.isRight(preamble)) {
      const header = JSON.parse(new TextDecoder().decode(bytes.subarray(preamble.right.headerOffset))) as ModelHeader;
      expect(E.isLeft(ModelHeaderCodec.decode({ ...header, version: 2 }))).toBe(true);
    }
  });

  test.prop([fc.nat(), fc.integer({ min: 1, max: 255 })], { numRuns: 40 })('a flipped byte anywhere is refused or changes nothing (never a silently different model)', async (position, mask) => {
    const damaged = Uint8Array.from(bytes);
    damaged[position % damaged.byteLength] ^= mask;
    const path = join(dir.path, `damaged-${position}-${mask}.trtr`);
    writeFileSync(path, damaged);
    const result = await readModelFile(path).then((m) => m, (e: unknown) => e);
    if (result instanceof ModelFileError) {
      expect(result._tag).toBe('ModelFileInvalid');
      expect(result.message.split('\n').length).toBe(1);
    } else {
      using model = result as Awaited<ReturnType<typeof readModelFile>>;
      expect(outputBytes(await model.run(inputs))).toEqual(expected);
    }
  });
});
