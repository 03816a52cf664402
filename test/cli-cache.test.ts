/**
 * The engine cache from the command line (main() in this process): `compile --cache DIR`, $TRT_REFIT_CACHE and
 * `--no-cache`, the "cache" field of compile's JSON, a hit's outputs equal to an uncached build's, and
 * `cache ls | verify | gc | clear --json`, every document decoded with io-ts.
 */
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import { fixture, temporaryDirectory } from './e2e-support.js';
import { runCli, type CliResult } from './support/cli.js';

type Result = CliResult;

/** The CLI in this process (test/support/cli.ts); `env` overrides environment variables for the call. */
const cli = (env: Record<string, string | undefined>, ...args: string[]): Promise<Result> => runCli(args, env);

const decode = <A>(codec: t.Type<A>, r: Result): A => {
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const d = codec.decode(JSON.parse(r.stdout));
  if (E.isLeft(d)) throw new Error(`JSON does not decode: ${PathReporter.report(d).join('; ')}\n${r.stdout.slice(0, 300)}`);
  return d.right;
};

const Timings = t.intersection([t.type({ readMs: t.number, planMs: t.number, hashMs: t.number, lookupMs: t.number, totalMs: t.number }), t.partial({ loadMs: t.number, buildMs: t.number, insertMs: t.number })]);
const CompileJson = t.intersection([
  t.type({ command: t.literal('compile'), output: t.string, cache: t.keyof({ hit: null, miss: null, off: null }), timings: Timings }),
  t.partial({ cacheKey: t.string, cacheDir: t.string, missReason: t.string }),
]);
const Entry = t.intersection([
  t.type({ key: t.string, status: t.keyof({ ok: null, damaged: null }), bytes: t.number }),
  t.partial({ lastUsed: t.number, created: t.number, blobs: t.readonlyArray(t.type({ name: t.string, bytes: t.number, sha256: t.string })), parts: t.type({ backend: t.type({ name: t.string, version: t.string, abi: t.number }) }) }),
]);
const LsJson = t.type({ dir: t.string, entries: t.readonlyArray(Entry) });
const VerifyJson = t.type({ dir: t.string, ok: t.readonlyArray(t.string), removed: t.readonlyArray(t.type({ key: t.string, detail: t.string })) });
const GcJson = t.type({ dir: t.string, evicted: t.readonlyArray(t.string), removedDamaged: t.readonlyArray(t.string), removedTemporaries: t.number, bytesBefore: t.number, bytesAfter: t.number });
const ClearJson = t.type({ dir: t.string, removed: t.number });

const onnx = fixture('mlp', 'model_dynamo.onnx');
const weights = fixture('mlp', 'weights_v1.safetensors');
const inputs = fixture('mlp', 'inputs.safetensors');

