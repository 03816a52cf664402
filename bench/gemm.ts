/**
 * Benchmark `gemm`: GFLOP/s of libtrtshim's GEMM tactics on 1024 x 1024 x 1024 float32, set against a
 * naive triple loop and the system BLAS (cblas_sgemm, where one is installed), measured side by side by
 * the native driver libtrtshim/tools/gemm_bench.c. Also the float16- and bfloat16-weight GFLOP/s.
 *
 * TRTSHIM_BENCH_BUILD=build/NAME builds the driver into a private build directory (and
 * TRTSHIM_BENCH_SRC="src/a.c ..." from a subset of the sources) instead of libtrtshim/build.
 */
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { type Figure, writeResult } from './lib.js';

const nativeDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'libtrtshim');

/** What gemm_bench prints. */
const DriverOutput = t.type({
  M: t.number,
  N: t.number,
  K: t.number,
  threads: t.number,
  tactics: t.array(t.type({ name: t.string, gflops: t.number })),
  best: t.type({
    name: t.string,
    gflops: t.number,
    gflops_1thread: t.number,
    gflops_float16: t.number,
    gflops_bfloat16: t.number,
  }),
  naive: t.type({ gflops: t.number }),
  blas: t.intersection([t.type({ library: t.string }), t.partial({ gflops: t.number })]),
});
type DriverOutput = t.TypeOf<typeof DriverOutput>;

export class GemmBenchError extends Error {
  override readonly name = 'GemmBenchError';
  readonly _tag = 'GemmBenchError' as const;
}

const runOrThrow = (command: string, args: readonly string[]): string => {
  const result = spawnSync(command, args, { cwd: nativeDir, encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 });
  if (result.error) throw new GemmBenchError(`${command}: ${result.error.message}`);
  if (result.status !== 0)
    throw new GemmBenchError(`${command} ${args.join(' ')} exited with ${result.status}:\n${result.stderr}`);
  return result.stdout;
};

/** Builds the driver with make and runs it; returns its decoded JSON output. */
export const runDriver = (): DriverOutput => {
  const build = process.env.TRTSHIM_BENCH_BUILD ?? 'build';
  const src = process.env.TRTSHIM_BENCH_SRC;
  runOrThrow('make', [`BUILD=${build}`, ...(src ? [`SRC=${src}`] : []), `${build}/bin/gemm_bench`]);
  const stdout = runOrThrow(join(nativeDir, build, 'bin', 'gemm_bench'), []);
  let json: unknown;
  try {
    json = JSON.parse(stdout);
  } catch (e) {
    throw new GemmBenchError(`gemm_bench printed no JSON: ${(e as Error).message}\n${stdout}`);
  }
  const decoded = DriverOutput.decode(json);
  if (E.isLeft(decoded)) throw new GemmBenchError(`gemm_bench output has an unexpected shape:\n${stdout}`);
  return decoded.right;
};

const gflops = (value: number): Figure => ({ value, unit: 'GFLOP/s' });

export const run = async (): Promise<void> => {
  const out = runDriver();
  const figures: Record<string, Figure> = {
    [`best_${out.best.name}_${out.threads}threads`]: gflops(out.best.gflops),
    [`best_${out.best.name}_1thread`]: gflops(out.best.gflops_1thread),
    best_float16_weights: gflops(out.best.gflops_float16),
    best_bfloat16_weights: gflops(out.best.gflops_bfloat16),
    ...Object.fromEntries(out.tactics.map((tactic) => [`tactic_${tactic.name}`, gflops(tactic.gflops)])),
    naive_triple_loop_1thread: gflops(out.naive.gflops),
  };
  const ratios: Record<string, number> = {
    ours_vs_naive: out.best.gflops / out.naive.gflops,
    ours_1thread_vs_naive: out.best.gflops_1thread / out.naive.gflops,
    ours_threads_vs_1thread: out.best.gflops / out.best.gflops_1thread,
    float16_weights_vs_float32: out.best.gflops_float16 / out.best.gflops,
    bfloat16_weights_vs_float32: out.best.gflops_bfloat16 / out.best.gflops,
  };
  if (out.blas.gflops !== undefined) {
    figures[`blas_${out.blas.library}`] = gflops(out.blas.gflops);
    ratios.ours_vs_blas = out.best.gflops / out.blas.gflops;
  }
  console.log(
    `gemm ${out.M}x${out.N}x${out.K} float32, ${out.threads} threads; system BLAS: ` +
      (out.blas.gflops !== undefined ? out.blas.library : 'not installed'),
  );
  writeResult('gemm', figures, ratios);
};
