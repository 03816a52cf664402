/**
 * Benchmark `gemm`: GFLOP/s of libtrtshim's GEMM tactics on 1024 x 1024 x 1024 float32, set against a
 * naive triple loop and the system BLAS (cblas_sgemm, where one is installed), measured side by side by
 * the native driver libtrtshim/tools/gemm_bench.c. Also the float16- and bfloat16-weight GFLOP/s.
 *
 * And weight packing (what a refit spends its time on), measured by libtrtshim/tools/pack_bench.c: GB/s of
 * float32 input packed, per weight dtype and source layout (nk: a torch Linear weight [N, K]; kn: row-major
 * [K, N]), on one thread and on all cores, against a memcpy of the same bytes in the same driver run; and
 * the quantizing packers (int8, fp8 e4m3, int4 with groups of 128) and the GEMM over quantized weights.
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
  quantized: t.array(t.type({ format: t.string, gflops: t.number })),
  naive: t.type({ gflops: t.number }),
  blas: t.intersection([t.type({ library: t.string }), t.partial({ gflops: t.number })]),
});
type DriverOutput = t.TypeOf<typeof DriverOutput>;

/** What pack_bench prints. */
const PackOutput = t.type({
  K: t.number,
  N: t.number,
  input_bytes: t.number,
  threads: t.number,
  memcpy_gbps: t.number,
  memcpy_gbps_after: t.number,
  packing: t.array(
    t.type({ layout: t.string, dtype: t.string, gbps_1thread: t.number, gbps_threads: t.number }),
  ),
  quantized: t.array(t.type({ layout: t.string, format: t.string, gbps_1thread: t.number })),
});
type PackOutput = t.TypeOf<typeof PackOutput>;

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

/** Builds a driver with make, runs it and decodes its JSON output. */
const runNative = <A>(driver: string, args: readonly string[], codec: t.Type<A, unknown, unknown>): A => {
  const build = process.env.TRTSHIM_BENCH_BUILD ?? 'build';
  const src = process.env.TRTSHIM_BENCH_SRC;
  runOrThrow('make', [`BUILD=${build}`, ...(src ? [`SRC=${src}`] : []), `${build}/bin/${driver}`]);
  const stdout = runOrThrow(join(nativeDir, build, 'bin', driver), args);
  let json: unknown;
  try {
    json = JSON.parse(stdout);
  } catch (e) {
    throw new GemmBenchError(`${driver} printed no JSON: ${(e as Error).message}\n${stdout}`);
  }
  const decoded = codec.decode(json);
  if (E.isLeft(decoded)) throw new GemmBenchError(`${driver} output has an unexpected shape:\n${stdout}`);
  return decoded.right;
};

export const runDriver = (): DriverOutput => runNative('gemm_bench', [], DriverOutput);
/** Packing of a K x N weight (default a 4096 x 4096 float32 Linear weight, 64 MiB). */
export const runPackDriver = (K = 4096, N = 4096): PackOutput =>
  runNative('pack_bench', [String(K), String(N), '--repeats', '9'], PackOutput);

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
    ...Object.fromEntries(out.quantized.map((q) => [`best_${q.format}_weights`, gflops(q.gflops)])),
  };
  const ratios: Record<string, number> = {
    ours_vs_naive: out.best.gflops / out.naive.gflops,
    ours_1thread_vs_naive: out.best.gflops_1thread / out.naive.gflops,
    ours_threads_vs_1thread: out.best.gflops / out.best.gflops_1thread,
    float16_weights_vs_float32: out.best.gflops_float16 / out.best.gflops,
    bfloat16_weights_vs_float32: out.best.gflops_bfloat16 / out.best.gflops,
    ...Object.fromEntries(out.quantized.map((q) => [`${q.format}_weights_vs_float32`, q.gflops / out.best.gflops])),
  };
  if (out.blas.gflops !== undefined) {
    figures[`blas_${out.blas.library}`] = gflops(out.blas.gflops);
    ratios.ours_vs_blas = out.best.gflops / out.blas.gflops;
  }
  const pack = runPackDriver();
  // The slower of the two memcpy runs (before and after): a conservative baseline does not flatter packing.
  const memcpyGbps = Math.min(pack.memcpy_gbps, pack.memcpy_gbps_after);
  figures.pack_memcpy_same_bytes = { value: memcpyGbps, unit: 'GB/s' };
  for (const p of pack.packing) {
    const key = `pack_${p.layout}_${p.dtype}`;
    figures[`${key}_1thread`] = { value: p.gbps_1thread, unit: 'GB/s' };
    figures[`${key}_${pack.threads}threads`] = { value: p.gbps_threads, unit: 'GB/s' };
    ratios[`${key}_1thread_vs_memcpy`] = p.gbps_1thread / memcpyGbps;
    ratios[`${key}_${pack.threads}threads_vs_memcpy`] = p.gbps_threads / memcpyGbps;
  }
  for (const q of pack.quantized) {
    const key = `quantize_pack_${q.layout}_${q.format}_1thread`;
    figures[key] = { value: q.gbps_1thread, unit: 'GB/s' };
    ratios[`${key}_vs_memcpy`] = q.gbps_1thread / memcpyGbps;
  }
  console.log(
    `packing a ${pack.K}x${pack.N} float32 weight (${(pack.input_bytes / 2 ** 20).toFixed(0)} MiB); ` +
      `memcpy ${pack.memcpy_gbps.toFixed(2)} GB/s before, ${pack.memcpy_gbps_after.toFixed(2)} GB/s after`,
  );
  console.log(
    `gemm ${out.M}x${out.N}x${out.K} float32, ${out.threads} threads; system BLAS: ` +
      (out.blas.gflops !== undefined ? out.blas.library : 'not installed'),
  );
  writeResult('gemm', figures, ratios);
};
