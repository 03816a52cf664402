/** The directory store against a simple model (fc.commands): insert, hit, miss, evict, corrupt and
 *  concurrent insert. The cache never returns a wrong or damaged entry and never exceeds its budget
 *  after gc; eviction is least recently used, by the lastUsed every hit records. */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { CacheError, CacheStore, defaultCacheDir, type Blob } from '../src/cache/store.js';
import type { CacheKey, KeyParts } from '../src/cache/key.js';
import { temporaryCache } from './support/cache.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);

const partsFor = (i: number): KeyParts => ({
  format: 1,
  segments: [{ kind: 'engine', digest: `segment-${i}`, layers: i + 1, weights: i }],
  wiring: 'w',
  build: { refittable: 1 },
  backend: { name: 'test', version: '1', abi: 1 },
  device: { kind: 'cpu', model: `cpu-${i}`, features: [] },
});
const keyFor = (i: number): CacheKey => ({ digest: createHash('sha256').update(`key-${i}`).digest('hex'), parts: partsFor(i), names: [] });
const KEYS = 3;

/** A payload that names its key and version, so a wrong entry cannot pass for the right one. */
const payload = (i: number, version: number, size: number): Blob[] => {
  const head = new TextEncoder().encode(`${keyFor(i).digest}:${version}:`);
  const body = new Uint8Array(head.byteLength + size);
  body.set(head);
  for (let j = 0; j < size; j++) body[head.byteLength + j] = (i * 31 + version * 7 + j) & 0xff;
  return [
    { name: 'engine-0.plan', data: body },
    { name: 'bindings.json', data: new TextEncoder().encode(JSON.stringify({ key: i, version })) },
  ];
};

type Damage = 'flip' | 'truncate' | 'deleteBlob' | 'garbleManifest' | 'foreignManifest' | 'partsMismatch' | 'deleteManifest';
interface ModelEntry {
  version: number;
  size: number;
  lastUsed: number;
  /** blob: found by get and verify; parts (stored under other key parts): found by get only;
   *  manifest: found by get, verify and gc. */
  damaged?: 'blob' | 'parts' | 'manifest';
}
interface Model {
  entries: Map<number, ModelEntry>;
  clock: number;
  nextVersion: number;
}
interface Real {
  store: CacheStore;
}

const use = (m: Model, i: number) => {
  m.entries.get(i)!.lastUsed = ++m.clock;
};

const expectPayload = (blobs: ReadonlyMap<string, Uint8Array>, i: number, e: ModelEntry) => {
  const want = payload(i, e.version, e.size);
  expect(blobs.size).toBe(want.length);
  for (const b of want) expect(Buffer.from(blobs.get(b.name)!).equals(Buffer.from(b.data))).toBe(true);
};

class Put implements fc.AsyncCommand<Model, Real> {
  constructor(readonly key: number, readonly size: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    const version = m.nextVersion++;
    const result = await r.store.put(keyFor(this.key), payload(this.key, version, this.size));
    const existing = m.entries.get(this.key);
    if (existing !== undefined && existing.damaged === undefined) {
      expect(result.outcome).toBe('existing');
      use(m, this.key);
    } else {
      expect(result.outcome).toBe('inserted');
      m.entries.set(this.key, { version, size: this.size, lastUsed: 0 });
      use(m, this.key);
    }
  }
  toString = () => `put(${this.key}, ${this.size})`;
}

