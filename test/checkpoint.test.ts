/** Checkpoints: a sharded index opens as one set of tensors; PEFT adapters decode and pair up. */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint, openCheckpointTE, INDEX_FILE } from '../src/checkpoint/checkpoint.js';
import { decodeAdapterConfig, moduleScaling, openAdapter } from '../src/checkpoint/adapter.js';
import { CheckpointError } from '../src/checkpoint/errors.js';
import { openSafetensors } from '../src/safetensors/reader.js';
import { writeSafetensors } from '../src/safetensors/writer.js';
import { fixturesDir, temporaryDirectory } from './support/safetensors.js';

/** Splits a fixture checkpoint into shards (tensor i goes to shard assignment[i]) with an index. */
const shard = async (source: string, directory: string, assignment: (i: number) => number, shards: number) => {
  using file = await openSafetensors(source);
  const names = file.names();
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < shards; s++) {
    const shardName = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const mine = names.filter((_, i) => assignment(i) % shards === s);
    for (const n of mine) weightMap[n] = shardName;
    await writeSafetensors(join(directory, shardName), mine.map((n) => ({ ...file.info(n), data: file.bytes(n) })), { format: 'pt' });
  }
  writeFileSync(join(directory, INDEX_FILE), JSON.stringify({ metadata: { total_size: file.size }, weight_map: weightMap }));
  return weightMap;
};

describe('sharded checkpoints', () => {
  test.prop([fc.array(fc.nat(), { minLength: 28, maxLength: 28 }), fc.integer({ min: 1, max: 4 })], { numRuns: 8 })(
    'the index opens as one checkpoint holding every tensor of the original',
    async (assignment, shards) => {
      using dir = temporaryDirectory();
      const source = join(fixturesDir, 'gpt2_tiny', 'weights_v1.safetensors');
      await shard(source, dir.path, (i) => assignment[i] as number, shards);
      using original = await openSafetensors(source);
      for (const path of [dir.path, join(dir.path, INDEX_FILE)]) {
        using checkpoint = await openCheckpoint(path);
        expect([...checkpoint.tensors.keys()].sort()).toEqual(original.names().sort());
        for (const name of original.names()) {
          expect(checkpoint.tensors.get(name)?.shape).toEqual(original.info(name).shape);
          expect(Buffer.from(checkpoint.bytes(name)).equals(Buffer.from(original.bytes(name)))).toBe(true);
        }
        expect(checkpoint.metadata).toEqual({ total_size: original.size });
      }
    },
  );

  it('a single file and a directory holding model.safetensors open too', async () => {
    using dir = temporaryDirectory();
    const source = join(fixturesDir, 'mlp', 'weights_v1.safetensors');
    writeFileSync(join(dir.path, 'model.safetensors'), readFileSync(source));
    using a = await openCheckpoint(source);
    using b = await openCheckpoint(dir.path);
    expect([...b.tensors.keys()]).toEqual([...a.tensors.keys()]);
    expect(b.toFloat32('0.weight')).toEqual(a.toFloat32('0.weight'));
  });

  it('refuses inconsistent indexes, each with its own tag', async () => {
    using dir = temporaryDirectory();
    const weightMap = await shard(join(fixturesDir, 'mlp', 'weights_v1.safetensors'), dir.path, (i) => i, 2);
    const index = join(dir.path, INDEX_FILE);
    const tagFor = async (content: unknown): Promise<string> => {
      writeFileSync(index, typeof content === 'string' ? content : JSON.stringify(content));
      const result = await openCheckpointTE(index)();
      return E.isLeft(result) ? result.left._tag : 'opened';
    };
    expect(await tagFor({ weight_map: weightMap })).toBe('opened');
    expect(await tagFor('{ not json')).toBe('InvalidIndex');
    expect(await tagFor({ weight_map: { a: 3 } })).toBe('InvalidIndex');
    expect(await tagFor({ weight_map: { ...weightMap, extra: weightMap['0.bias'] } })).toBe('MissingTensor');
    const { ['0.bias']: _dropped, ...withoutOne } = weightMap;
    expect(await tagFor({ weight_map: withoutOne })).toBe('UnlistedTensor');
    expect(await tagFor({ weight_map: { ...weightMap, '0.bias': '../outside.safetensors' } })).toBe('ShardOutsideDirectory');
    expect(await tagFor({ weight_map: { ...weightMap, '0.bias': 'missing.safetensors' } })).toBe('Safetensors');
    const empty = join(dir.path, 'empty');
    mkdirSync(empty);
    await expect(openCheckpoint(empty)).rejects.toBeInstanceOf(CheckpointError);
    await expect(openCheckpoint(empty)).rejects.toMatchObject({ _tag: 'NotACheckpoint' });
  });
});

