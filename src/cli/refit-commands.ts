import { readFile } from 'node:fs/promises';
import * as t from 'io-ts';
/**
 * `trt-refit compile | plan | refit | run`: the refit path over files (src/effect/files.ts). Each action
 * returns its exit code; errors are thrown and main.ts prints them as one line.
 */
import { Option, type Command } from 'commander';
import { SingleBar, Presets } from 'cli-progress';
import { parseLoraArgument } from '../lora/open.js';
import { summarizePlan } from '../plan/plan.js';
import { planFile, readTensorsTE, refitFile, RefitFilesError, type WeightsSpec } from '../effect/files.js';
import type { RefitProgress } from '../effect/capabilities.js';
import * as E from 'fp-ts/lib/Either.js';
import { compileWithReport, type CompileReport } from '../compile/compile.js';
import { readModelFile, writeModelFile } from '../model/file.js';
import { runModelWithReport } from '../model/run.js';
import { writeSafetensors, type Dtype } from '../safetensors/index.js';
import { toBytes, type DType } from '../trace/ir.js';
import type { Budget } from '../streaming/budget.js';
import { addCacheOptions, cacheStoreFor, DEFAULT_COMPILE_CACHE_BYTES, resolveCacheSetting } from './cache.js';
import { weightFormatArgument } from './quant.js';
import { WEIGHT_FORMATS, type WeightFormat } from '../quant/format.js';
import { weightFormatOf } from '../model/format.js';
import { registerWeightBudgetOption, registerWeightStreamingOption, streamingOptionsOf } from './streaming.js';

export interface CommandContext {
  readonly json: () => boolean;
  readonly setExitCode: (code: number) => void;
}

const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

const weightsOf = (options: { weights: string; lora?: string[] }): WeightsSpec => ({
  checkpoint: options.weights,
  lora: (options.lora ?? []).map(parseLoraArgument),
});

const print = (json: boolean, document: unknown, text: string): void => {
  if (json) console.log(JSON.stringify(document, null, 2));
  else console.log(text);
};

/** A progress bar on stderr while stdout is a terminal and output is not JSON. */
const progressBar = (json: boolean): { onProgress?: (p: RefitProgress) => void; stop: () => void } => {
  if (json || !process.stdout.isTTY) return { stop: () => undefined };
  const bar = new SingleBar({ format: 'refit [{bar}] {percentage}% | {value}/{total} weights | {target}', stream: process.stderr, hideCursor: true }, Presets.shades_classic);
  let started = false;
  return {
    onProgress: (p) => {
      if (!started) {
        bar.start(Math.max(1, p.total), 0, { target: '' });
        started = true;
      }
      bar.update(p.done, { target: p.target ?? p.phase });
    },
    stop: () => started && bar.stop(),
  };
};