class ConcurrentPut implements fc.AsyncCommand<Model, Real> {
  constructor(readonly key: number, readonly size: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    const v1 = m.nextVersion++;
    const v2 = m.nextVersion++;
    const results = await Promise.all([r.store.put(keyFor(this.key), payload(this.key, v1, this.size)), r.store.put(keyFor(this.key), payload(this.key, v2, this.size))]);
    const existing = m.entries.get(this.key);
    const hit = await r.store.get(keyFor(this.key));
    expect(hit._tag).toBe('hit');
    if (hit._tag !== 'hit') return;
    if (existing !== undefined && existing.damaged === undefined) {
      expect(results.map((x) => x.outcome)).toEqual(['existing', 'existing']);
      expectPayload(hit.entry.blobs, this.key, existing);
    } else {
      // One of the two wins; the entry is exactly one of them.
      expect(results.filter((x) => x.outcome === 'inserted').length).toBeGreaterThanOrEqual(1);
      const text = new TextDecoder().decode(hit.entry.blobs.get('bindings.json'));
      const version = JSON.parse(text).version as number;
      expect([v1, v2]).toContain(version);
      m.entries.set(this.key, { version, size: this.size, lastUsed: 0 });
      expectPayload(hit.entry.blobs, this.key, m.entries.get(this.key)!);
    }
    use(m, this.key);
  }
  toString = () => `concurrentPut(${this.key}, ${this.size})`;
}

class Get implements fc.AsyncCommand<Model, Real> {
  constructor(readonly key: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    const result = await r.store.get(keyFor(this.key));
    const e = m.entries.get(this.key);
    if (e === undefined) {
      expect(result).toEqual({ _tag: 'miss', reason: 'absent', detail: 'no entry' });
    } else if (e.damaged !== undefined) {
      expect(result._tag).toBe('miss');
      m.entries.delete(this.key);
    } else {
      expect(result._tag).toBe('hit');
      if (result._tag === 'hit') {
        expect(result.entry.key).toBe(keyFor(this.key).digest);
        expectPayload(result.entry.blobs, this.key, e);
      }
      use(m, this.key);
    }
  }
  toString = () => `get(${this.key})`;
}

class Corrupt implements fc.AsyncCommand<Model, Real> {
  constructor(readonly key: number, readonly damage: Damage) {}
  check = (m: Readonly<Model>) => m.entries.has(this.key) && m.entries.get(this.key)!.damaged === undefined;
  async run(m: Model, r: Real) {
    const dir = r.store.entryDir(keyFor(this.key).digest);
    const blob = join(dir, 'blobs', 'engine-0.plan');
    const manifest = join(dir, 'manifest.json');
    const e = m.entries.get(this.key)!;
    switch (this.damage) {
      case 'flip': {
        const bytes = readFileSync(blob);
        bytes[bytes.length >> 1] ^= 0x40;
        writeFileSync(blob, bytes);
        e.damaged = e.damaged === 'manifest' ? 'manifest' : 'blob';
        break;
      }
      case 'truncate':
        truncateSync(blob, Math.max(0, readFileSync(blob).length - 3));
        e.damaged = e.damaged === 'manifest' ? 'manifest' : 'blob';
        break;
      case 'deleteBlob':
        unlinkSync(blob);
        e.damaged = e.damaged === 'manifest' ? 'manifest' : 'blob';
        break;
      case 'partsMismatch': {
        const json = JSON.parse(readFileSync(manifest, 'utf8'));
        writeFileSync(manifest, JSON.stringify({ ...json, parts: partsFor(this.key + 100) }));
        e.damaged ??= 'parts';
        break;
      }
      case 'garbleManifest':
        writeFileSync(manifest, readFileSync(manifest, 'utf8').slice(0, 40));
        e.damaged = 'manifest';
        break;
      case 'deleteManifest':
        unlinkSync(manifest);
        e.damaged = 'manifest';
        break;
      case 'foreignManifest': {
        const json = JSON.parse(readFileSync(manifest, 'utf8'));
        writeFileSync(manifest, JSON.stringify({ ...json, key: keyFor(this.key + 1).digest }));
        e.damaged = 'manifest';
        break;
      }
    }
  }
  toString = () => `corrupt(${this.key}, ${this.damage})`;
}

