/**
 * Weight streaming from the command line (main() in this process): `compile --weight-streaming` records that the
 * engines stream, `run --weight-budget 0 | 50% | auto` gives outputs byte-identical to a run without a
 * budget (with the budget split over every engine segment, summing to the request), and a bad budget is
 * one line on stderr with exit code 2.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, afterAll, describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { readModelFile, readModelHeader } from '../src/model/index.js';
import { fixture, temporaryDirectory } from './e2e-support.js';
import { runCli, type CliResult } from './support/cli.js';

type Result = CliResult;

/** The CLI in this process (test/support/cli.ts): exit code, stdout and stderr, with no child process. */
const cli = (...args: string[]): Promise<Result> => runCli(args);

const RunJson = t.intersection([
  t.type({ command: t.literal('run'), output: t.string }),
  t.partial({ weightBudget: t.type({ requested: t.string, engineBytes: t.readonlyArray(t.number), streamableBytes: t.number }) }),
]);
const decodeRun = (r: Result) => {
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const d = RunJson.decode(JSON.parse(r.stdout));
  if (E.isLeft(d)) throw new Error(`run JSON does not decode: ${r.stdout.slice(0, 300)}`);
  return d.right;
};

const expectOneLineError = (r: Result, message: RegExp) => {
  expect(r.code).toBe(2);
  expect(r.stdout).toBe('');
  const lines = r.stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(message);
};

// gpt2_tiny: three engine segments between ONNX Runtime fallbacks, so a budget is split three ways.
const onnx = fixture('gpt2_tiny', 'model_dynamo.onnx');
const weights = fixture('gpt2_tiny', 'weights_v1.safetensors');
const inputs = fixture('gpt2_tiny', 'inputs.safetensors');
let dir: { path: string } & Disposable;
let streaming: string;
let plain: string;

beforeAll(async () => {
  dir = temporaryDirectory();
  streaming = join(dir.path, 'streaming.trtr');
  plain = join(dir.path, 'plain.trtr');
  const built = await Promise.all([
    cli('compile', onnx, '--weights', weights, '-o', streaming, '--no-cache', '--weight-streaming'),
    cli('compile', onnx, '--weights', weights, '-o', plain, '--no-cache'),
  ]);
  for (const r of built) expect(r.stderr).toBe('');
}, 120_000);
afterAll(() => dir[Symbol.dispose]());

describe('trt-refit compile --weight-streaming | run --weight-budget (main() in process)', () => {
  it('the compiled model records streaming and its engines stream', async () => {
    expect((await readModelHeader(streaming)).build.weightStreaming).toBe(true);
    expect((await readModelHeader(plain)).build.weightStreaming).toBeUndefined();
    using model = await readModelFile(streaming);
    expect(model.engineStages().length).toBeGreaterThan(1);
    expect(model.engineStages().every((s) => s.engine.streamableWeightBytes() > 0)).toBe(true);
  });

  it('outputs under --weight-budget 0, 50% and auto are byte-identical to a run without a budget', async () => {
    const out = (name: string) => join(dir.path, `${name}.safetensors`);
    const budgets = ['0', '50%', 'auto'] as const;
    const [none, ...budgeted] = await Promise.all([
      cli('--json', 'run', streaming, '--inputs', inputs, '-o', out('none')),
      ...budgets.map((b, i) => cli('--json', 'run', streaming, '--inputs', inputs, '-o', out(`b${i}`), '--weight-budget', b)),
    ]);
    expect(decodeRun(none).weightBudget).toBeUndefined();
    const want = readFileSync(out('none'));
    const reports = budgeted.map((r) => decodeRun(r).weightBudget!);
    budgets.forEach((_, i) => expect(readFileSync(out(`b${i}`)).equals(want), budgets[i]).toBe(true));
    const [zero, half, auto] = reports;
    const total = zero.streamableBytes;
    expect(total).toBeGreaterThan(0);
    expect(zero.engineBytes.length).toBeGreaterThan(1);
    expect(zero.engineBytes.every((b) => b === 0)).toBe(true);
    expect(half.requested).toBe('50%');
    expect(half.engineBytes.reduce((a, b) => a + b, 0)).toBe(Math.floor(total / 2));
    expect(half.engineBytes.every((b) => b > 0)).toBe(true); // split over every engine segment
    expect(auto.requested).toBe('auto');
    expect(auto.engineBytes.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(total);
  }, 120_000);

  it('a bad budget is one line on stderr and exit code 2', async () => {
    const o = join(dir.path, 'bad.safetensors');
    const [words, percent, tooMany, notStreaming] = await Promise.all([
      cli('run', streaming, '--inputs', inputs, '-o', o, '--weight-budget', 'lots'),
      cli('run', streaming, '--inputs', inputs, '-o', o, '--weight-budget', '150%'),
      cli('run', streaming, '--inputs', inputs, '-o', o, '--weight-budget', String(2 ** 50)),
      cli('run', plain, '--inputs', inputs, '-o', o, '--weight-budget', '50%'),
    ]);
    expectOneLineError(words, /--weight-budget.*'lots'.*expected BYTES/);
    expectOneLineError(percent, /--weight-budget.*0 to 100/);
    expectOneLineError(tooMany, /^trt-refit: .*exceeds the \d+ streamable bytes/);
    expectOneLineError(notStreaming, /^trt-refit: .*no engine of the model streams.*--weight-streaming/);
  }, 120_000);
});