const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(2)} MiB`;

const cacheLine = (r: CompileReport): string => {
  const t = r.timings;
  if (r.cache === 'off') return `engine cache off; built in ${(t.buildMs ?? 0).toFixed(1)} ms`;
  const key = (r.key ?? '').slice(0, 16);
  return r.cache === 'hit'
    ? `engine cache hit ${key}: loaded and refitted in ${(t.loadMs ?? 0).toFixed(1)} ms (hash ${t.hashMs.toFixed(1)} ms, lookup ${t.lookupMs.toFixed(1)} ms)`
    : `engine cache miss ${key} (${r.missReason ?? 'absent'}): built in ${(t.buildMs ?? 0).toFixed(1)} ms, stored in ${(t.insertMs ?? 0).toFixed(1)} ms`;
};

/** Lines about equal-valued candidates settled by evidence and checkpoint tensors pinned, or ''. */
const settledLine = (r: CompileReport): string => {
  const map = r.model.weightMap;
  const by = new Map<string, number>();
  for (const t of map.ties) by.set(t.evidence ?? 'unrecorded', (by.get(t.evidence ?? 'unrecorded') ?? 0) + 1);
  const pinned = map.pinned ?? [];
  const kinds = new Map<string, number>();
  for (const p of pinned) kinds.set(p.kind, (kinds.get(p.kind) ?? 0) + 1);
  return (map.ties.length > 0 ? `${map.ties.length} choice(s) among equal-valued checkpoint tensors, settled by ${[...by].map(([k, n]) => `${k} (${n})`).join(', ')} (see inspect)\n` : '')
    + (pinned.length > 0 ? `${pinned.length} checkpoint tensor(s) pinned (${[...kinds].map(([k, n]) => `${n} ${k}`).join(', ')}): a refit that changes them is refused (see inspect)\n` : '');
};

/** A --map file: a JSON object of engine weight ids or initializer names to checkpoint tensor names. */
const MapFileCodec = t.record(t.string, t.string);
const readMapFile = async (path: string): Promise<Record<string, string>> => {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw Object.assign(new Error(`--map ${path}: cannot read it: ${(e as Error).message}`), { _tag: 'BadUsage' });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw Object.assign(new Error(`--map ${path}: not JSON: ${(e as Error).message}`), { _tag: 'BadUsage' });
  }
  const decoded = MapFileCodec.decode(json);
  if (decoded._tag === 'Left') throw Object.assign(new Error(`--map ${path}: expected a JSON object of strings ({"<engine weight id or initializer>": "<checkpoint tensor>"})`), { _tag: 'BadUsage' });
  return decoded.right;
};

/** One line about the weights whose checkpoint values differ from the ONNX file's, or '' for none. */
const differsLine = (r: CompileReport): string => {
  if (r.differs.length === 0) return '';
  const largest = r.differs.reduce((a, b) => (Number.isNaN(b.maxAbsDiff) || b.maxAbsDiff > a.maxAbsDiff ? b : a));
  const methods = [...new Set(r.differs.flatMap((d) => d.methods))].join(', ');
  return `${r.differs.length} weight(s) differ from the ONNX file's values (matched by ${methods}; largest difference ${largest.maxAbsDiff.toPrecision(3)} in ${largest.id}): the engines hold the checkpoint's values\n`;
};

const safetensorsDtype: Readonly<Record<DType, Dtype>> = {
  float32: 'F32', float64: 'F64', float16: 'F16', bfloat16: 'BF16', int8: 'I8', uint8: 'U8', int16: 'I16', uint16: 'U16',
  int32: 'I32', uint32: 'U32', int64: 'I64', uint64: 'U64', bool: 'BOOL',
};

export const registerRefitCommands = (program: Command, ctx: CommandContext): void => {
  const compile = program
    .command('compile')
    .description('compile an ONNX model with its build checkpoint into a refittable compiled model (.trtr)')
    .argument('<model>', 'MODEL.onnx')
    .requiredOption('--weights <checkpoint>', 'the build checkpoint (.safetensors, sharded index, or directory)')
    .requiredOption('-o, --output <file>', 'the compiled model to write (MODEL.trtr)')
    .option('--allow-unmapped', 'build even when refittable weights have no checkpoint source')
    .option('--map <file>', 'settle equal-valued weights: a JSON object {"<engine weight id or initializer>": "<checkpoint tensor>"}')
    // One story: --weight-format names the kernel format; its float values are the precisions --precision
    // names (fp32 = float32, ...), so the two must agree when both are given. With a quantized format,
    // --precision is the precision of the weights that stay float (norms, embeddings, biases).
    .addOption(new Option('--weight-format <format>', `GEMM and convolution kernel format: ${WEIGHT_FORMATS.join(', ')} (int4 takes :32, :64 or :128, default 128); default fp32`).argParser(weightFormatArgument))
    .option('--precision <dtype>', 'precision of float weights: float32, float16 or bfloat16 (default float32; fp16 / bf16 of --weight-format say the same)')
    .option('--tactic-search', 'time candidate kernels per layer at build')
    .option('--force-fallback <op>', 'run this operator type on ONNX Runtime (repeatable)', collect);
  // The engine cache is on by default: entries hold stripped engines (no weights), so they are small, and
  // the directory is trimmed to DEFAULT_COMPILE_CACHE_BYTES, least recently used first.
  addCacheOptions(compile);
  registerWeightStreamingOption(compile);
  compile.action(async (model: string, options: { weights: string; output: string; map?: string; allowUnmapped?: boolean; precision?: string; weightFormat?: WeightFormat; tacticSearch?: boolean; forceFallback?: string[]; cache?: string | boolean; weightStreaming?: boolean }) => {
      if (options.precision !== undefined && !['float32', 'float16', 'bfloat16'].includes(options.precision)) throw Object.assign(new Error(`--precision: expected float32, float16 or bfloat16; found '${options.precision}'`), { _tag: 'BadUsage' });
      const store = cacheStoreFor(resolveCacheSetting(options.cache), DEFAULT_COMPILE_CACHE_BYTES);
      const mapFile = options.map !== undefined ? await readMapFile(options.map) : undefined;
      const report = await compileWithReport(model, options.weights, {
        allowUnmapped: options.allowUnmapped ?? false,
        ...(mapFile !== undefined ? { map: mapFile } : {}),
        ...(options.precision !== undefined ? { weightPrecision: options.precision as 'float32' } : {}),
        ...(options.weightFormat !== undefined ? { weightFormat: options.weightFormat } : {}),
        tacticSearch: options.tacticSearch ?? false,
        weightStreaming: streamingOptionsOf(options).weightStreaming,
        cache: store ?? false,
        ...(options.forceFallback ? { forcedFallback: options.forceFallback } : {}),
      });
      let written;
      try {
        written = await writeModelFile(report.model, options.output);
      } finally {
        report.model[Symbol.dispose]();
      }
      const targets = report.model.weightMap.targets;
      const weightFormat = weightFormatOf(report.model.description.build);
      const segments = { engine: report.model.engineStages().length, fallback: report.model.fallbackStages().length };
      const weights = { mapped: targets.filter((t) => t.status === 'mapped').length, constant: targets.filter((t) => t.status === 'constant').length, unmapped: targets.filter((t) => t.status === 'unmapped').length };
      print(ctx.json(), {
        command: 'compile', output: written.path, bytes: written.bytes, segments, weights,
        cache: report.cache, ...(report.key !== undefined ? { cacheKey: report.key } : {}), ...(store !== undefined ? { cacheDir: store.root } : {}),
        ...(report.missReason !== undefined ? { missReason: report.missReason } : {}),
        weightFormat, weightStreaming: options.weightStreaming === true, timings: report.timings,
        differs: report.differs, warnings: report.warnings,
        settled: report.model.weightMap.ties, pinned: report.model.weightMap.pinned ?? [],
      },
        `compiled ${model} (weights ${weightFormat}): ${segments.engine} engine and ${segments.fallback} fallback segment(s); ${weights.mapped} weights mapped, ${weights.constant} graph constants` +
        `${weights.unmapped > 0 ? `, ${weights.unmapped} UNMAPPED` : ''}\n${settledLine(report)}${differsLine(report)}${report.warnings.map((w) => `warning: ${w}\n`).join('')}${cacheLine(report)}\nwrote ${written.path} (${mib(written.bytes)})`);
    });

  program
    .command('plan')
    .description('show what a refit would do (a dry run: changes nothing)')
    .argument('<model>', 'MODEL.trtr')
    .requiredOption('--weights <checkpoint>', 'the checkpoint to refit with')
    .option('--lora <adapter>', 'a LoRA adapter DIR[:SCALE] to merge (repeatable)', collect)
    .action(async (model: string, options: { weights: string; lora?: string[] }) => {
      const plan = await planFile(model, weightsOf(options));
      print(ctx.json(), plan, summarizePlan(plan));
      if (plan.totals.errors > 0) ctx.setExitCode(1);
    });

  program
    .command('refit')
    .description('change a compiled model\'s weights in place (or into -o OUT.trtr): only what changed moves')
    .argument('<model>', 'MODEL.trtr')
    .requiredOption('--weights <checkpoint>', 'the checkpoint to refit with')
    .option('--lora <adapter>', 'a LoRA adapter DIR[:SCALE] to merge (repeatable)', collect)
    .option('-o, --output <file>', 'write the refitted model here instead of in place')
    .option('--verify <inputs>', 'probe inputs (.safetensors): undo the refit unless every output is finite')
    .action(async (model: string, options: { weights: string; lora?: string[]; output?: string; verify?: string }) => {
      let verify;
      if (options.verify !== undefined) {
        const inputs = await readTensorsTE(options.verify)();
        if (E.isLeft(inputs)) throw new RefitFilesError(inputs.left);
        verify = { inputs: inputs.right };
      }
      const bar = progressBar(ctx.json());
      const aborter = new AbortController();
      const onSignal = () => aborter.abort();
      process.once('SIGINT', onSignal);
      try {
        const result = await refitFile(model, weightsOf(options), {
          signal: aborter.signal,
          ...(options.output !== undefined ? { output: options.output } : {}),
          ...(verify !== undefined ? { verify } : {}),
          ...(bar.onProgress ? { capabilities: { onProgress: bar.onProgress } } : {}),
        });
        bar.stop();
        const r = result.report;
        print(ctx.json(), { command: 'refit', output: result.written.path, totals: result.plan.totals, report: r },
          `refitted ${r.changed} of ${result.plan.totals.targets} weights (${mib(r.bytesMoved)}) in ${r.milliseconds.toFixed(1)} ms` +
          `${r.verified ? ', verified on the probe inputs' : ''}` +
          `\nread back from the engines: ${r.readback.targets} weight(s) match the plan${r.readback.unverifiable > 0 ? `, ${r.readback.unverifiable} not comparable (quantized or half-precision kernels)` : ''} (${r.readback.milliseconds.toFixed(1)} ms)` +
          `\nwrote ${result.written.path}`);
      } finally {
        bar.stop();
        process.off('SIGINT', onSignal);
      }
    });

  const run = program
    .command('run')
    .description('run a compiled model on inputs from a .safetensors file')
    .argument('<model>', 'MODEL.trtr')
    .requiredOption('--inputs <file>', 'inputs (.safetensors), named as the graph inputs')
    .requiredOption('-o, --output <file>', 'outputs (.safetensors), named as the graph outputs');
  registerWeightBudgetOption(run);
  run.action(async (model: string, options: { inputs: string; output: string; weightBudget?: Budget }) => {
      const inputs = await readTensorsTE(options.inputs)();
      if (E.isLeft(inputs)) throw new RefitFilesError(inputs.left);
      using compiled = await readModelFile(model);
      const budget = streamingOptionsOf(options).weightBudget;
      const { outputs, budget: applied } = await runModelWithReport(compiled, inputs.right, budget !== undefined ? { weightBudget: budget } : {});
      await writeSafetensors(options.output, Object.entries(outputs).map(([name, t]) => ({ name, dtype: safetensorsDtype[t.dtype], shape: t.shape, data: toBytes(t.data) })));
      const shapes = Object.fromEntries(Object.entries(outputs).map(([name, t]) => [name, { dtype: t.dtype, shape: t.shape }]));
      print(ctx.json(), { command: 'run', output: options.output, outputs: shapes, ...(applied !== undefined ? { weightBudget: applied } : {}) },
        `wrote ${Object.entries(shapes).map(([name, t]) => `${name} ${t.dtype}[${t.shape.join(',')}]`).join(', ')} to ${options.output}`);
    });
};