describe('trt-refit compile with the engine cache (main() in process)', () => {
  it('--cache DIR misses then hits; $TRT_REFIT_CACHE sets the directory; --no-cache neither reads nor writes', async () => {
    using dir = temporaryDirectory();
    const cache = join(dir.path, 'cache');
    const noEnv = { TRT_REFIT_CACHE: undefined, XDG_CACHE_HOME: join(dir.path, 'xdg') };
    const out = (name: string) => join(dir.path, name);

    const first = decode(CompileJson, await cli(noEnv, '--json', 'compile', onnx, '--weights', weights, '-o', out('a.trtr'), '--cache', cache));
    expect(first.cache).toBe('miss');
    expect(first.cacheDir).toBe(cache);
    expect(first.timings.buildMs).toBeGreaterThanOrEqual(0);
    const second = decode(CompileJson, await cli({ ...noEnv, TRT_REFIT_CACHE: cache }, '--json', 'compile', onnx, '--weights', weights, '-o', out('b.trtr')));
    expect(second.cache).toBe('hit');
    expect(second.cacheKey).toBe(first.cacheKey);
    expect(second.timings.loadMs).toBeGreaterThanOrEqual(0);
    expect(second.timings.buildMs).toBeUndefined();
    const off = decode(CompileJson, await cli({ ...noEnv, TRT_REFIT_CACHE: cache }, '--json', 'compile', onnx, '--weights', weights, '-o', out('c.trtr'), '--no-cache'));
    expect(off.cache).toBe('off');
    expect(off.cacheKey).toBeUndefined();
    // The default directory (no option, no variable) is $XDG_CACHE_HOME/trt-refit: on by default.
    const byDefault = decode(CompileJson, await cli(noEnv, '--json', 'compile', onnx, '--weights', weights, '-o', out('d.trtr')));
    expect(byDefault).toMatchObject({ cache: 'miss', cacheDir: join(dir.path, 'xdg', 'trt-refit') });

    // The hit's outputs equal the uncached build's, byte for byte.
    const runs = await Promise.all(['b', 'c'].map((m) => cli(noEnv, 'run', out(`${m}.trtr`), '--inputs', inputs, '-o', out(`${m}.out.safetensors`))));
    for (const r of runs) expect(r.code).toBe(0);
    expect(readFileSync(out('b.out.safetensors')).equals(readFileSync(out('c.out.safetensors')))).toBe(true);

    // cache ls / verify / gc / clear, with --cache and with $TRT_REFIT_CACHE.
    const ls = decode(LsJson, await cli(noEnv, '--json', 'cache', '--cache', cache, 'ls'));
    expect(ls.entries.map((e) => [e.key, e.status])).toEqual([[first.cacheKey, 'ok']]);
    expect(ls.entries[0].blobs?.map((b) => b.name).sort()).toEqual(['bindings.json', 'engine-0.plan', 'source.json', 'weightmap.json']);
    const verified = decode(VerifyJson, await cli({ TRT_REFIT_CACHE: cache }, '--json', 'cache', 'verify'));
    expect(verified).toMatchObject({ dir: cache, ok: [first.cacheKey], removed: [] });

    const blobs = join(cache, 'v1', 'entries', first.cacheKey!, 'blobs');
    const plan = readdirSync(blobs).find((n) => n.startsWith('engine-'))!;
    const bytes = readFileSync(join(blobs, plan));
    bytes[0] ^= 1;
    writeFileSync(join(blobs, plan), bytes);
    const damaged = decode(VerifyJson, await cli(noEnv, '--json', 'cache', '--cache', cache, 'verify'));
    expect(damaged.ok).toEqual([]);
    expect(damaged.removed.map((r) => r.key)).toEqual([first.cacheKey]);
    expect(damaged.removed[0].detail).toMatch(/sha256/);
    // After the damaged entry went, compile misses and stores it again.
    expect(decode(CompileJson, await cli(noEnv, '--json', 'compile', onnx, '--weights', weights, '-o', out('e.trtr'), '--cache', cache)).cache).toBe('miss');

    const gc = decode(GcJson, await cli(noEnv, '--json', 'cache', '--cache', cache, 'gc', '--max-size', '0'));
    expect(gc.evicted).toEqual([first.cacheKey]);
    expect(gc.bytesBefore).toBeGreaterThan(0);
    expect(gc.bytesAfter).toBe(0);
    expect(decode(LsJson, await cli(noEnv, '--json', 'cache', '--cache', cache, 'ls')).entries).toEqual([]);

    expect(decode(CompileJson, await cli(noEnv, '--json', 'compile', onnx, '--weights', weights, '-o', out('f.trtr'), '--cache', cache)).cache).toBe('miss');
    expect(decode(ClearJson, await cli(noEnv, '--json', 'cache', '--cache', cache, 'clear'))).toEqual({ dir: cache, removed: 1 });
    expect(decode(LsJson, await cli(noEnv, '--json', 'cache', '--cache', cache, 'ls')).entries).toEqual([]);
  }, 180_000);

  it('a bad --max-size is one line on stderr and exit code 2', async () => {
    using dir = temporaryDirectory();
    const r = await cli({}, 'cache', '--cache', dir.path, 'gc', '--max-size', 'lots');
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^trt-refit: 'lots' is not a size/);
  }, 60_000);
});
