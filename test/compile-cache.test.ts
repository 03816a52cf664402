/**
 * The engine cache through the real compile step (ONNX file + checkpoint -> RefitModel):
 * - every fixture: a second compile of the same architecture with other weights is a hit whose outputs
 *   equal, byte for byte, a fresh build with those weights (and differ from the first weights' outputs);
 * - a hit model refits like a built one (same plan, same outputs after a refit to weights_v2);
 * - the build options are part of the key (weight streaming), and the .trtr records streaming;
 * - a damaged entry, or one built from a model named differently, is rebuilt, never served.
 */
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import { compileWithReport, type CompileOptions } from '../src/compile/index.js';
import { CacheStore } from '../src/cache/store.js';
import { readModelFile, readModelHeader, replaceInitializers, writeModelFile, type RefitModel } from '../src/model/index.js';
import { refitModel } from '../src/effect/files.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { directoryResolver } from '../src/trace/load.js';
import { toBytes, type Tensor } from '../src/trace/ir.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { fixtureInputs } from './support/cache-fixtures.js';
import { fixtureModels, originalFixtures } from './support/weightmap.js';
import { fixture, outputBytes, random, temporaryDirectory } from './e2e-support.js';

/**
 * A fixture's ONNX file with its float32 weight initializers (more than one element) scaled per element by
 * a seeded factor in [0.9, 1.1], written beside a checkpoint holding every float32 initializer under its
 * ONNX name: a consistent ONNX + checkpoint pair of the same architecture with other weights. Scalars are
 * kept, so nothing folded into a layer attribute changes.
 */
const writePair = async (onnxPath: string, dir: string, name: string, seed: number | undefined): Promise<{ onnx: string; weights: string }> => {
  const bytes = new Uint8Array(readFileSync(onnxPath));
  const decoded = decodeOnnx(bytes, directoryResolver(dirname(onnxPath)));
  if (E.isLeft(decoded)) throw new Error(`decode ${onnxPath}`);
  const rand = random(seed ?? 1);
  const floats = decoded.right.initializers.filter((i) => i.tensor.dtype === 'float32');
  const values = new Map<string, Float32Array>();
  for (const init of floats) {
    const data = init.tensor.data as Float32Array;
    values.set(init.name, seed === undefined || data.length < 2 ? Float32Array.from(data) : Float32Array.from(data, (v) => Math.fround(v * (0.9 + 0.2 * rand()))));
  }
  const replaced = replaceInitializers(0, bytes, seed === undefined ? new Map() : new Map([...values].filter(([, v]) => v.length >= 2)));
  if ('error' in replaced) throw new Error(JSON.stringify(replaced.error));
  const onnx = join(dir, `${name}.onnx`);
  const weights = join(dir, `${name}.safetensors`);
  writeFileSync(onnx, replaced.bytes);
  await writeSafetensors(weights, floats.map((i) => ({ name: i.name, dtype: 'F32' as const, shape: i.tensor.shape, data: toBytes(values.get(i.name)!) })));
  return { onnx, weights };
};

const run = async (model: RefitModel, inputs: Record<string, Float32Array | BigInt64Array | Int32Array>): Promise<Buffer> => outputBytes(await model.run(inputs) as Record<string, Tensor>);

describe('every fixture: a second compile with other weights is a hit equal to a fresh build', () => {
  it.each(fixtureModels(originalFixtures).map((f) => [`${f.model}/${f.file}`, f] as const))('%s', async (_, f) => {
    using dir = temporaryDirectory();
    const cache = { dir: join(dir.path, 'cache') };
    const inputs = await fixtureInputs(f.model);
    const first = await writePair(f.path, dir.path, 'first', undefined);
    const other = await writePair(f.path, dir.path, 'other', 7);

    const a = await compileWithReport(first.onnx, first.weights, { cache });
    expect(a.cache).toBe('miss');
    expect(a.missReason).toBe('absent');
    const firstOutputs = await run(a.model, inputs);
    a.model[Symbol.dispose]();

    const b = await compileWithReport(other.onnx, other.weights, { cache });
    using hit = b.model;
    expect(b.cache).toBe('hit');
    expect(b.key).toBe(a.key);
    expect(b.timings.loadMs).toBeGreaterThanOrEqual(0);
    expect(b.timings.buildMs).toBeUndefined();

    const c = await compileWithReport(other.onnx, other.weights, { cache: false });
    using fresh = c.model;
    expect(c.cache).toBe('off');
    const want = await run(fresh, inputs);
    expect((await run(hit, inputs)).equals(want)).toBe(true);
    expect(want.equals(firstOutputs)).toBe(false); // the weights really changed
    // The hit model carries the current weights' map and digests, as a built one does.
    expect(hit.current).toEqual(fresh.current);
    expect(hit.weightMap).toEqual(fresh.weightMap);
  }, 60_000);
});

