/** Every real-exporter fixture (../shared/fixtures, discovered: each folder with a meta.json; dynamo and
 *  legacy graphs where present), end to end on native engines: compile with weights_v1, refit to
 *  weights_v2, LoRA where the fixture has an adapter, back to v1, and the same weights again move nothing;
 *  every output against PyTorch's within 1e-4 relative + 1e-5 absolute.
 *
 *  A fixture whose graph uses an operator the engine cannot handle yet is reported as such: its compile
 *  must fail naming that operator, and it must be on the reviewed list below. Any other failure (wrong
 *  outputs, unmapped weights, an unsupported operator nobody listed) fails its test. */
import { describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { compile, CompileError } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import { readModelFile, writeModelFile } from '../src/model/index.js';
import { coverage } from '../src/weightmap/map.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { encodeSegmentModel } from '../src/fallback/model.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixtureFolders, fixtureModels, fixturesDir, type FixtureModel } from './support/weightmap.js';
import { outputBytes, temporaryDirectory } from './e2e-support.js';

/** Reviewed: fixtures whose graphs hold an operator the engine cannot handle yet, with that operator.
 *  Keys are `model/file`. An entry whose fixture now compiles fails its test (remove the entry); an
 *  unsupported operator in a fixture not listed here fails its test (support it, or review and list it). */
const expectedUnsupported: Readonly<Record<string, string>> = {
};

const fixtures = fixtureModels();
const keyOf = (f: FixtureModel): string => `${f.model}/${f.file}`;

/** The operator a compile error says is unsupported, if that is what it says. */
const unsupportedOperator = (error: unknown): string | undefined =>
  error instanceof CompileError ? /unsupported operator ([A-Za-z0-9_.]+)/.exec(error.message)?.[1] : undefined;

interface Meta {
  readonly exports: Readonly<Record<'dynamo' | 'legacy', { readonly error?: string } | undefined>>;
  readonly lora?: unknown;
}
const meta = (model: string): Meta => JSON.parse(readFileSync(join(fixturesDir, model, 'meta.json'), 'utf8')) as Meta;

describe('every fixture folder is found', () => {
  it('each exporter that meta.json says worked has its graph discovered; adapters where meta.json has LoRA settings', () => {
    const folders = fixtureFolders();
    expect(folders.length).toBeGreaterThanOrEqual(12);
    for (const model of folders) {
      const m = meta(model);
      const found = fixtures.filter((f) => f.model === model);
      const exported = (['dynamo', 'legacy'] as const).filter((e) => m.exports[e] !== undefined && m.exports[e]!.error === undefined);
      expect(found.map((f) => f.exporter), model).toEqual(exported);
      for (const f of found) expect(f.lora !== undefined, `${model} lora`).toBe(m.lora !== undefined);
    }
    expect(fixtures.filter((f) => f.exporter === 'legacy').length).toBeGreaterThanOrEqual(2);
  });

  it('the list of expected-unsupported fixtures names only fixtures that exist', () => {
    for (const key of Object.keys(expectedUnsupported)) expect(fixtures.map(keyOf), key).toContain(key);
  });

  it('a compile that meets an operator the engine lacks says so, as this file recognises it', async () => {
    const b = new GraphBuilder('unsupported', 17);
    const x = b.input('x', 'float32', [2, 3]);
    const y = b.op('NoSuchOperator', [x]);
    b.output(y);
    const g = b.build();
    using files = temporaryDirectory();
    const onnx = join(files.path, 'unsupported.onnx');
    writeFileSync(onnx, encodeSegmentModel({ name: 'unsupported', opset: 17, nodes: g.nodes, inputs: [{ name: 'x', type: { dtype: 'float32', shape: [2, 3] } }], outputs: [{ name: y, type: { dtype: 'float32', shape: [2, 3] } }], initializers: new Map() }));
    const weights = join(files.path, 'weights.safetensors');
    await writeSafetensors(weights, []);
    const error = await compile(onnx, weights).then(() => undefined, (e: unknown) => e);
    expect(unsupportedOperator(error), String(error)).toBe('NoSuchOperator');
  });
});

