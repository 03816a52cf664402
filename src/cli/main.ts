/**
 * The `trt-refit` command line. `main(argv)` returns the exit code:
 *   0 success, 1 a check failed (the demo's output check), 2 bad usage or bad input, 3 an internal error.
 * Errors print as one line; `--verbose` adds the stack. `--json` prints one JSON document on stdout.
 */
import { Command, CommanderError } from 'commander';
import { runDemo, type DemoReport } from '../demo/run.js';
import { registerRefitCommands } from './refit-commands.js';
import { registerInspectCommand } from './inspect.js';
import { registerLoraCommands } from './lora.js';
import { registerCacheCommands } from './cache.js';

export const ExitCode = { ok: 0, checkFailed: 1, badInput: 2, internal: 3 } as const;

const INTERNAL_TAGS: ReadonlySet<string> = new Set(['ReadbackMismatch', 'RollbackFailed', 'PlanIncomplete']);
/** The tag of the error, or of the detail it wraps (the API's and the effect's errors carry details). */
const innermostTag = (e: { _tag?: string; detail?: unknown }): string => {
  const detail = e.detail as { _tag?: string; detail?: unknown } | undefined;
  return detail !== undefined && typeof detail === 'object' && typeof detail._tag === 'string' ? innermostTag(detail) : e._tag ?? '';
};

interface GlobalOptions {
  json?: boolean;
  verbose?: boolean;
}

const printDemo = (report: DemoReport): void => {
  console.log(`engine: ${report.engine}`);
  for (const model of report.models) {
    if (model.error !== undefined) {
      console.log(`\n${model.name}  FAILED: ${model.error}`);
      continue;
    }
    console.log(`\n${model.name}  (${model.segments.engine} engine segment(s), ${model.segments.fallback} fallback segment(s))`);
    for (const step of model.steps) {
      const moved = step.bytesMoved === undefined ? '' : `${(step.bytesMoved / 1024).toFixed(1).padStart(8)} KiB moved`;
      const check =
        step.check === undefined ? '' : `  ${step.check.pass ? 'ok' : 'FAILED'} (max error ${step.check.maxError.toExponential(2)})`;
      console.log(`  ${step.step.padEnd(28)} ${(step.seconds * 1000).toFixed(1).padStart(9)} ms ${moved.padStart(18)}${check}`);
    }
  }
  console.log(`\n${report.pass ? 'all output checks passed (PyTorch outputs, 1e-4 rel + 1e-5 abs)' : 'some output checks FAILED'}`);
};

/** Runs the CLI; never throws. */
export const main = async (argv: readonly string[]): Promise<number> => {
  let exitCode: number = ExitCode.ok;
  const program = new Command()
    .name('trt-refit')
    .description('compile models into engines once, then refit their weights in place')
    .option('--json', 'print machine-readable JSON')
    .option('--verbose', 'print stacks with errors')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  program
    .command('demo')
    .description('build engines for the shipped fixtures, refit them to new weights, check outputs against PyTorch')
    .option('--fixtures <dir>', 'fixtures folder (default: ../shared/fixtures beside the package)')
    .action(async (options: { fixtures?: string }) => {
      const global = program.opts<GlobalOptions>();
      const report = await runDemo({ fixturesDir: options.fixtures });
      if (global.json) console.log(JSON.stringify(report, null, 2));
      else printDemo(report);
      exitCode = report.pass ? ExitCode.ok : ExitCode.checkFailed;
    });

  registerRefitCommands(program, {
    json: () => program.opts<GlobalOptions>().json === true,
    setExitCode: (code) => {
      exitCode = code;
    },
  });
  registerCacheCommands(program);
  const commandContext = { json: () => program.opts<GlobalOptions>().json === true, setExitCode: (code: number) => { exitCode = code; } };
  registerInspectCommand(program, commandContext);
  registerLoraCommands(program, commandContext);

  try {
    await program.parseAsync(argv as string[], { from: 'user' });
  } catch (error) {
    if (error instanceof CommanderError) {
      return error.exitCode === 0 ? ExitCode.ok : ExitCode.badInput;
    }
    const verbose = program.opts<GlobalOptions>().verbose === true;
    const e = error as Error & { _tag?: string };
    console.error(`trt-refit: ${e.message}`);
    if (verbose && e.stack !== undefined) console.error(e.stack);
    // A tag is bad input, except the ones that say our own result was wrong (read-back found an engine
    // holding other values than it was given, an undo that failed): those are internal errors.
    return e._tag !== undefined && !INTERNAL_TAGS.has(innermostTag(e)) ? ExitCode.badInput : ExitCode.internal;
  }
  return exitCode;
};