describe('a hit model behaves like a built one', () => {
  it('bert_tiny: compile from the cache, refit to weights_v2, save and read back', async () => {
    using dir = temporaryDirectory();
    const cache = { dir: join(dir.path, 'cache') };
    const onnx = fixture('bert_tiny', 'model_dynamo.onnx');
    const v1 = fixture('bert_tiny', 'weights_v1.safetensors');
    const v2 = { checkpoint: fixture('bert_tiny', 'weights_v2.safetensors') };
    const inputs = await fixtureInputs('bert_tiny');
    const built = await compileWithReport(onnx, v1, { cache, tacticSearch: true });
    using builtModel = built.model;
    const hit = await compileWithReport(onnx, v1, { cache, tacticSearch: true });
    using hitModel = hit.model;
    expect([built.cache, hit.cache]).toEqual(['miss', 'hit']);
    expect((await run(hitModel, inputs)).equals(await run(builtModel, inputs))).toBe(true);

    const r1 = await refitModel(builtModel, v2);
    const r2 = await refitModel(hitModel, v2);
    expect(r2.plan.totals).toEqual(r1.plan.totals);
    expect(r2.plan.totals.changed).toBeGreaterThan(0);
    const want = await run(builtModel, inputs);
    expect((await run(hitModel, inputs)).equals(want)).toBe(true);

    const path = join(dir.path, 'hit.trtr');
    await writeModelFile(hitModel, path);
    using read = await readModelFile(path);
    expect((await run(read, inputs)).equals(want)).toBe(true);
  }, 60_000);
});

describe('what a hit needs', () => {
  const mlp = { onnx: fixture('mlp', 'model_dynamo.onnx'), weights: fixture('mlp', 'weights_v1.safetensors') };
  const compileMlp = (options: CompileOptions) => compileWithReport(mlp.onnx, mlp.weights, options);

  it('weight streaming is part of the key, and the .trtr says its engines stream', async () => {
    using dir = temporaryDirectory();
    const cache = { dir: join(dir.path, 'cache') };
    const plain = await compileMlp({ cache });
    plain.model[Symbol.dispose]();
    const streaming = await compileMlp({ cache, weightStreaming: true });
    expect(streaming.cache).toBe('miss');
    expect(streaming.key).not.toBe(plain.key);
    expect(streaming.model.engineStages().every((s) => s.engine.streamableWeightBytes() > 0)).toBe(true);
    await writeModelFile(streaming.model, join(dir.path, 'm.trtr'));
    streaming.model[Symbol.dispose]();
    expect((await readModelHeader(join(dir.path, 'm.trtr'))).build.weightStreaming).toBe(true);
    const again = await compileMlp({ cache, weightStreaming: true });
    using model = again.model;
    expect(again.cache).toBe('hit');
    expect(model.engineStages().every((s) => s.engine.streamableWeightBytes() > 0)).toBe(true);
    expect(await new CacheStore({ root: cache.dir }).ls()).toHaveLength(2);
  });

  it('a damaged engine blob is a miss: removed, rebuilt and stored again', async () => {
    using dir = temporaryDirectory();
    const cache = { dir: join(dir.path, 'cache') };
    const inputs = await fixtureInputs('mlp');
    const first = await compileMlp({ cache });
    const want = await run(first.model, inputs);
    first.model[Symbol.dispose]();
    const store = new CacheStore({ root: cache.dir });
    const blobs = join(store.entryDir(first.key!), 'blobs');
    const engineBlob = readdirSync(blobs).find((n) => n.startsWith('engine-'))!;
    const bytes = readFileSync(join(blobs, engineBlob));
    bytes[bytes.length >> 1] ^= 0xff;
    writeFileSync(join(blobs, engineBlob), bytes);
    const second = await compileMlp({ cache });
    using model = second.model;
    expect(second.cache).toBe('miss');
    expect(second.missReason).toBe('damaged');
    expect((await run(model, inputs)).equals(want)).toBe(true);
    const third = await compileMlp({ cache });
    third.model[Symbol.dispose]();
    expect(third.cache).toBe('hit');
  });

  it('an entry whose engine was built from a model named differently is rebuilt, not served', async () => {
    using dir = temporaryDirectory();
    const cache = { dir: join(dir.path, 'cache') };
    const first = await compileMlp({ cache });
    first.model[Symbol.dispose]();
    // Rewrite the entry's recorded layer names, as if another model of the same structure had built it.
    const store = new CacheStore({ root: cache.dir });
    const hit = await store.get(first.key!);
    if (hit._tag !== 'hit') throw new Error('expected the entry');
    const bindings = JSON.parse(new TextDecoder().decode(hit.entry.blobs.get('bindings.json')!)) as { segments: { layers: string[] }[] };
    bindings.segments[0].layers = bindings.segments[0].layers.map((n) => `other_${n}`);
    await store.remove(first.key!);
    await store.put({ digest: first.key!, parts: hit.entry.manifest.parts, names: [] }, [...hit.entry.blobs].map(([name, data]) => ({ name, data: name === 'bindings.json' ? new TextEncoder().encode(JSON.stringify(bindings)) : data })));
    const second = await compileMlp({ cache });
    second.model[Symbol.dispose]();
    expect(second.cache).toBe('miss');
    expect(second.missReason).toBe('unloadable');
    expect(second.detail).toMatch(/named differently/);
    const third = await compileMlp({ cache });
    third.model[Symbol.dispose]();
    expect(third.cache).toBe('hit');
  });
});