describe('compile, refit and run every fixture on native engines', () => {
  const cases = fixtures.map((f) => [expectedUnsupported[keyOf(f)] === undefined ? keyOf(f) : `${keyOf(f)} (expected: unsupported operator ${expectedUnsupported[keyOf(f)]})`, f] as const);

  it.for(cases)('%s: v1 -> v2 -> (lora) -> v1 match PyTorch; the same weights again move 0 bytes', async ([, f], { annotate }) => {
    const { dir } = f;
    const listed = expectedUnsupported[keyOf(f)];
    const expected = (name: string) => readSafetensors(join(dir, `${name}.safetensors`)).output;
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));

    let compiledOrError: Awaited<ReturnType<typeof compile>> | { error: unknown };
    try {
      compiledOrError = await compile(f.path, join(dir, 'weights_v1.safetensors'));
    } catch (error) {
      compiledOrError = { error };
    }
    if ('error' in compiledOrError) {
      const { error } = compiledOrError;
      const operator = unsupportedOperator(error);
      if (operator === undefined) throw error; // not an operator the engine lacks: a failure
      // The engine cannot handle an operator of this graph: reported, and only accepted when reviewed.
      expect(operator, `${keyOf(f)}: compile says operator ${operator} is unsupported, and the fixture is not on the reviewed list (${(error as Error).message})`).toBe(listed);
      await annotate(`not run: unsupported operator ${operator} (${(error as Error).message})`, 'notice');
      return;
    }
    using compiled = compiledOrError;

    // Every refittable weight is mapped.
    expect(coverage(compiled.weightMap).unmapped).toEqual([]);
    const output = compiled.outputs[0];
    expectClose((await compiled.run(inputs))[output], expected('expected_v1'), 'compiled with weights_v1');

    const toV2 = await refitModel(compiled, { checkpoint: join(dir, 'weights_v2.safetensors') });
    expect(toV2.report.changed).toBe(toV2.plan.totals.targets);
    expectClose((await compiled.run(inputs))[output], expected('expected_v2'), 'refitted to weights_v2');

    if (f.lora !== undefined) {
      const lora = await refitModel(compiled, { checkpoint: join(dir, 'weights_v1.safetensors'), lora: [{ path: f.lora, weight: 1 }] });
      expect(lora.report.changed).toBeGreaterThan(0);
      expectClose((await compiled.run(inputs))[output], expected('expected_lora'), 'weights_v1 + LoRA');
    }

    // Through the file: what a refit put in is what a later reader gets, digests included.
    using files = temporaryDirectory();
    const file = join(files.path, 'model.trtr');
    await writeModelFile(compiled, file);
    using reread = await readModelFile(file);
    expect(outputBytes(await reread.run(inputs))).toEqual(outputBytes(await compiled.run(inputs)));
    expect(reread.current).toEqual(compiled.current);

    const back = await refitModel(reread, { checkpoint: join(dir, 'weights_v1.safetensors') });
    expect(back.report.changed).toBeGreaterThan(0);
    expectClose((await reread.run(inputs))[output], expected('expected_v1'), 'back to weights_v1 (model file re-read)');
    const again = await refitModel(reread, { checkpoint: join(dir, 'weights_v1.safetensors') });
    expect(again.plan.totals.bytesToMove).toBe(0);
    expect(again.report.bytesMoved).toBe(0);
    expect(again.report.engines).toEqual([]);

    // Listed as unsupported, yet it compiled and matched PyTorch throughout: the list is out of date.
    expect(listed, `${keyOf(f)} is listed as unsupported (${listed}) but compiles and matches PyTorch: remove it from expectedUnsupported`).toBeUndefined();
  });
});
