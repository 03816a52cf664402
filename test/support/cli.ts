/** The `trt-refit` command line run in this process: `main(argv)` (src/cli/main.ts, what
 *  `src/cli/entry.ts` and `bin/trt-refit.js` call) with its stdout and stderr captured per call.
 *
 *  In place of `node --import tsx src/cli/entry.ts ...` child processes with a fixed wall-clock timeout:
 *  no process start-up (seconds each on a loaded machine), nothing killed for being slow, and the same
 *  exit codes, output and error lines. Output is captured per call (AsyncLocalStorage), so calls may run
 *  concurrently; calls that set environment variables run one at a time, with the variables set only for
 *  their duration. */
import { AsyncLocalStorage } from 'node:async_hooks';
import { format } from 'node:util';
import { main } from '../../src/cli/main.js';

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

interface Capture {
  readonly out: string[];
  readonly err: string[];
}

const current = new AsyncLocalStorage<Capture>();
let installed = false;

const text = (chunk: unknown): string => (typeof chunk === 'string' ? chunk : Buffer.from(chunk as Uint8Array).toString('utf8'));

/** Routes console output and writes to process.stdout / process.stderr into the capture of the CLI call
 *  they belong to; everything else goes where it went before. */
const install = (): void => {
  if (installed) return;
  installed = true;
  const original = { log: console.log, info: console.info, error: console.error, warn: console.warn };
  const to = (which: 'out' | 'err', fallback: (...a: unknown[]) => void) => (...args: unknown[]) => {
    const capture = current.getStore();
    if (capture === undefined) fallback(...args);
    else capture[which].push(`${format(...args)}\n`);
  };
  console.log = to('out', original.log.bind(console));
  console.info = to('out', original.info.bind(console));
  console.error = to('err', original.error.bind(console));
  console.warn = to('err', original.warn.bind(console));
  for (const [stream, which] of [[process.stdout, 'out'], [process.stderr, 'err']] as const) {
    const write = stream.write.bind(stream) as (...a: unknown[]) => boolean;
    stream.write = ((chunk: unknown, ...rest: unknown[]): boolean => {
      const capture = current.getStore();
      if (capture === undefined) return write(chunk, ...rest);
      capture[which].push(text(chunk));
      const callback = rest.find((r) => typeof r === 'function') as (() => void) | undefined;
      if (callback) queueMicrotask(callback);
      return true;
    }) as typeof stream.write;
  }
};

let envQueue: Promise<unknown> = Promise.resolve();

const withEnv = <A>(env: Readonly<Record<string, string | undefined>>, f: () => Promise<A>): Promise<A> => {
  const run = async (): Promise<A> => {
    const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
    const set = (values: Readonly<Record<string, string | undefined>>) => {
      for (const [k, v] of Object.entries(values)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    };
    set(env);
    try {
      return await f();
    } finally {
      set(saved);
    }
  };
  const result = envQueue.then(run, run);
  envQueue = result.catch(() => undefined);
  return result;
};

/** Runs `trt-refit ...args` in this process; `env` (optional) overrides environment variables for the
 *  call (undefined removes one). */
export const runCli = async (args: readonly string[], env?: Readonly<Record<string, string | undefined>>): Promise<CliResult> => {
  install();
  const capture: Capture = { out: [], err: [] };
  const call = () => current.run(capture, () => main(args));
  const code = env === undefined ? await call() : await withEnv(env, call);
  return { code, stdout: capture.out.join(''), stderr: capture.err.join('') };
};

/** `runCli` with the arguments spread, the form the CLI tests use. */
export const cli = (...args: string[]): Promise<CliResult> => runCli(args);
