/** Several processes on one cache: two compiling the same model at once both succeed and leave one entry;
 *  a writer killed at random points leaves the cache readable and never serves a damaged entry. */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc } from '@fast-check/vitest';
import { CacheStore } from '../src/cache/store.js';
import { compileModelWithCache } from '../src/cache/model.js';
import { killTestBlobs, killTestKey } from './support/cache-child.js';
import { fixtureAnalyzed, fixtureInputs } from './support/cache-fixtures.js';
import { temporaryCache } from './support/cache.js';
import { repoRoot } from './support/safetensors.js';

const child = join(repoRoot, 'test', 'support', 'cache-child.ts');

const runChild = (args: string[], killAfterMs?: number): Promise<{ code: number | null; killed: boolean; stdout: string; ms: number }> =>
  new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, ['--import', 'tsx', child, ...args], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    let started = 0;
    proc.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      if (started === 0 && stdout.includes('writing')) {
        started = performance.now();
        if (killAfterMs !== undefined) setTimeout(() => proc.kill('SIGKILL'), killAfterMs);
      }
    });
    proc.on('error', reject);
    proc.on('exit', (code, signal) => resolve({ code, killed: signal === 'SIGKILL', stdout, ms: performance.now() - started }));
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
  it('leaves the cache readable; a lookup finds the complete entry or a miss, never a damaged one', async () => {
    using dir = temporaryCache();
    const store = new CacheStore({ root: dir.path });
    const full = await runChild(['insert', join(dir.path, 'calibration')]);
    expect(full.code).toBe(0);
    const want = killTestBlobs();
    const delays = [Math.round(full.ms / 2), ...fc.sample(fc.integer({ min: 0, max: Math.max(1, Math.ceil(full.ms * 1.2)) }), { numRuns: 4 })];
    let leftovers = 0;
    let hits = 0;
    let runs = 0;
    // Random kill points first; then, if none of them happened to land mid-write (the machine's load moves
    // the write window), search for one by bisection between a kill that came too early and one too late.
    let early = 0;
    let late = Math.max(1, Math.ceil(full.ms * 1.2));
    const nextDelay = (i: number): number | undefined => {
      if (i < delays.length) return delays[i];
      if (leftovers > 0 || i >= delays.length + 10) return undefined;
      return Math.round((early + late) / 2);
    };
    for (let i = 0, delay = nextDelay(0); delay !== undefined; i++, delay = nextDelay(i)) {
      runs++;
      const run = await runChild(['insert', dir.path], delay);
      const left = existsSync(store.tmpDir) ? readdirSync(store.tmpDir).length : 0;
      leftovers += left;
      for (const e of await store.ls()) expect(e.status).toBe('ok');
      const r = await store.get(killTestKey);
      if (!run.killed) expect(r._tag).toBe('hit');
      // Too late: the entry was complete; too early: nothing was written yet.
      if (r._tag === 'hit') late = Math.min(late, delay);
      else if (left === 0) early = Math.max(early, delay);
      if (r._tag === 'hit') {
        hits++;
        expect(r.entry.blobs.size).toBe(want.length);
        for (const b of want) expect(Buffer.from(r.entry.blobs.get(b.name)!).equals(Buffer.from(b.data))).toBe(true);
        await store.remove(killTestKey.digest);
      }
      // gc clears what the killed writer left.
      await store.gc();
      expect(existsSync(store.tmpDir) ? readdirSync(store.tmpDir).length : 0).toBe(0);
    }
    // Some kill landed mid-write (a staging directory was left), so the interesting case ran.
    expect(leftovers).toBeGreaterThan(0);
    expect(hits).toBeLessThan(runs + 1);
  });
});
