/**
 * Shared benchmark harness: machine description, timing, the host memory bandwidth baseline, and the
 * result file every benchmark writes (bench/results/NAME.json, shape given in ../shared/DESIGN.md).
 */
import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface Figure {
  readonly value: number;
  readonly unit: string;
}

export interface BenchResult {
  readonly name: string;
  readonly machine: { readonly cores: number; readonly memoryBytes: number; readonly cpuModel: string };
  readonly figures: Record<string, Figure>;
  readonly ratios: Record<string, number>;
}

export const resultsDir = join(dirname(fileURLToPath(import.meta.url)), 'results');

export const machine = () => ({
  cores: cpus().length,
  memoryBytes: totalmem(),
  cpuModel: cpus()[0]?.model ?? 'unknown',
});

/** Seconds taken by fn, best of `repeats` runs after `warmup` untimed runs. */
export const bestOf = async (repeats: number, fn: () => unknown | Promise<unknown>, warmup = 1): Promise<number> => {
  for (let i = 0; i < warmup; i++) await fn();
  let best = Infinity;
  for (let i = 0; i < repeats; i++) {
    const start = process.hrtime.bigint();
    await fn();
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    if (seconds < best) best = seconds;
  }
  return best;
};

/** Host memory copy bandwidth in bytes per second (Buffer.copy of `bytes`, best of 5): the baseline
 *  every refit throughput figure is set against. */
export const hostMemcpyBandwidth = async (bytes = 256 * 1024 * 1024): Promise<number> => {
  const src = Buffer.alloc(bytes, 1);
  const dst = Buffer.alloc(bytes);
  const seconds = await bestOf(5, () => src.copy(dst));
  return bytes / seconds;
};

/** Prints a table of the figures and ratios and writes bench/results/NAME.json atomically. */
export const writeResult = (name: string, figures: Record<string, Figure>, ratios: Record<string, number>): BenchResult => {
  const result: BenchResult = { name, machine: machine(), figures, ratios };
  console.log(`\n${name}`);
  console.table(Object.fromEntries(Object.entries(figures).map(([k, f]) => [k, { value: Number(f.value.toPrecision(4)), unit: f.unit }])));
  console.table(Object.fromEntries(Object.entries(ratios).map(([k, r]) => [k, { ratio: Number(r.toPrecision(4)) }])));
  mkdirSync(resultsDir, { recursive: true });
  const path = join(resultsDir, `${name}.json`);
  writeFileSync(`${path}.tmp`, JSON.stringify(result, null, 2) + '\n');
  renameSync(`${path}.tmp`, path);
  console.log(`wrote ${path}`);
  return result;
};
