/**
 * `trt-refit compile | plan | refit | run`: the refit path over files (src/effect/files.ts). Each action
 * returns its exit code; errors are thrown and main.ts prints them as one line.
 */
import type { Command } from 'commander';
import { SingleBar, Presets } from 'cli-progress';
import { parseLoraArgument } from '../lora/open.js';
import { summarizePlan } from '../plan/plan.js';
import { compileFile, planFile, readTensorsTE, refitFile, RefitFilesError, runFile, type WeightsSpec } from '../effect/files.js';
import type { RefitProgress } from '../effect/capabilities.js';
import * as E from 'fp-ts/lib/Either.js';

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

export const registerRefitCommands = (program: Command, ctx: CommandContext): void => {
  program
    .command('compile')
    .description('compile an ONNX model with its build checkpoint into a refittable compiled model (.trtr)')
    .argument('<model>', 'MODEL.onnx')
    .requiredOption('--weights <checkpoint>', 'the build checkpoint (.safetensors, sharded index, or directory)')
    .requiredOption('-o, --output <file>', 'the compiled model to write (MODEL.trtr)')
    .option('--allow-unmapped', 'build even when refittable weights have no checkpoint source')
    .option('--precision <dtype>', 'engine weight precision: float32, float16 or bfloat16', 'float32')
    .option('--tactic-search', 'time candidate kernels per layer at build')
    .option('--force-fallback <op>', 'run this operator type on ONNX Runtime (repeatable)', collect)
    .action(async (model: string, options: { weights: string; output: string; allowUnmapped?: boolean; precision: string; tacticSearch?: boolean; forceFallback?: string[] }) => {
      if (!['float32', 'float16', 'bfloat16'].includes(options.precision)) throw Object.assign(new Error(`--precision: expected float32, float16 or bfloat16; found '${options.precision}'`), { _tag: 'BadUsage' });
      const summary = await compileFile(model, options.weights, options.output, {
        allowUnmapped: options.allowUnmapped ?? false,
        weightPrecision: options.precision as 'float32',
        tacticSearch: options.tacticSearch ?? false,
        ...(options.forceFallback ? { forcedFallback: options.forceFallback } : {}),
      });
      print(ctx.json(), { command: 'compile', output: summary.written.path, bytes: summary.written.bytes, segments: summary.segments, weights: summary.weights },
        `compiled ${model}: ${summary.segments.engine} engine and ${summary.segments.fallback} fallback segment(s); ${summary.weights.mapped} weights mapped, ${summary.weights.constant} graph constants` +
        `${summary.weights.unmapped > 0 ? `, ${summary.weights.unmapped} UNMAPPED` : ''}\nwrote ${summary.written.path} (${mib(summary.written.bytes)})`);
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
          `${r.verified ? ', verified on the probe inputs' : ''}\nwrote ${result.written.path}`);
      } finally {
        bar.stop();
        process.off('SIGINT', onSignal);
      }
    });

  program
    .command('run')
    .description('run a compiled model on inputs from a .safetensors file')
    .argument('<model>', 'MODEL.trtr')
    .requiredOption('--inputs <file>', 'inputs (.safetensors), named as the graph inputs')
    .requiredOption('-o, --output <file>', 'outputs (.safetensors), named as the graph outputs')
    .action(async (model: string, options: { inputs: string; output: string }) => {
      const result = await runFile(model, options.inputs, options.output);
      print(ctx.json(), { command: 'run', output: options.output, outputs: result.outputs },
        `wrote ${Object.entries(result.outputs).map(([name, t]) => `${name} ${t.dtype}[${t.shape.join(',')}]`).join(', ')} to ${options.output}`);
    });
};
