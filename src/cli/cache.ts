/**
 * `trt-refit cache ls | verify | gc | clear`, and the cache options other commands share
 * (`--cache DIR`, `--no-cache`, $TRT_REFIT_CACHE).
 *
 * On by default for `compile`: an entry holds stripped engines (no weight bytes) and the weight map, so
 * it is small (kilobytes to a few megabytes), and a later compile of the same architecture skips the
 * build. The directory is $TRT_REFIT_CACHE, else $XDG_CACHE_HOME/trt-refit, else ~/.cache/trt-refit;
 * compile keeps it under DEFAULT_COMPILE_CACHE_BYTES, evicting least recently used entries.
 * `--no-cache` turns it off for one command.
 */
import { Command, Option } from 'commander';
import { CacheStore, defaultCacheDir, type EntrySummary } from '../cache/store.js';

/** The byte budget compile keeps the cache directory under (`cache gc --max-size` trims further). */
export const DEFAULT_COMPILE_CACHE_BYTES = 2 ** 30;

export type CacheSetting = { readonly enabled: false } | { readonly enabled: true; readonly dir: string };

/** Adds `--cache <dir>` and `--no-cache` to a command (compile, run). */
export const addCacheOptions = (command: Command): Command =>
  command
    .addOption(new Option('--cache <dir>', 'engine cache directory; the cache is on by default (default: $TRT_REFIT_CACHE, else $XDG_CACHE_HOME/trt-refit or ~/.cache/trt-refit)'))
    .addOption(new Option('--no-cache', 'build without the engine cache (neither read nor written)'));

/** What `--cache` / `--no-cache` (commander's `cache`: string, false or undefined) and the environment mean. */
export const resolveCacheSetting = (cache: string | boolean | undefined, env: Readonly<Record<string, string | undefined>> = process.env): CacheSetting =>
  cache === false ? { enabled: false } : { enabled: true, dir: typeof cache === 'string' ? cache : defaultCacheDir(env) };

/** The store for a setting (undefined when the cache is off). */
export const cacheStoreFor = (setting: CacheSetting, maxBytes?: number): CacheStore | undefined =>
  setting.enabled ? new CacheStore({ root: setting.dir, ...(maxBytes !== undefined ? { maxBytes } : {}) }) : undefined;

/** "10G", "512M", "1024" -> bytes. */
export const parseBytes = (text: string): number => {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(text.trim());
  if (m === null) throw Object.assign(new Error(`'${text}' is not a size (examples: 500M, 10G, 1048576)`), { _tag: 'InvalidSize' });
  const unit = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.floor(Number(m[1]) * unit);
};

const human = (bytes: number): string => (bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : `${(bytes / 1024).toFixed(1)} KiB`);
const when = (ms?: number) => (ms === undefined ? '-' : new Date(ms).toISOString().replace('T', ' ').slice(0, 19));

const printEntries = (entries: readonly EntrySummary[], dir: string): void => {
  console.log(`cache ${dir}: ${entries.length} entr${entries.length === 1 ? 'y' : 'ies'}, ${human(entries.reduce((s, e) => s + e.bytes, 0))}`);
  for (const e of entries) {
    if (e.status === 'damaged') {
      console.log(`  ${e.key.slice(0, 16)}  DAMAGED  ${e.detail ?? ''}`);
      continue;
    }
    const p = e.parts!;
    const segments = p.segments.map((s) => `${s.kind}(${s.layers})`).join(' ');
    console.log(`  ${e.key.slice(0, 16)}  ${human(e.bytes).padStart(10)}  used ${when(e.lastUsed)}  ${p.backend.name} ${p.backend.version}  ${segments}`);
  }
};

interface Globals {
  json?: boolean;
}

/** Registers `cache ls | verify | gc | clear` on the program. Global `--json` prints one JSON document. */
export const registerCacheCommands = (program: Command): Command => {
  const cache = program.command('cache').description('inspect and maintain the engine cache').option('--cache <dir>', 'cache directory (default: $TRT_REFIT_CACHE, else ~/.cache/trt-refit)');
  const store = (): CacheStore => new CacheStore({ root: cache.opts<{ cache?: string }>().cache ?? defaultCacheDir() });
  const json = (): boolean => program.opts<Globals>().json === true;
  const out = (value: unknown, text: () => void) => (json() ? console.log(JSON.stringify(value, null, 2)) : text());

  cache.command('ls').description('list entries: key, size, last use, backend, segments').action(async () => {
    const s = store();
    const entries = await s.ls();
    out({ dir: s.root, entries }, () => printEntries(entries, s.root));
  });
  cache.command('verify').description('read every entry in full and remove damaged ones').action(async () => {
    const s = store();
    const report = await s.verify();
    out({ dir: s.root, ...report }, () => {
      console.log(`${report.ok.length} entries ok, ${report.removed.length} damaged and removed`);
      for (const r of report.removed) console.log(`  removed ${r.key.slice(0, 16)}: ${r.detail}`);
    });
  });
  cache
    .command('gc')
    .description('remove leftovers of interrupted writes and damaged entries; evict least recently used entries over --max-size')
    .option('--max-size <size>', 'byte budget, e.g. 10G')
    .action(async (options: { maxSize?: string }) => {
      const s = store();
      const report = await s.gc(options.maxSize === undefined ? undefined : parseBytes(options.maxSize));
      out({ dir: s.root, ...report }, () => console.log(`evicted ${report.evicted.length}, removed ${report.removedDamaged.length} damaged and ${report.removedTemporaries} leftovers; ${human(report.bytesBefore)} -> ${human(report.bytesAfter)}`));
    });
  cache.command('clear').description('remove every entry').action(async () => {
    const s = store();
    const report = await s.clear();
    out({ dir: s.root, ...report }, () => console.log(`removed ${report.removed} entries`));
  });
  return cache;
};
