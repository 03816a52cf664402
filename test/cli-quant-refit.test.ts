/**
 * `trt-refit plan | refit MODEL.trtr --weights QUANTIZED.safetensors` (main() in this process): the plan shows
 * each weight's path (--json and text), the refit copies the quantized kernels into an int8 compiled model
 * (outputs equal an in-process refit from float weights_v2, bit for bit), and a format mismatch exits
 * non-zero naming the tensor, leaving the file as it was.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { compile } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import { readModelFile } from '../src/model/index.js';
import { RefitPlanCodec } from '../src/plan/plan.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixture, outputBytes, temporaryDirectory } from './e2e-support.js';
import { kernelSources, quantizedV2 } from './support/quantized.js';
import { runCli, type CliResult } from './support/cli.js';

type Result = CliResult;

/** The CLI in this process (test/support/cli.ts): exit code, stdout and stderr, with no child process. */
const cli = (...args: string[]): Promise<Result> => runCli(args);

const RefitJson = t.type({ command: t.literal('refit'), output: t.string, totals: t.type({ changed: t.number, errors: t.number }), report: t.type({ changed: t.number }) });

const mlp = (file: string) => fixture('mlp', file);
let dir: { path: string } & Disposable;
beforeAll(() => {
  dir = temporaryDirectory();
});
afterAll(() => dir[Symbol.dispose]());

describe('trt-refit refit --weights QUANTIZED (main() in process)', () => {
  it('plans and refits an int8 model from an int8 checkpoint; a mismatch names the tensor', async () => {
    const cache = join(dir.path, 'cache');
    const model = join(dir.path, 'int8.trtr');
    const compiled = await cli('--json', 'compile', mlp('model_dynamo.onnx'), '--weights', mlp('weights_v1.safetensors'), '-o', model, '--cache', cache, '--weight-format', 'int8');
    expect(compiled.code).toBe(0);

    using expected = await compile(mlp('model_dynamo.onnx'), mlp('weights_v1.safetensors'), { weightFormat: { kind: 'int8' } });
    const kernels = kernelSources(expected);
    const quantized = join(dir.path, 'int8.safetensors');
    await quantizedV2('mlp', quantized, kernels, { kind: 'int8' });
    await refitModel(expected, { checkpoint: mlp('weights_v2.safetensors') });

    const planned = await cli('--json', 'plan', model, '--weights', quantized);
    expect(planned.code).toBe(0);
    const plan = RefitPlanCodec.decode(JSON.parse(planned.stdout));
    if (E.isLeft(plan)) throw new Error(`plan JSON does not decode: ${planned.stdout.slice(0, 300)}`);
    const copies = plan.right.entries.filter((e) => e.path === 'quantized-copy');
    expect(new Set(copies.flatMap((e) => e.sources.map((s) => s.name)))).toEqual(kernels);
    const text = await cli('plan', model, '--weights', quantized);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain(`${copies.length} quantized-copy`);
    for (const e of copies) expect(text.stdout).toContain(`quantized-copy ${e.target}`);

    const refitted = await cli('--json', 'refit', model, '--weights', quantized);
    expect(refitted.stderr).toBe('');
    expect(refitted.code).toBe(0);
    const r = RefitJson.decode(JSON.parse(refitted.stdout));
    if (E.isLeft(r)) throw new Error(`refit JSON does not decode: ${refitted.stdout.slice(0, 300)}`);
    expect(r.right.report.changed).toBeGreaterThan(0);
    const inputs = readSafetensors(mlp('inputs.safetensors'));
    {
      using m = await readModelFile(model);
      expect(outputBytes(await m.run(inputs))).toEqual(outputBytes(await expected.run(inputs)));
    }

    // An int4 checkpoint into the int8 model: refused, naming the tensor; the file is unchanged.
    const int4 = join(dir.path, 'int4.safetensors');
    await quantizedV2('mlp', int4, kernels, { kind: 'int4', groupSize: 32 });
    const bytesBefore = readFileSync(model);
    const refused = await cli('--json', 'refit', model, '--weights', int4);
    expect(refused.code).not.toBe(0);
    expect(refused.stdout + refused.stderr).toMatch(new RegExp(`${[...kernels][0].replace(/\./g, '\\.')}`));
    expect(readFileSync(model).equals(bytesBefore)).toBe(true);
  });
});
