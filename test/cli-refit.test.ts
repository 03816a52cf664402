import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { RefitPlanCodec } from '../src/plan/plan.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, temporaryDirectory } from './e2e-support.js';
import { runCli, type CliResult } from './support/cli.js';

type Result = CliResult;

/** The CLI in this process (test/support/cli.ts): exit code, stdout and stderr, with no child process. */
const cli = (...args: string[]): Promise<Result> => runCli(args);

const decode = <A>(codec: t.Type<A>, text: string): A => {
  const r = codec.decode(JSON.parse(text));
  if (E.isLeft(r)) throw new Error(`JSON does not decode: ${text.slice(0, 200)}`);
  return r.right;
};

const Shape = t.readonlyArray(t.number);
const CompileJson = t.type({ command: t.literal('compile'), output: t.string, bytes: t.number, segments: t.type({ engine: t.number, fallback: t.number }), weights: t.type({ mapped: t.number, constant: t.number, unmapped: t.number }) });
const RefitJson = t.type({
  command: t.literal('refit'), output: t.string,
  totals: t.type({ targets: t.number, changed: t.number, bytesToMove: t.number }),
  report: t.type({ changed: t.number, bytesMoved: t.number, engines: t.readonlyArray(t.number), fallbacks: t.readonlyArray(t.number), batches: t.number, verified: t.boolean, milliseconds: t.number }),
});
const RunJson = t.type({ command: t.literal('run'), output: t.string, outputs: t.record(t.string, t.type({ dtype: t.string, shape: Shape })) });

const gpt2 = (file: string) => fixture('gpt2_tiny', file);
let dir: { path: string } & Disposable;
let model: string;

beforeAll(() => {
  dir = temporaryDirectory();
  model = join(dir.path, 'gpt2.trtr');
});
afterAll(() => dir[Symbol.dispose]());

describe('trt-refit compile | plan | refit | run (main() in process)', () => {
  it('compiles, plans, refits with an adapter and back, and runs: outputs match PyTorch', async () => {
    const compiled = await cli('--json', 'compile', gpt2('model_dynamo.onnx'), '--weights', gpt2('weights_v1.safetensors'), '-o', model);
    expect(compiled.stderr).toBe('');
    expect(compiled.code).toBe(0);
    const c = decode(CompileJson, compiled.stdout);
    expect(c.weights.unmapped).toBe(0);
    expect(c.segments.engine).toBe(3);

    const plan = await cli('--json', 'plan', model, '--weights', gpt2('weights_v1.safetensors'), '--lora', `${gpt2('lora')}:0.5`);
    expect(plan.code).toBe(0);
    const p = decode(RefitPlanCodec, plan.stdout);
    expect(p.totals.changed).toBe(2); // c_attn of both blocks: the adapter's targets
    const text = await cli('plan', model, '--weights', gpt2('weights_v2.safetensors'));
    expect(text.stdout).toMatch(/^29 weights: 29 changed/);
    // A dry run changed nothing.
    expect(decode(RefitPlanCodec, (await cli('--json', 'plan', model, '--weights', gpt2('weights_v1.safetensors'))).stdout).totals.changed).toBe(0);

    const lora = await cli('--json', 'refit', model, '--weights', gpt2('weights_v1.safetensors'), '--lora', gpt2('lora'), '-o', join(dir.path, 'lora.trtr'), '--verify', gpt2('inputs.safetensors'));
    expect(lora.stderr).toBe('');
    const l = decode(RefitJson, lora.stdout);
    expect(l.report.verified).toBe(true);
    expect(l.report.changed).toBe(2);

    const outputs = join(dir.path, 'out.safetensors');
    const ran = await cli('--json', 'run', join(dir.path, 'lora.trtr'), '--inputs', gpt2('inputs.safetensors'), '-o', outputs);
    expect(decode(RunJson, ran.stdout).outputs.output.shape).toEqual([1, 16, 256]);
    expectClose(readSafetensors(outputs).output, readSafetensors(gpt2('expected_lora.safetensors')).output);

    // In place, to v2; then run the original path.
    const v2 = await cli('refit', model, '--weights', gpt2('weights_v2.safetensors'));
    expect(v2.code).toBe(0);
    expect(v2.stdout).toContain('refitted 29 of 29 weights');
    await cli('run', model, '--inputs', gpt2('inputs.safetensors'), '-o', outputs);
    expectClose(readSafetensors(outputs).output, readSafetensors(gpt2('expected_v2.safetensors')).output);
    const same = decode(RefitJson, (await cli('--json', 'refit', model, '--weights', gpt2('weights_v2.safetensors'))).stdout);
    expect(same.report.bytesMoved).toBe(0);
  }, 120_000);

  it('bad input: one clear line on stderr and a non-zero exit', async () => {
    const corrupt = join(dir.path, 'corrupt.trtr');
    const good = existsSync(model) ? readFileSync(model) : Buffer.alloc(0);
    writeFileSync(corrupt, good.subarray(0, Math.floor(good.length / 2)));
    const cases: [string[], RegExp][] = [
      [['plan', join(dir.path, 'missing.trtr'), '--weights', gpt2('weights_v1.safetensors')], /missing\.trtr: cannot read the compiled model/],
      [['refit', corrupt, '--weights', gpt2('weights_v1.safetensors')], /corrupt\.trtr: invalid compiled model/],
      [['compile', join(dir.path, 'missing.onnx'), '--weights', gpt2('weights_v1.safetensors'), '-o', join(dir.path, 'x.trtr')], /missing\.onnx: cannot read the ONNX model/],
      [['refit', model, '--weights', gpt2('weights_v1.safetensors'), '--lora', fixture('bert_tiny', 'lora')], /bert_tiny\/lora: .*no base checkpoint weight/],
      [['plan', model, '--weights', fixture('mlp', 'weights_v1.safetensors')], /is missing|maps to no weight/],
    ];
    const before = readFileSync(model);
    for (const [args, message] of cases) {
      const r = await cli(...args);
      expect(r.code, args.join(' ')).not.toBe(0);
      if (args[0] === 'plan' && args[1] === model) {
        // A plan with errors prints the plan and exits 1 (the check failed).
        expect(r.code).toBe(1);
        expect(r.stdout).toMatch(message);
        continue;
      }
      expect(r.code).toBe(2);
      expect(r.stdout).toBe('');
      const lines = r.stderr.trim().split('\n');
      expect(lines.length).toBe(1);
      expect(lines[0]).toMatch(/^trt-refit: /);
      expect(lines[0]).toMatch(message);
    }
    // Nothing failed half-way into the model file.
    expect(readFileSync(model).equals(before)).toBe(true);
  }, 120_000);
});

describe('src/cli/entry.ts, the process the CLI runs as', () => {
  it('exits with the code main returns and prints the one error line (one child process, awaited to its exit)', async () => {
    const { execFile } = await import('node:child_process');
    const { repoRoot } = await import('./support/safetensors.js');
    const missing = join(dir.path, 'missing.trtr');
    const r = await new Promise<Result>((resolve) => {
      execFile(process.execPath, ['--import', 'tsx', join(repoRoot, 'src', 'cli', 'entry.ts'), 'plan', missing, '--weights', gpt2('weights_v1.safetensors')], { cwd: repoRoot, env: process.env }, (error, stdout, stderr) => {
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
      });
    });
    const inProcess = await cli('plan', missing, '--weights', gpt2('weights_v1.safetensors'));
    expect(r).toEqual(inProcess);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^trt-refit: .*missing\.trtr: cannot read the compiled model/);
  });
});