class Gc implements fc.AsyncCommand<Model, Real> {
  constructor(readonly budgetFraction: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    const listed = await r.store.ls();
    const sizes = new Map(listed.filter((x) => x.status === 'ok').map((x) => [x.key, x.bytes]));
    const total = [...sizes.values()].reduce((a, b) => a + b, 0);
    const budget = Math.floor(total * this.budgetFraction);
    const report = await r.store.gc(budget);
    // The model: manifest-damaged entries go; the rest are evicted least recently used first.
    for (const [i, e] of m.entries) if (e.damaged === 'manifest') m.entries.delete(i);
    let remaining = total;
    for (const [i] of [...m.entries].sort((a, b) => a[1].lastUsed - b[1].lastUsed)) {
      if (remaining <= budget) break;
      remaining -= sizes.get(keyFor(i).digest)!;
      m.entries.delete(i);
    }
    const after = await r.store.ls();
    expect(after.every((x) => x.status === 'ok')).toBe(true);
    expect(after.reduce((s, x) => s + x.bytes, 0)).toBeLessThanOrEqual(budget);
    expect(report.bytesAfter).toBeLessThanOrEqual(budget);
    expect(new Set(after.map((x) => x.key))).toEqual(new Set([...m.entries.keys()].map((i) => keyFor(i).digest)));
  }
  toString = () => `gc(${this.budgetFraction.toFixed(2)})`;
}

class Verify implements fc.AsyncCommand<Model, Real> {
  check = () => true;
  async run(m: Model, r: Real) {
    const report = await r.store.verify();
    for (const [i, e] of [...m.entries]) {
      const found = report.removed.some((x) => x.key === keyFor(i).digest);
      expect(found).toBe(e.damaged === 'blob' || e.damaged === 'manifest');
      if (found) m.entries.delete(i);
    }
    for (const key of report.ok) expect([...m.entries.keys()].map((i) => keyFor(i).digest)).toContain(key);
  }
  toString = () => 'verify';
}

class LeftoverTemporary implements fc.AsyncCommand<Model, Real> {
  constructor(readonly key: number) {}
  check = () => true;
  async run(_m: Model, r: Real) {
    // What a writer killed before its rename leaves: a staging directory of a process that is gone.
    const dir = join(r.store.tmpDir, `${keyFor(this.key).digest}.999999999.deadbeef`);
    mkdirSync(join(dir, 'blobs'), { recursive: true });
    writeFileSync(join(dir, 'blobs', 'engine-0.plan'), 'half');
  }
  toString = () => `leftover(${this.key})`;
}

const commands = [
  fc.tuple(fc.nat(KEYS - 1), fc.integer({ min: 0, max: 4000 })).map(([k, s]) => new Put(k, s)),
  fc.tuple(fc.nat(KEYS - 1), fc.integer({ min: 0, max: 4000 })).map(([k, s]) => new Put(k, s)),
  fc.tuple(fc.nat(KEYS - 1), fc.integer({ min: 0, max: 4000 })).map(([k, s]) => new ConcurrentPut(k, s)),
  fc.nat(KEYS - 1).map((k) => new Get(k)),
  fc.nat(KEYS - 1).map((k) => new Get(k)),
  fc.tuple(fc.nat(KEYS - 1), fc.constantFrom<Damage>('flip', 'truncate', 'deleteBlob', 'garbleManifest', 'foreignManifest', 'partsMismatch', 'deleteManifest')).map(([k, d]) => new Corrupt(k, d)),
  fc.tuple(fc.nat(KEYS - 1), fc.constantFrom<Damage>('flip', 'truncate', 'deleteBlob', 'garbleManifest', 'foreignManifest', 'partsMismatch', 'deleteManifest')).map(([k, d]) => new Corrupt(k, d)),
  fc.integer({ min: 0, max: 110 }).map((f) => new Gc(f / 100)),
  fc.constant(new Verify()),
  fc.nat(KEYS - 1).map((k) => new LeftoverTemporary(k)),
];

describe('the store against a model', () => {
  it('agrees on every sequence of commands', async () => {
    await fc.assert(
      fc.asyncProperty(fc.commands(commands, { maxCommands: 40, size: '+1' }), async (cmds) => {
        using dir = temporaryCache();
        let tick = 0;
        const store = new CacheStore({ root: dir.path, now: () => ++tick });
        await fc.asyncModelRun(() => ({ model: { entries: new Map(), clock: 0, nextVersion: 1 }, real: { store } }), cmds);
        // Nothing a killed writer left survives gc, and gc never breaks a good entry.
        await store.gc();
        expect(existsSync(store.tmpDir) ? readdirSync(store.tmpDir).length : 0).toBe(0);
      }),
      { numRuns: runs(40) },
    );
  });
});

