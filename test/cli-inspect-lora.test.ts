/** `trt-refit inspect` and `trt-refit lora apply | switch | remove`, end to end through main() in this process:
 *  success paths against PyTorch's outputs, --json shapes decoded with io-ts, and bad input. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import { compileFile } from '../src/effect/files.js';
import { InspectJsonCodec } from '../src/cli/inspect.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, temporaryDirectory } from './e2e-support.js';
import { runCli, type CliResult } from './support/cli.js';

type Result = CliResult;

/** The CLI in this process (test/support/cli.ts): exit code, stdout and stderr, with no child process. */
const cli = (...args: string[]): Promise<Result> => runCli(args);

const decode = <A>(codec: t.Type<A, unknown>, text: string): A => {
  const r = codec.decode(JSON.parse(text));
  if (E.isLeft(r)) throw new Error(`JSON does not decode: ${PathReporter.report(r).slice(0, 3).join('; ')}`);
  return r.right;
};

const LoraJson = t.type({
  command: t.literal('lora'), action: t.keyof({ apply: null, switch: null, remove: null }), output: t.string, base: t.string,
  adapters: t.readonlyArray(t.type({ path: t.string, weight: t.number })), changed: t.number, bytesMoved: t.number, milliseconds: t.number,
});

const gpt2 = (file: string) => fixture('gpt2_tiny', file);
const expected = (name: string) => readSafetensors(gpt2(`${name}.safetensors`)).output;

/** One line on stderr, prefixed, matching `message`; nothing on stdout; exit code 2. */
const expectOneLine = (r: Result, message: RegExp) => {
  expect(r.code).toBe(2);
  expect(r.stdout).toBe('');
  const lines = r.stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^trt-refit: /);
  expect(lines[0]).toMatch(message);
};

let dir: { path: string } & Disposable;
let model: string;

beforeAll(async () => {
  dir = temporaryDirectory();
  model = join(dir.path, 'gpt2.trtr');
  await compileFile(gpt2('model_dynamo.onnx'), gpt2('weights_v1.safetensors'), model);
});
afterAll(() => dir[Symbol.dispose]());

