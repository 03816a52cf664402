/**
 * The engine cache's directory store: one entry per key, each a directory holding a manifest and the
 * caller's payload as opaque named blobs (stripped engines, the weight map JSON, ...).
 *
 *   <root>/v1/entries/<digest>/manifest.json     io-ts-decoded: key parts in clear, sizes, checksums,
 *   <root>/v1/entries/<digest>/blobs/<name>      created, lastUsed
 *   <root>/v1/tmp/<digest>.<pid>.<random>/       entries being written
 *   <root>/v1/trash/<digest>.<pid>.<random>/     entries being removed
 *
 * Writing: every file of an entry is written and fsynced in a fresh temporary directory, which is then
 * renamed to its final name in one step. rename(2) refuses to replace a non-empty directory, so when
 * two processes insert the same key at once one rename wins and the other finds the entry there and
 * discards its copy: an entry directory is always complete. Removing renames the entry into trash/
 * first, so a reader sees the whole entry or none of it.
 *
 * Reading: a hit decodes the manifest, checks it names the requested key with the same parts, and reads
 * every blob checking its size and sha256. Anything else (no manifest, undecodable, another key, a
 * missing, short or altered blob) is a miss, and the entry is removed. Nothing in a damaged entry makes
 * a call throw.
 *
 * Eviction: least recently used first, under a byte budget (blob bytes plus manifest bytes). lastUsed
 * lives in the manifest and every hit rewrites it atomically (temporary file, fsync, rename), so hits
 * count even where directory times are not updated.
 */