describe('the store', () => {
  it('evicts least recently used entries on put when a budget is set; a hit counts as a use', async () => {
    using dir = temporaryCache();
    let tick = 0;
    const probe = new CacheStore({ root: join(dir.path, 'probe'), now: () => ++tick });
    await probe.put(keyFor(0), payload(0, 1, 1000));
    const one = (await probe.ls())[0].bytes;
    const store = new CacheStore({ root: join(dir.path, 'c'), maxBytes: 3 * one, now: () => ++tick });
    for (const i of [0, 1, 2]) await store.put(keyFor(i), payload(i, 1, 1000));
    expect((await store.get(keyFor(0)))._tag).toBe('hit'); // 0 is now the most recently used
    const result = await store.put(keyFor(3), payload(3, 1, 1000));
    expect(result.evicted).toEqual([keyFor(1).digest]);
    const keys = new Set((await store.ls()).map((e) => e.key));
    expect(keys).toEqual(new Set([0, 2, 3].map((i) => keyFor(i).digest)));
    // lastUsed is in the manifest (not the directory's time).
    const manifest = JSON.parse(readFileSync(join(store.entryDir(keyFor(0).digest), 'manifest.json'), 'utf8'));
    expect(manifest.lastUsed).toBeGreaterThan(manifest.created);
  });

  it('rejects bad blob names and keys with tagged errors, in both forms', async () => {
    using dir = temporaryCache();
    const store = new CacheStore({ root: dir.path });
    await expect(store.put(keyFor(0), [{ name: '../escape', data: new Uint8Array(1) }])).rejects.toMatchObject({ _tag: 'InvalidBlobName' });
    await expect(store.put(keyFor(0), [{ name: 'a', data: new Uint8Array(1) }, { name: 'a', data: new Uint8Array(1) }])).rejects.toBeInstanceOf(CacheError);
    await expect(store.get('not-a-digest')).rejects.toMatchObject({ _tag: 'InvalidKey' });
    const te = await store.getTE('zz')();
    expect(E.isLeft(te) && te.left._tag).toBe('InvalidKey');
    expect(await store.ls()).toEqual([]);
  });

  it('a manifest that decodes but lies about its blobs is a miss and is removed', async () => {
    using dir = temporaryCache();
    const store = new CacheStore({ root: dir.path });
    await store.put(keyFor(0), payload(0, 1, 100));
    const path = join(store.entryDir(keyFor(0).digest), 'manifest.json');
    const json = JSON.parse(readFileSync(path, 'utf8'));
    writeFileSync(path, JSON.stringify({ ...json, blobs: [...json.blobs, { name: 'missing.bin', bytes: 0, sha256: 'x' }] }));
    const r = await store.get(keyFor(0));
    expect(r._tag).toBe('miss');
    expect(await store.ls()).toEqual([]);
  });

  it('clear removes every entry', async () => {
    using dir = temporaryCache();
    const store = new CacheStore({ root: dir.path });
    for (const i of [0, 1]) await store.put(keyFor(i), payload(i, 1, 10));
    expect(await store.clear()).toEqual({ removed: 2 });
    expect(await store.ls()).toEqual([]);
  });

  it('finds its directory: $TRT_REFIT_CACHE, then $XDG_CACHE_HOME/trt-refit, then ~/.cache/trt-refit', () => {
    expect(defaultCacheDir({ TRT_REFIT_CACHE: '/x/c', XDG_CACHE_HOME: '/y' }, '/home/u')).toBe('/x/c');
    expect(defaultCacheDir({ XDG_CACHE_HOME: '/y' }, '/home/u')).toBe('/y/trt-refit');
    expect(defaultCacheDir({}, '/home/u')).toBe('/home/u/.cache/trt-refit');
  });
});