describe('trt-refit inspect | lora (main() in process)', () => {
  it('inspect: segments, weights, coverage; --json decodes', async () => {
    const [json, text, listed] = await Promise.all([cli('--json', 'inspect', model), cli('inspect', model), cli('inspect', model, '--weights')]);
    expect(json.code).toBe(0);
    const doc = decode(InspectJsonCodec, json.stdout);
    expect(doc.segments.map((s) => s.kind)).toEqual(['engine', 'fallback', 'engine', 'fallback', 'engine']);
    expect(doc.inputs).toEqual([{ name: 'input_ids', dtype: 'int64', shape: [1, 16] }]);
    expect(doc.coverage).toEqual({ mapped: 29, constant: 18, unmapped: [], refitted: 0 });
    expect(doc.weights).toHaveLength(47);
    // GPT-2's tied head reads the embedding.
    expect(doc.weights.filter((w) => w.sources.includes('transformer.wte.weight')).length).toBeGreaterThanOrEqual(2);
    expect(doc.segments.reduce((s, x) => s + x.weights, 0)).toBe(47);
    expect(doc.lora).toBeNull();
    expect(text.code).toBe(0);
    expect(text.stdout.split('\n')[0]).toContain('gpt2.trtr: compiled model');
    expect(text.stdout).toMatch(/weights: 29 mapped to the checkpoint, 18 graph constants, 0 unmapped/);
    expect(listed.stdout.split('\n').length).toBe(text.stdout.split('\n').length + 47);
  });

  it('lora apply -> run matches PyTorch; switch and remove use the recorded base; remove goes back to v1', async () => {
    const withLora = join(dir.path, 'lora.trtr');
    const outputs = join(dir.path, 'out.safetensors');
    const applied = await cli('--json', 'lora', 'apply', model, gpt2('lora'), '--weights', gpt2('weights_v1.safetensors'), '-o', withLora);
    expect(applied.stderr).toBe('');
    const a = decode(LoraJson, applied.stdout);
    expect(a).toMatchObject({ action: 'apply', output: withLora, adapters: [{ path: gpt2('lora'), weight: 1 }], changed: 2 });
    expect((await cli('run', withLora, '--inputs', gpt2('inputs.safetensors'), '-o', outputs)).code).toBe(0);
    expectClose(readSafetensors(outputs).output, expected('expected_lora'));
    const inspected = decode(InspectJsonCodec, (await cli('--json', 'inspect', withLora)).stdout);
    expect(inspected.lora).toEqual({ base: gpt2('weights_v1.safetensors'), adapters: [{ path: gpt2('lora'), weight: 1 }], stale: false });
    expect(inspected.coverage.refitted).toBe(2);

    // No --weights: the recorded base.
    const switched = decode(LoraJson, (await cli('--json', 'lora', 'switch', withLora, `${gpt2('lora')}:0.5`)).stdout);
    expect(switched.adapters).toEqual([{ path: gpt2('lora'), weight: 0.5 }]);
    expect(switched.changed).toBe(2);
    const removed = await cli('lora', 'remove', withLora);
    expect(removed.code).toBe(0);
    expect(removed.stdout).toContain('active adapters none (base weights)');
    await cli('run', withLora, '--inputs', gpt2('inputs.safetensors'), '-o', outputs);
    expectClose(readSafetensors(outputs).output, expected('expected_v1'));
    expect(decode(InspectJsonCodec, (await cli('--json', 'inspect', withLora)).stdout).coverage.refitted).toBe(0);
  });

  it('bad input: one clear line on stderr, exit code 2; --verbose adds the stack', async () => {
    const corrupt = join(dir.path, 'corrupt.trtr');
    const bytes = readFileSync(model);
    writeFileSync(corrupt, bytes.subarray(0, bytes.length - 100));
    // A model refitted by other means after a lora command: its recorded base is stale.
    const stale = join(dir.path, 'stale.trtr');
    copyFileSync(model, stale);
    const badState = join(dir.path, 'bad-state.trtr');
    copyFileSync(model, badState);
    writeFileSync(`${badState}.lora.json`, '{"version": 1, "base": 3}');
    expect((await cli('lora', 'apply', stale, gpt2('lora'), '--weights', gpt2('weights_v1.safetensors'))).code).toBe(0);
    expect((await cli('refit', stale, '--weights', gpt2('weights_v2.safetensors'))).code).toBe(0);

    const cases: [string[], RegExp][] = [
      [['inspect', join(dir.path, 'missing.trtr')], /missing\.trtr: cannot read the compiled model/],
      [['inspect', corrupt], /corrupt\.trtr: invalid compiled model/],
      [['lora', 'apply', corrupt, gpt2('lora'), '--weights', gpt2('weights_v1.safetensors')], /corrupt\.trtr: invalid compiled model/],
      [['lora', 'apply', model, gpt2('lora')], /no base weights recorded .*pass --weights BASE/],
      [['lora', 'apply', model, fixture('bert_tiny', 'lora'), '--weights', gpt2('weights_v1.safetensors')], /bert_tiny\/lora: .*is the adapter for another model/],
      [['lora', 'apply', model, join(dir.path, 'no-such-adapter'), '--weights', gpt2('weights_v1.safetensors')], /no-such-adapter/],
      [['lora', 'remove', stale], /refitted since the last lora command.*--weights BASE/],
      [['lora', 'remove', badState, gpt2('lora')], /bad-state\.trtr\.lora\.json: not a LoRA state file/],
      [['lora', 'remove', stale, gpt2('lora'), '--weights', gpt2('weights_v1.safetensors')], /adapter .*lora is not active \(active: none\)/],
    ];
    const before = readFileSync(model);
    const results = await Promise.all(cases.map(([args]) => cli(...args)));
    results.forEach((r, i) => expectOneLine(r, cases[i][1]));
    expect(readFileSync(model).equals(before)).toBe(true);

    const verbose = await cli('--verbose', 'inspect', corrupt);
    expect(verbose.code).toBe(2);
    expect(verbose.stderr.split('\n')[0]).toMatch(/^trt-refit: .*invalid compiled model/);
    expect(verbose.stderr).toMatch(/\n\s+at /);
  });
});
