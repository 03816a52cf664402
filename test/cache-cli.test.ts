/** `trt-refit cache ls | verify | gc | clear` with --json, and the --cache / --no-cache option parsing. */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { Command } from 'commander';
import { addCacheOptions, parseBytes, registerCacheCommands, resolveCacheSetting } from '../src/cli/cache.js';
import { CacheStore } from '../src/cache/store.js';
import { temporaryCache } from './support/cache.js';
import { killTestKey } from './support/cache-child.js';

const runCli = async (args: string[]): Promise<unknown> => {
  const program = new Command().option('--json').exitOverride();
  registerCacheCommands(program);
  const lines: string[] = [];
  const spy = vi.spyOn(console, 'log').mockImplementation((s: unknown) => void lines.push(String(s)));
  try {
    await program.parseAsync(args, { from: 'user' });
  } finally {
    spy.mockRestore();
  }
  return JSON.parse(lines.join('\n'));
};

describe('trt-refit cache', () => {
  it('ls, verify, gc and clear report in JSON', async () => {
    using dir = temporaryCache();
    const store = new CacheStore({ root: dir.path });
    await store.put(killTestKey, [{ name: 'engine-0.plan', data: new Uint8Array(100).fill(7) }]);
    const ls = (await runCli(['--json', 'cache', '--cache', dir.path, 'ls'])) as { entries: Array<{ key: string; status: string }> };
    expect(ls.entries.map((e) => [e.key, e.status])).toEqual([[killTestKey.digest, 'ok']]);
    writeFileSync(join(store.entryDir(killTestKey.digest), 'blobs', 'engine-0.plan'), 'x');
    const verify = (await runCli(['--json', 'cache', '--cache', dir.path, 'verify'])) as { removed: Array<{ key: string }> };
    expect(verify.removed.map((r) => r.key)).toEqual([killTestKey.digest]);
    await store.put(killTestKey, [{ name: 'engine-0.plan', data: new Uint8Array(100).fill(7) }]);
    const gc = (await runCli(['--json', 'cache', '--cache', dir.path, 'gc', '--max-size', '0'])) as { evicted: string[]; bytesAfter: number };
    expect(gc).toMatchObject({ evicted: [killTestKey.digest], bytesAfter: 0 });
    await store.put(killTestKey, [{ name: 'engine-0.plan', data: new Uint8Array(1) }]);
    expect(await runCli(['--json', 'cache', '--cache', dir.path, 'clear'])).toMatchObject({ removed: 1 });
    expect(await store.ls()).toEqual([]);
  });

  it('--cache DIR, --no-cache and $TRT_REFIT_CACHE', async () => {
    const parse = async (args: string[]) => {
      const cmd = addCacheOptions(new Command('compile').exitOverride());
      await cmd.parseAsync(args, { from: 'user' });
      return cmd.opts<{ cache?: string | boolean }>().cache;
    };
    expect(resolveCacheSetting(await parse(['--cache', '/d']), {})).toEqual({ enabled: true, dir: '/d' });
    expect(resolveCacheSetting(await parse(['--no-cache']), { TRT_REFIT_CACHE: '/e' })).toEqual({ enabled: false });
    expect(resolveCacheSetting(await parse([]), { TRT_REFIT_CACHE: '/e' })).toEqual({ enabled: true, dir: '/e' });
    expect(parseBytes('10G')).toBe(10 * 2 ** 30);
    expect(parseBytes('512k')).toBe(512 * 1024);
    expect(() => parseBytes('lots')).toThrow(/not a size/);
  });
});
