/**
 * Compile with a cache: hash, look up, and either load-and-refit the entry (hit) or build and insert
 * (miss). The steps are functions, so the same driver serves the native engines here (nativeEngineSteps)
 * and the full compile pipeline once it plugs its own build and load in.
 *
 * A hit whose payload the loader refuses (an engine file of another version, a refit that fails) is
 * treated like a damaged entry: removed, rebuilt and inserted again; never served.
 */
import * as TE from 'fp-ts/lib/TaskEither.js';
import type { CacheKey } from './key.js';
import type { Blob, CacheEntry, CacheStore, Lookup, MissReason } from './store.js';

export interface CompileSteps<T> {
  /** Hash the model's structure (cheap: shapes, not values). */
  readonly key: () => CacheKey | Promise<CacheKey>;
  /** Build from scratch; the blobs are what a later hit needs to skip the build. */
  readonly build: () => Promise<{ readonly value: T; readonly blobs: readonly Blob[] }>;
  /** Turn a verified entry into the value (load stripped engines, refit them with the current weights). */
  readonly load: (entry: CacheEntry) => Promise<T>;
  /** The key's lookup when the caller already made it (default: the store's get). */
  readonly lookup?: (key: CacheKey) => Lookup | Promise<Lookup>;
}

export interface CompileTimings {
  readonly hashMs: number;
  readonly lookupMs: number;
  readonly loadMs?: number;
  readonly buildMs?: number;
  readonly insertMs?: number;
  readonly totalMs: number;
}

export interface CompileResult<T> {
  readonly value: T;
  /** 'off': no cache was given. */
  readonly cache: 'hit' | 'miss' | 'off';
  readonly key?: CacheKey;
  /** Why a miss missed (absent, damaged, mismatch, or 'unloadable' when the loader refused the entry). */
  readonly missReason?: MissReason | 'unloadable';
  readonly detail?: string;
  readonly timings: CompileTimings;
}

export type CompileWithCacheErrorDetail = { readonly _tag: 'CompileStepFailed'; readonly step: 'key' | 'lookup' | 'build'; readonly error: unknown };

export class CompileWithCacheError extends Error {
  override readonly name = 'CompileWithCacheError';
  readonly _tag = 'CompileStepFailed' as const;
  constructor(readonly detail: CompileWithCacheErrorDetail) {
    super(`compile with cache: ${detail.step} failed: ${detail.error instanceof Error ? detail.error.message : String(detail.error)}`);
  }
}

const ms = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e6;

/** Runs the steps against `cache` (undefined: no cache, always build). Rejects with the build's own
 *  error when the build fails; a failing insert does not fail the compile (the value is returned). */
export const compileWithCache = <T>(cache: CacheStore | undefined, steps: CompileSteps<T>): Promise<CompileResult<T>> =>
  compileWithCacheTE(cache, steps)().then((r) => {
    if (r._tag === 'Left') throw r.left.error instanceof Error && r.left.step === 'build' ? r.left.error : new CompileWithCacheError(r.left);
    return r.right;
  });

const stepFailed = (step: CompileWithCacheErrorDetail['step']) => (error: unknown): CompileWithCacheErrorDetail => ({ _tag: 'CompileStepFailed', step, error });

const attempt = async <A>(step: CompileWithCacheErrorDetail['step'], fn: () => A | Promise<A>): Promise<A> => {
  try {
    return await fn();
  } catch (e) {
    throw stepFailed(step)(e);
  }
};

const compileWithCacheRaw = async <T>(cache: CacheStore | undefined, steps: CompileSteps<T>): Promise<CompileResult<T>> => {
  const start = process.hrtime.bigint();
  if (cache === undefined) {
    const t0 = process.hrtime.bigint();
    const built = await attempt('build', steps.build);
    return { value: built.value, cache: 'off', timings: { hashMs: 0, lookupMs: 0, buildMs: ms(t0), totalMs: ms(start) } };
  }
  let t0 = process.hrtime.bigint();
  const key = await attempt('key', steps.key);
  const hashMs = ms(t0);
  t0 = process.hrtime.bigint();
  const lookup = await attempt('lookup', () => (steps.lookup !== undefined ? steps.lookup(key) : cache.get(key)));
  const lookupMs = ms(t0);
  let missReason: CompileResult<T>['missReason'];
  let detail: string | undefined;
  if (lookup._tag === 'hit') {
    t0 = process.hrtime.bigint();
    try {
      const value = await steps.load(lookup.entry);
      return { value, cache: 'hit', key, timings: { hashMs, lookupMs, loadMs: ms(t0), totalMs: ms(start) } };
    } catch (e) {
      await cache.remove(key.digest).catch(() => false);
      missReason = 'unloadable';
      detail = e instanceof Error ? e.message : String(e);
    }
  } else {
    missReason = lookup.reason;
    detail = lookup.detail;
  }
  t0 = process.hrtime.bigint();
  const built = await attempt('build', steps.build);
  const buildMs = ms(t0);
  t0 = process.hrtime.bigint();
  try {
    await cache.put(key, built.blobs);
  } catch (e) {
    detail = `${detail ?? ''}${detail ? '; ' : ''}insert failed: ${e instanceof Error ? e.message : String(e)}`;
  }
  const insertMs = ms(t0);
  return { value: built.value, cache: 'miss', key, missReason, ...(detail !== undefined ? { detail } : {}), timings: { hashMs, lookupMs, buildMs, insertMs, totalMs: ms(start) } };
};

export const compileWithCacheTE = <T>(cache: CacheStore | undefined, steps: CompileSteps<T>): TE.TaskEither<CompileWithCacheErrorDetail, CompileResult<T>> =>
  TE.tryCatch(() => compileWithCacheRaw(cache, steps), (e) => (typeof e === 'object' && e !== null && (e as { _tag?: unknown })._tag === 'CompileStepFailed' ? (e as CompileWithCacheErrorDetail) : stepFailed('build')(e)));

