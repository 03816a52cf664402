/**
 * `trt-refit compile --weight-format ...` (main() in this process): the format reaches every engine build (the
 * compiled file equals an in-process compile in that format, bit for bit), is recorded in the .trtr, is part
 * of the engine cache key (int8 after fp32 misses; int8 again hits and gives the same bytes), and clashes
 * with --precision only when the two disagree.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { compile } from '../src/compile/index.js';
import { readModelFile } from '../src/model/index.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixture, outputBytes, temporaryDirectory } from './e2e-support.js';
import { runCli, type CliResult } from './support/cli.js';

type Result = CliResult;

/** The CLI in this process (test/support/cli.ts): exit code, stdout and stderr, with no child process. */
const cli = (...args: string[]): Promise<Result> => runCli(args);

const CompileJson = t.type({ command: t.literal('compile'), output: t.string, cache: t.string, cacheKey: t.string, weightFormat: t.string });
const decodeCompile = (text: string) => {
  const r = CompileJson.decode(JSON.parse(text));
  if (E.isLeft(r)) throw new Error(`compile JSON does not decode: ${text.slice(0, 300)}`);
  return r.right;
};

const mlp = (file: string) => fixture('mlp', file);
let dir: { path: string } & Disposable;
beforeAll(() => {
  dir = temporaryDirectory();
});
afterAll(() => dir[Symbol.dispose]());

describe('trt-refit compile --weight-format (main() in process)', () => {
  it('builds in the format, records it, keys the cache by it', async () => {
    const cache = join(dir.path, 'cache');
    const inputs = readSafetensors(mlp('inputs.safetensors'));
    const run = async (args: string[], out: string) => {
      const r = await cli('--json', 'compile', mlp('model_dynamo.onnx'), '--weights', mlp('weights_v1.safetensors'), '-o', out, '--cache', cache, ...args);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      return decodeCompile(r.stdout);
    };
    const fp32 = await run([], join(dir.path, 'fp32.trtr'));
    expect(fp32.weightFormat).toBe('fp32');
    const int8 = await run(['--weight-format', 'int8'], join(dir.path, 'int8.trtr'));
    expect(int8.weightFormat).toBe('int8');
    expect(int8.cache).toBe('miss');
    expect(int8.cacheKey).not.toBe(fp32.cacheKey);
    const again = await run(['--weight-format', 'INT8', '--precision', 'float32'], join(dir.path, 'int8-again.trtr'));
    expect(again.cache).toBe('hit');
    expect(again.cacheKey).toBe(int8.cacheKey);
    const int4 = await run(['--weight-format', 'int4:64'], join(dir.path, 'int4.trtr'));
    expect(int4.weightFormat).toBe('int4:64');

    using inProcess = await compile(mlp('model_dynamo.onnx'), mlp('weights_v1.safetensors'), { weightFormat: { kind: 'int8' } });
    const want = outputBytes(await inProcess.run(inputs));
    for (const file of ['int8.trtr', 'int8-again.trtr']) {
      using m = await readModelFile(join(dir.path, file));
      expect(m.description.build.weightFormat).toBe('int8');
      expect(outputBytes(await m.run(inputs))).toEqual(want);
    }
    using f = await readModelFile(join(dir.path, 'fp32.trtr'));
    expect(outputBytes(await f.run(inputs))).not.toEqual(want);
    using q4 = await readModelFile(join(dir.path, 'int4.trtr'));
    const kernels = q4.engineStages().flatMap((s) => s.engine.kernelFormats()).filter((w) => w.format !== 'asPrecision');
    expect(kernels.length).toBeGreaterThan(0);
    expect(kernels.every((w) => w.format === 'int4' && w.groupSize === 64)).toBe(true);
  });

  it('refuses a bad format and a --precision that contradicts a float format, naming both', async () => {
    const out = join(dir.path, 'refused.trtr');
    const bad = await cli('compile', mlp('model_dynamo.onnx'), '--weights', mlp('weights_v1.safetensors'), '-o', out, '--no-cache', '--weight-format', 'int4:48');
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/int4:48/);
    const clash = await cli('compile', mlp('model_dynamo.onnx'), '--weights', mlp('weights_v1.safetensors'), '-o', out, '--no-cache', '--weight-format', 'fp16', '--precision', 'bfloat16');
    expect(clash.code).not.toBe(0);
    expect(clash.stderr).toMatch(/fp16/);
    expect(clash.stderr).toMatch(/bfloat16/);
    // Agreeing spellings, and a quantized format with a precision for the float rest, are fine.
    const formatOf = (text: string) => {
      const r = t.type({ weightFormat: t.string, cache: t.literal('off') }).decode(JSON.parse(text));
      return E.isRight(r) ? r.right.weightFormat : `undecodable: ${text.slice(0, 200)}`;
    };
    for (const [args, want] of [[['--weight-format', 'bf16', '--precision', 'bfloat16'], 'bf16'], [['--precision', 'float16'], 'fp16'], [['--weight-format', 'int8', '--precision', 'float16'], 'int8']] as const) {
      const r = await cli('--json', 'compile', mlp('model_dynamo.onnx'), '--weights', mlp('weights_v1.safetensors'), '-o', out, '--no-cache', ...args);
      expect(r.code).toBe(0);
      expect(formatOf(r.stdout)).toBe(want);
    }
  });
});