describe('PEFT adapters', () => {
  for (const model of ['bert_tiny', 'gpt2_tiny']) {
    it(`${model}: the fixture adapter decodes as meta.json describes it and fits the base weights`, async () => {
      const meta = JSON.parse(readFileSync(join(fixturesDir, model, 'meta.json'), 'utf8')) as { lora: { r: number; alpha: number; targets: string[] } };
      using adapter = await openAdapter(join(fixturesDir, model, 'lora'));
      using base = await openSafetensors(join(fixturesDir, model, 'weights_v1.safetensors'));
      expect(adapter.config.r).toBe(meta.lora.r);
      expect(adapter.config.loraAlpha).toBe(meta.lora.alpha);
      expect([...adapter.config.targetModules].sort()).toEqual([...meta.lora.targets].sort());
      expect(adapter.pairs.length).toBe(adapter.tensors.tensors.size / 2);
      expect(adapter.pairs.length).toBeGreaterThan(0);
      for (const pair of adapter.pairs) {
        expect(meta.lora.targets.some((t) => pair.module.endsWith(`.${t}`))).toBe(true);
        expect(pair.scaling).toBe(meta.lora.alpha / meta.lora.r);
        const baseName = `${pair.module.replace(/^base_model\.model\./, '')}.weight`;
        const kernel = base.info(baseName).shape;
        const a = adapter.tensors.tensors.get(pair.a)!.shape;
        const b = adapter.tensors.tensors.get(pair.b)!.shape;
        // torch Linear stores [out, in]; GPT-2's Conv1D stores [in, out] (fan_in_fan_out).
        const [inFeatures, outFeatures] = adapter.config.fanInFanOut ? kernel : [kernel[1], kernel[0]];
        expect(a).toEqual([meta.lora.r, inFeatures]);
        expect(b).toEqual([outFeatures, meta.lora.r]);
        // Both factors are random (init_lora_weights false), so neither is all zeros.
        expect(adapter.tensors.toFloat32(pair.b).some((v) => v !== 0)).toBe(true);
      }
      expect(adapter.config.fanInFanOut).toBe(model === 'gpt2_tiny');
    });
  }

  it('decodes only the fields that matter and refuses bad ones', () => {
    const base = { r: 8, lora_alpha: 16, target_modules: ['q'], anything: { else: true } };
    const ok = decodeAdapterConfig(base, 'c.json');
    expect(E.isRight(ok) && ok.right).toMatchObject({ r: 8, loraAlpha: 16, fanInFanOut: false, useRslora: false });
    for (const bad of [{ ...base, r: 0 }, { ...base, r: 2.5 }, { lora_alpha: 1, target_modules: [] }, { ...base, peft_type: 'IA3' }, { ...base, rank_pattern: { x: -1 } }]) {
      const result = decodeAdapterConfig(bad, 'c.json');
      expect(E.isLeft(result) && result.left._tag).toBe('InvalidAdapterConfig');
    }
  });

  it('scaling follows rank_pattern, alpha_pattern and use_rslora', () => {
    const decoded = decodeAdapterConfig(
      { r: 4, lora_alpha: 8, target_modules: 'q|v', rank_pattern: { 'layer\\.1\\.q': 16 }, alpha_pattern: { v: 2 }, use_rslora: false },
      'c.json',
    );
    expect(E.isRight(decoded)).toBe(true);
    if (E.isLeft(decoded)) return;
    expect(moduleScaling(decoded.right, 'model.layer.0.q')).toEqual({ rank: 4, scaling: 2 });
    expect(moduleScaling(decoded.right, 'model.layer.1.q')).toEqual({ rank: 16, scaling: 0.5 });
    expect(moduleScaling(decoded.right, 'model.layer.0.v')).toEqual({ rank: 4, scaling: 0.5 });
    expect(moduleScaling({ ...decoded.right, useRslora: true }, 'model.layer.0.q')).toEqual({ rank: 4, scaling: 4 });
  });

  it('refuses an adapter whose factors do not fit the rank', async () => {
    using dir = temporaryDirectory();
    writeFileSync(join(dir.path, 'adapter_config.json'), JSON.stringify({ r: 4, lora_alpha: 8, target_modules: ['q'] }));
    await writeSafetensors(join(dir.path, 'adapter_model.safetensors'), [
      { name: 'base_model.model.q.lora_A.weight', dtype: 'F32', shape: [3, 8], data: new Uint8Array(96) },
      { name: 'base_model.model.q.lora_B.weight', dtype: 'F32', shape: [8, 4], data: new Uint8Array(128) },
    ]);
    await expect(openAdapter(dir.path)).rejects.toMatchObject({ _tag: 'InvalidAdapterTensors' });
  });
});