import { createHash, randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { crashPoint } from '../crash-point.js';
import { homedir } from 'node:os';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import * as t from 'io-ts';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import { KeyPartsCodec, stableJson, type CacheKey, type KeyParts } from './key.js';

export const CACHE_ENV = 'TRT_REFIT_CACHE';
const LAYOUT = 'v1';
const MANIFEST = 'manifest.json';

export interface Blob {
  readonly name: string;
  readonly data: Uint8Array;
}

export interface BlobInfo {
  readonly name: string;
  readonly bytes: number;
  readonly sha256: string;
}

export interface Manifest {
  readonly format: 'trt-refit-cache-entry';
  readonly version: 1;
  readonly key: string;
  readonly parts: KeyParts;
  readonly blobs: readonly BlobInfo[];
  /** Sum of the blobs' bytes. */
  readonly payloadBytes: number;
  /** Milliseconds since the epoch. */
  readonly created: number;
  readonly lastUsed: number;
}

export const ManifestCodec: t.Type<Manifest> = t.type({
  format: t.literal('trt-refit-cache-entry'),
  version: t.literal(1),
  key: t.string,
  parts: KeyPartsCodec,
  blobs: t.readonlyArray(t.type({ name: t.string, bytes: t.number, sha256: t.string })),
  payloadBytes: t.number,
  created: t.number,
  lastUsed: t.number,
}) as unknown as t.Type<Manifest>;

export interface CacheEntry {
  readonly key: string;
  readonly manifest: Manifest;
  readonly blobs: ReadonlyMap<string, Uint8Array>;
  /** Path of the entry's directory (blobs are under blobs/). */
  readonly path: string;
}

export type MissReason = 'absent' | 'damaged' | 'mismatch';
export type Lookup = { readonly _tag: 'hit'; readonly entry: CacheEntry } | { readonly _tag: 'miss'; readonly reason: MissReason; readonly detail?: string };

export type CacheErrorDetail =
  | { readonly _tag: 'CacheIoError'; readonly op: string; readonly path: string; readonly reason: string }
  | { readonly _tag: 'InvalidBlobName'; readonly name: string; readonly reason: string }
  | { readonly _tag: 'InvalidKey'; readonly key: string };

export class CacheError extends Error {
  override readonly name = 'CacheError';
  readonly _tag: CacheErrorDetail['_tag'];
  constructor(readonly detail: CacheErrorDetail) {
    super(
      detail._tag === 'CacheIoError'
        ? `cache: cannot ${detail.op} ${detail.path}: ${detail.reason}`
        : detail._tag === 'InvalidBlobName'
          ? `cache: blob name '${detail.name}' ${detail.reason}`
          : `cache: '${detail.key}' is not a key digest (expected 64 hex digits)`,
    );
    this._tag = detail._tag;
  }
}

export interface StoreOptions {
  readonly root: string;
  /** Byte budget: put and gc evict least recently used entries until the total fits. */
  readonly maxBytes?: number;
  /** Milliseconds since the epoch (tests pass a counter). */
  readonly now?: () => number;
}

/** Where the cache lives: the option, then $TRT_REFIT_CACHE, then $XDG_CACHE_HOME/trt-refit, then
 *  ~/.cache/trt-refit. */
export const defaultCacheDir = (env: Readonly<Record<string, string | undefined>> = process.env, home: string = homedir()): string => {
  const fromEnv = env[CACHE_ENV];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  const xdg = env.XDG_CACHE_HOME;
  return xdg !== undefined && xdg !== '' ? join(xdg, 'trt-refit') : join(home, '.cache', 'trt-refit');
};

const DIGEST = /^[0-9a-f]{64}$/;
const BLOB_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

export const checkBlobName = (name: string): CacheErrorDetail | undefined =>
  BLOB_NAME.test(name) ? undefined : { _tag: 'InvalidBlobName', name, reason: 'must be 1 to 128 of A-Z a-z 0-9 . _ - and not start with . or -' };

const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');
const errno = (e: unknown): string => (e as NodeJS.ErrnoException)?.code ?? '';
const message = (e: unknown): string => (e instanceof Error ? e.message : String(e));
const token = (): string => `${process.pid}.${randomBytes(6).toString('hex')}`;

const io = (op: string, path: string) => (e: unknown): CacheErrorDetail => ({ _tag: 'CacheIoError', op, path, reason: message(e) });

const writeFileSynced = async (path: string, data: Uint8Array): Promise<void> => {
  const handle = await open(path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o644);
  try {
    let offset = 0;
    while (offset < data.byteLength) {
      const { bytesWritten } = await handle.write(data, offset, data.byteLength - offset);
      offset += bytesWritten;
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
};

const syncDirectory = async (path: string): Promise<void> => {
  try {
    const handle = await open(path, fsConstants.O_RDONLY);
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  } catch {
    // Some file systems refuse fsync on directories; the rename is still atomic there.
  }
};

const isAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return errno(e) === 'EPERM';
  }
};

export interface EntrySummary {
  readonly key: string;
  readonly status: 'ok' | 'damaged';
  readonly bytes: number;
  readonly created?: number;
  readonly lastUsed?: number;
  readonly parts?: KeyParts;
  readonly blobs?: readonly BlobInfo[];
  readonly detail?: string;
}

export interface VerifyReport {
  readonly ok: readonly string[];
  readonly removed: ReadonlyArray<{ readonly key: string; readonly detail: string }>;
}

export interface GcReport {
  readonly evicted: readonly string[];
  readonly removedDamaged: readonly string[];
  readonly removedTemporaries: number;
  readonly bytesBefore: number;
  readonly bytesAfter: number;
}

/** The store as functions over its options. Every operation is safe to run from several processes. */
export class CacheStore {
  readonly root: string;
  readonly maxBytes: number | undefined;
  readonly #now: () => number;

  constructor(options: StoreOptions) {
    this.root = options.root;
    this.maxBytes = options.maxBytes;
    this.#now = options.now ?? Date.now;
  }

  get entriesDir(): string {
    return join(this.root, LAYOUT, 'entries');
  }
  get tmpDir(): string {
    return join(this.root, LAYOUT, 'tmp');
  }
  get trashDir(): string {
    return join(this.root, LAYOUT, 'trash');
  }
  entryDir(digest: string): string {
    return join(this.entriesDir, digest);
  }

  // ---- TaskEither forms --------------------------------------------------------------------------

  getTE(key: CacheKey | string, parts?: KeyParts): TE.TaskEither<CacheErrorDetail, Lookup> {
    return () => this.#get(key, parts);
  }
  putTE(key: CacheKey, blobs: readonly Blob[]): TE.TaskEither<CacheErrorDetail, PutResult> {
    return () => this.#put(key, blobs);
  }
  lsTE(): TE.TaskEither<CacheErrorDetail, EntrySummary[]> {
    return () => this.#ls();
  }
  verifyTE(): TE.TaskEither<CacheErrorDetail, VerifyReport> {
    return () => this.#verify();
  }
  gcTE(maxBytes?: number): TE.TaskEither<CacheErrorDetail, GcReport> {
    return () => this.#gc(maxBytes ?? this.maxBytes);
  }
  clearTE(): TE.TaskEither<CacheErrorDetail, { removed: number }> {
    return () => this.#clear();
  }
  removeTE(key: string): TE.TaskEither<CacheErrorDetail, boolean> {
    return async () => E.right(await this.#remove(key));
  }

  // ---- Promise forms (reject with CacheError) ----------------------------------------------------

  /** A verified entry, or a miss (a damaged or mismatched entry is removed). With a CacheKey (or
   *  `parts`), the manifest's key parts must equal it. */
  get(key: CacheKey | string, parts?: KeyParts): Promise<Lookup> {
    return run(this.getTE(key, parts));
  }
  /** Inserts an entry (or finds the same key inserted meanwhile); then evicts down to the budget. */
  put(key: CacheKey, blobs: readonly Blob[]): Promise<PutResult> {
    return run(this.putTE(key, blobs));
  }
  ls(): Promise<EntrySummary[]> {
    return run(this.lsTE());
  }
  /** Reads every entry in full; removes the damaged ones. */
  verify(): Promise<VerifyReport> {
    return run(this.verifyTE());
  }
  /** Removes leftovers of killed writers and damaged entries, then evicts least recently used entries
   *  until the total is at most `maxBytes` (default: the store's budget; none: no eviction). */
  gc(maxBytes?: number): Promise<GcReport> {
    return run(this.gcTE(maxBytes));
  }
  clear(): Promise<{ removed: number }> {
    return run(this.clearTE());
  }
  remove(key: string): Promise<boolean> {
    return run(this.removeTE(key));
  }

  // ---- implementation ----------------------------------------------------------------------------

  async #readManifest(digest: string): Promise<E.Either<{ reason: MissReason; detail: string }, Manifest>> {
    let text: string;
    try {
      text = await readFile(join(this.entryDir(digest), MANIFEST), 'utf8');
    } catch (e) {
      if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') {
        // A directory without a manifest is damaged; no directory is a plain miss.
        try {
          await stat(this.entryDir(digest));
          return E.left({ reason: 'damaged', detail: 'no manifest' });
        } catch {
          return E.left({ reason: 'absent', detail: 'no entry' });
        }
      }
      return E.left({ reason: 'damaged', detail: `manifest unreadable: ${message(e)}` });
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (e) {
      return E.left({ reason: 'damaged', detail: `manifest is not JSON: ${message(e)}` });
    }
    const decoded = ManifestCodec.decode(json);
    if (E.isLeft(decoded)) return E.left({ reason: 'damaged', detail: `manifest: ${PathReporter.report(decoded).slice(0, 2).join('; ')}` });
    const m = decoded.right;
    if (m.key !== digest) return E.left({ reason: 'mismatch', detail: `manifest names key ${m.key.slice(0, 12)}, directory ${digest.slice(0, 12)}` });
    const names = new Set<string>();
    for (const b of m.blobs) {
      if (checkBlobName(b.name) !== undefined || names.has(b.name)) return E.left({ reason: 'damaged', detail: `manifest lists a bad or repeated blob name '${b.name}'` });
      names.add(b.name);
    }
    if (m.payloadBytes !== m.blobs.reduce((s, b) => s + b.bytes, 0)) return E.left({ reason: 'damaged', detail: 'manifest byte total does not match its blobs' });
    return E.right(m);
  }

  /** Reads and checks every blob of a decoded manifest. */
  async #readBlobs(digest: string, m: Manifest): Promise<E.Either<string, Map<string, Uint8Array>>> {
    const out = new Map<string, Uint8Array>();
    for (const b of m.blobs) {
      let data: Uint8Array;
      try {
        data = new Uint8Array(await readFile(join(this.entryDir(digest), 'blobs', b.name)));
      } catch (e) {
        return E.left(`blob '${b.name}' unreadable: ${errno(e) || message(e)}`);
      }
      if (data.byteLength !== b.bytes) return E.left(`blob '${b.name}' has ${data.byteLength} bytes, manifest says ${b.bytes}`);
      if (sha256(data) !== b.sha256) return E.left(`blob '${b.name}' fails its sha256 check`);
      out.set(b.name, data);
    }
    return E.right(out);
  }

  async #get(key: CacheKey | string, parts?: KeyParts): Promise<E.Either<CacheErrorDetail, Lookup>> {
    const digest = typeof key === 'string' ? key : key.digest;
    const wanted = typeof key === 'string' ? parts : key.parts;
    if (!DIGEST.test(digest)) return E.left({ _tag: 'InvalidKey', key: digest });
    const m = await this.#readManifest(digest);
    if (E.isLeft(m)) {
      if (m.left.reason !== 'absent') await this.#remove(digest);
      return E.right({ _tag: 'miss', reason: m.left.reason, detail: m.left.detail });
    }
    if (wanted !== undefined && stableJson(m.right.parts) !== stableJson(wanted)) {
      await this.#remove(digest);
      return E.right({ _tag: 'miss', reason: 'mismatch', detail: 'the entry was stored under other key parts' });
    }
    const blobs = await this.#readBlobs(digest, m.right);
    if (E.isLeft(blobs)) {
      await this.#remove(digest);
      return E.right({ _tag: 'miss', reason: 'damaged', detail: blobs.left });
    }
    const manifest = await this.#touch(digest, m.right);
    return E.right({ _tag: 'hit', entry: { key: digest, manifest, blobs: blobs.right, path: this.entryDir(digest) } });
  }

  /** Rewrites the manifest with lastUsed = now (atomically). A failure (the entry was evicted meanwhile)
   *  is not an error: the hit already has its bytes. */
  async #touch(digest: string, m: Manifest): Promise<Manifest> {
    const updated: Manifest = { ...m, lastUsed: Math.max(this.#now(), m.lastUsed) };
    const dir = this.entryDir(digest);
    const tmp = join(dir, `${MANIFEST}.tmp-${token()}`);
    try {
      await writeFileSynced(tmp, new TextEncoder().encode(JSON.stringify(updated)));
      await rename(tmp, join(dir, MANIFEST));
    } catch {
      await rm(tmp, { force: true }).catch(() => undefined);
    }
    return updated;
  }

  async #put(key: CacheKey, blobs: readonly Blob[]): Promise<E.Either<CacheErrorDetail, PutResult>> {
    if (!DIGEST.test(key.digest)) return E.left({ _tag: 'InvalidKey', key: key.digest });
    const names = new Set<string>();
    for (const b of blobs) {
      const bad = checkBlobName(b.name);
      if (bad !== undefined) return E.left(bad);
      if (names.has(b.name)) return E.left({ _tag: 'InvalidBlobName', name: b.name, reason: 'is given twice' });
      names.add(b.name);
    }
    const staging = join(this.tmpDir, `${key.digest}.${token()}`);
    const now = this.#now();
    const manifest: Manifest = {
      format: 'trt-refit-cache-entry',
      version: 1,
      key: key.digest,
      parts: key.parts,
      blobs: blobs.map((b) => ({ name: b.name, bytes: b.data.byteLength, sha256: sha256(b.data) })),
      payloadBytes: blobs.reduce((s, b) => s + b.data.byteLength, 0),
      created: now,
      lastUsed: now,
    };
    try {
      await mkdir(join(staging, 'blobs'), { recursive: true });
      await mkdir(this.entriesDir, { recursive: true });
      for (const b of blobs) {
        await writeFileSynced(join(staging, 'blobs', b.name), b.data);
        crashPoint('cache.put.blob');
      }
      await syncDirectory(join(staging, 'blobs'));
      await writeFileSynced(join(staging, MANIFEST), new TextEncoder().encode(JSON.stringify(manifest)));
      await syncDirectory(staging);
      crashPoint('cache.put.staged');
    } catch (e) {
      await rm(staging, { recursive: true, force: true }).catch(() => undefined);
      return E.left(io('write', staging)(e));
    }
    let outcome: PutResult['outcome'] = 'inserted';
    for (let attempt = 0; ; attempt++) {
      try {
        await rename(staging, this.entryDir(key.digest));
        crashPoint('cache.put.renamed');
        await syncDirectory(this.entriesDir);
        break;
      } catch (e) {
        const code = errno(e);
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST' && code !== 'EISDIR') {
          await rm(staging, { recursive: true, force: true }).catch(() => undefined);
          return E.left(io('rename into', this.entryDir(key.digest))(e));
        }
        // Another process inserted this key first. Keep theirs if it is sound, else replace it.
        const theirs = await this.#get(key);
        if (E.isRight(theirs) && theirs.right._tag === 'hit') {
          outcome = 'existing';
          await rm(staging, { recursive: true, force: true }).catch(() => undefined);
          break;
        }
        if (attempt >= 3) {
          await rm(staging, { recursive: true, force: true }).catch(() => undefined);
          return E.left(io('rename into', this.entryDir(key.digest))(e));
        }
      }
    }
    let evicted: string[] = [];
    if (this.maxBytes !== undefined) {
      const gc = await this.#gc(this.maxBytes);
      if (E.isRight(gc)) evicted = [...gc.right.evicted];
    }
    return E.right({ outcome, evicted, key: key.digest, payloadBytes: manifest.payloadBytes });
  }

  /** Moves an entry to trash (atomic), then deletes it. False when there was none. */
  async #remove(digest: string): Promise<boolean> {
    const target = join(this.trashDir, `${digest}.${token()}`);
    try {
      await mkdir(this.trashDir, { recursive: true });
      await rename(this.entryDir(digest), target);
    } catch {
      return false;
    }
    await rm(target, { recursive: true, force: true }).catch(() => undefined);
    return true;
  }

  async #entryNames(): Promise<string[]> {
    try {
      return (await readdir(this.entriesDir)).filter((n) => DIGEST.test(n)).sort();
    } catch {
      return [];
    }
  }

  async #sizeOnDisk(digest: string, m: Manifest): Promise<number> {
    try {
      return m.payloadBytes + (await stat(join(this.entryDir(digest), MANIFEST))).size;
    } catch {
      return m.payloadBytes;
    }
  }

  async #ls(): Promise<E.Either<CacheErrorDetail, EntrySummary[]>> {
    const out: EntrySummary[] = [];
    for (const digest of await this.#entryNames()) {
      const m = await this.#readManifest(digest);
      if (E.isLeft(m)) {
        if (m.left.reason !== 'absent') out.push({ key: digest, status: 'damaged', bytes: 0, detail: m.left.detail });
        continue;
      }
      out.push({ key: digest, status: 'ok', bytes: await this.#sizeOnDisk(digest, m.right), created: m.right.created, lastUsed: m.right.lastUsed, parts: m.right.parts, blobs: m.right.blobs });
    }
    return E.right(out);
  }

  async #verify(): Promise<E.Either<CacheErrorDetail, VerifyReport>> {
    const ok: string[] = [];
    const removed: Array<{ key: string; detail: string }> = [];
    for (const digest of await this.#entryNames()) {
      const m = await this.#readManifest(digest);
      let problem: string | undefined;
      if (E.isLeft(m)) problem = m.left.reason === 'absent' ? undefined : m.left.detail;
      else {
        const blobs = await this.#readBlobs(digest, m.right);
        if (E.isLeft(blobs)) problem = blobs.left;
        else ok.push(digest);
      }
      if (problem !== undefined && (await this.#remove(digest))) removed.push({ key: digest, detail: problem });
    }
    return E.right({ ok, removed });
  }

  /** Temporaries of writers that died (their process is gone) and leftovers in trash. */
  async #sweepTemporaries(): Promise<number> {
    let removed = 0;
    const sweep = async (dir: string, always: boolean) => {
      let names: string[] = [];
      try {
        names = await readdir(dir);
      } catch {
        return;
      }
      for (const name of names) {
        const pid = Number(name.split('.')[1]);
        if (always || !Number.isInteger(pid) || !isAlive(pid)) {
          await rm(join(dir, name), { recursive: true, force: true }).catch(() => undefined);
          removed++;
        }
      }
    };
    await sweep(this.tmpDir, false);
    await sweep(this.trashDir, false);
    // Stray manifest temporaries inside entries (a process killed while recording a hit).
    for (const digest of await this.#entryNames()) {
      let names: string[] = [];
      try {
        names = await readdir(this.entryDir(digest));
      } catch {
        continue;
      }
      for (const name of names) {
        if (!name.startsWith(`${MANIFEST}.tmp-`)) continue;
        const pid = Number(name.slice(`${MANIFEST}.tmp-`.length).split('.')[0]);
        if (!isAlive(pid)) {
          await rm(join(this.entryDir(digest), name), { force: true }).catch(() => undefined);
          removed++;
        }
      }
    }
    return removed;
  }

  async #gc(maxBytes: number | undefined): Promise<E.Either<CacheErrorDetail, GcReport>> {
    const removedTemporaries = await this.#sweepTemporaries();
    const removedDamaged: string[] = [];
    const live: Array<{ key: string; bytes: number; lastUsed: number; created: number }> = [];
    for (const digest of await this.#entryNames()) {
      const m = await this.#readManifest(digest);
      if (E.isLeft(m)) {
        if (m.left.reason !== 'absent' && (await this.#remove(digest))) removedDamaged.push(digest);
        continue;
      }
      live.push({ key: digest, bytes: await this.#sizeOnDisk(digest, m.right), lastUsed: m.right.lastUsed, created: m.right.created });
    }
    const bytesBefore = live.reduce((s, e) => s + e.bytes, 0);
    let bytesAfter = bytesBefore;
    const evicted: string[] = [];
    if (maxBytes !== undefined) {
      live.sort((a, b) => a.lastUsed - b.lastUsed || a.created - b.created || (a.key < b.key ? -1 : 1));
      for (const e of live) {
        if (bytesAfter <= maxBytes) break;
        if (await this.#remove(e.key)) evicted.push(e.key);
        bytesAfter -= e.bytes;
      }
    }
    return E.right({ evicted, removedDamaged, removedTemporaries, bytesBefore, bytesAfter });
  }

  async #clear(): Promise<E.Either<CacheErrorDetail, { removed: number }>> {
    let removed = 0;
    for (const digest of await this.#entryNames()) if (await this.#remove(digest)) removed++;
    await this.#sweepTemporaries();
    return E.right({ removed });
  }
}

export interface PutResult {
  /** 'existing': the same key was inserted by another writer first; this one's copy was discarded. */
  readonly outcome: 'inserted' | 'existing';
  readonly key: string;
  readonly payloadBytes: number;
  /** Entries evicted to stay under the budget (may include this one, if it alone exceeds it). */
  readonly evicted: readonly string[];
}

const run = async <A>(te: TE.TaskEither<CacheErrorDetail, A>): Promise<A> => {
  const r = await te();
  if (E.isLeft(r)) throw new CacheError(r.left);
  return r.right;
};

export const openCache = (options: Partial<StoreOptions> = {}): CacheStore => new CacheStore({ ...options, root: options.root ?? defaultCacheDir() });
