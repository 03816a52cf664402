/** Several processes on one cache: two compiling the same model at once both succeed and leave one entry;
 *  a writer killed at each step of an insert (src/crash-point.ts: the child stops itself there, no
 *  wall-clock kill) leaves the cache readable and never serves a damaged entry. */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CacheStore } from '../src/cache/store.js';
import { CRASH_ENV } from '../src/crash-point.js';
import { compileModelWithCache } from '../src/cache/model.js';
import { killTestBlobs, killTestKey } from './support/cache-child.js';
import { fixtureAnalyzed, fixtureInputs } from './support/cache-fixtures.js';
import { temporaryCache } from './support/cache.js';
import { repoRoot } from './support/safetensors.js';

const child = join(repoRoot, 'test', 'support', 'cache-child.ts');

/** Runs the child to its end, or to its crash at `crashAt` (src/crash-point.ts). */
const runChild = (args: string[], crashAt?: string): Promise<{ code: number | null; killed: boolean; stdout: string }> =>
  new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, ['--import', 'tsx', child, ...args], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, [CRASH_ENV]: crashAt ?? '' } });
    let stdout = '';
    proc.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    proc.on('error', reject);
    proc.on('exit', (code, signal) => resolve({ code, killed: signal === 'SIGKILL', stdout }));
  });

describe('two processes compiling the same model at once', () => {
  it('both succeed, leave one entry, and both engines give the right outputs', async () => {
    using dir = temporaryCache();
    const [a, b] = await Promise.all([runChild(['compile', dir.path, 'gpt2_tiny']), runChild(['compile', dir.path, 'gpt2_tiny'])]);
    expect(a.code).toBe(0);
    expect(b.code).toBe(0);
    const ra = JSON.parse(a.stdout.trim().split('\n').pop()!);
    const rb = JSON.parse(b.stdout.trim().split('\n').pop()!);
    // Outputs of a fresh build, without the cache, in this process.
    const fresh = await compileModelWithCache(fixtureAnalyzed('gpt2_tiny'), undefined);
    using model = fresh.value;
    const outputs = await model.model.run(await fixtureInputs('gpt2_tiny'));
    const h = createHash('sha256');
    for (const name of Object.keys(outputs).sort()) h.update(new Uint8Array(outputs[name].data.buffer, outputs[name].data.byteOffset, outputs[name].data.byteLength));
    const want = h.digest('hex');
    expect(ra.output).toBe(want);
    expect(rb.output).toBe(want);
    const store = new CacheStore({ root: dir.path });
    const entries = await store.ls();
    expect(entries.length).toBe(1);
    expect(entries[0].status).toBe('ok');
    expect((await store.verify()).removed).toEqual([]);
    // A third compile is a hit.
    const c = await runChild(['compile', dir.path, 'gpt2_tiny']);
    expect(JSON.parse(c.stdout.trim().split('\n').pop()!)).toEqual({ cache: 'hit', output: want });
  });
});

describe('a writer killed while inserting', () => {
  it('leaves the cache readable at every step of an insert; a lookup finds the complete entry or a miss, never a damaged one', async () => {
    using dir = temporaryCache();
    const store = new CacheStore({ root: dir.path });
    const want = killTestBlobs();
    const leftovers = () => (existsSync(store.tmpDir) ? readdirSync(store.tmpDir).length : 0);
    // Each crash point of CacheStore.put, and whether the entry is in place when the process dies.
    const cases: { at: string | undefined; entry: boolean }[] = [
      { at: 'cache.put.blob#1', entry: false },
      { at: 'cache.put.blob#33', entry: false },
      { at: `cache.put.blob#${want.length}`, entry: false },
      { at: 'cache.put.staged', entry: false },
      { at: 'cache.put.renamed', entry: true },
      { at: undefined, entry: true },
    ];
    for (const c of cases) {
      const run = await runChild(['insert', dir.path], c.at);
      expect(run.killed, String(c.at)).toBe(c.at !== undefined);
      if (c.at === undefined) expect(run.code).toBe(0);
      // Killed before the rename: its staging directory is left behind, and nothing else.
      expect(leftovers(), String(c.at)).toBe(c.entry ? 0 : 1);
      for (const e of await store.ls()) expect(e.status).toBe('ok');
      const r = await store.get(killTestKey);
      expect(r._tag, String(c.at)).toBe(c.entry ? 'hit' : 'miss');
      if (r._tag === 'hit') {
        expect(r.entry.blobs.size).toBe(want.length);
        for (const b of want) expect(Buffer.from(r.entry.blobs.get(b.name)!).equals(Buffer.from(b.data))).toBe(true);
        await store.remove(killTestKey.digest);
      }
      // gc clears what the killed writer left.
      await store.gc();
      expect(leftovers()).toBe(0);
    }
  });
});
