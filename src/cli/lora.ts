/**
 * `trt-refit lora apply | switch | remove MODEL.trtr ...`: LoRA adapters on top of base weights.
 *
 * What "base" is: a checkpoint the adapters are merged onto (W + scale * B @ A, src/lora), then the model is
 * refitted to the merged weights (only weights the adapters touch, or that differ from the model's, move).
 * The base and the active adapters are recorded beside the model in `MODEL.trtr.lora.json`, with a digest
 * of the weights the model holds after the command. A later lora command uses the recorded base and
 * adapters while that digest still matches the model; `--weights BASE` sets the base explicitly (needed
 * the first time, and after the model was refitted some other way, e.g. by `trt-refit refit`).
 *
 *   apply   ADAPTER[:SCALE]...   the active adapters plus these
 *   switch  ADAPTER[:SCALE]...   exactly these
 *   remove  [ADAPTER...]         the active adapters minus these (all of them when none are named): back to base
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { Presets, SingleBar } from 'cli-progress';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import type { RefitProgress } from '../effect/capabilities.js';
import { refitFile } from '../effect/files.js';
import { parseLoraArgument } from '../lora/open.js';
import { readModelHeaderTE, ModelFileError } from '../model/file.js';
import type { ModelHeader } from '../model/format.js';

/** What the CLI's commands get from main: the global --json, and a way to set the exit code. */
export interface CliContext {
  readonly json: () => boolean;
  readonly setExitCode: (code: number) => void;
}

export const LORA_STATE_SUFFIX = '.lora.json';
export const loraStatePath = (model: string): string => `${model}${LORA_STATE_SUFFIX}`;

const AdapterCodec = t.type({ path: t.string, weight: t.number });
export const LoraStateCodec = t.type({
  version: t.literal(1),
  /** Digest of the weights the model held after the last lora command (its header's `current`). */
  model: t.string,
  /** The base checkpoint, absolute. */
  base: t.string,
  adapters: t.readonlyArray(AdapterCodec),
});
export type LoraState = t.TypeOf<typeof LoraStateCodec>;
export type ActiveAdapter = t.TypeOf<typeof AdapterCodec>;

export type LoraCommandErrorDetail =
  | { readonly _tag: 'NoBaseWeights'; readonly model: string }
  | { readonly _tag: 'StaleLoraState'; readonly model: string }
  | { readonly _tag: 'LoraStateInvalid'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'AdapterNotActive'; readonly adapter: string; readonly active: readonly string[] }
  | { readonly _tag: 'NoAdapters'; readonly action: string };

export const describeLoraCommandError = (e: LoraCommandErrorDetail): string => {
  switch (e._tag) {
    case 'NoBaseWeights': return `${e.model}: no base weights recorded for LoRA adapters: pass --weights BASE (the checkpoint the adapters go on top of)`;
    case 'StaleLoraState': return `${e.model}: the model was refitted since the last lora command, so its recorded base no longer applies: pass --weights BASE`;
    case 'LoraStateInvalid': return `${e.path}: not a LoRA state file: ${e.detail} (remove it and pass --weights BASE)`;
    case 'AdapterNotActive': return `adapter ${e.adapter} is not active (active: ${e.active.length === 0 ? 'none' : e.active.join(', ')})`;
    case 'NoAdapters': return `lora ${e.action}: name at least one adapter DIR[:SCALE]`;
  }
};

export class LoraCommandError extends Error {
  override readonly name = 'LoraCommandError';
  readonly _tag: LoraCommandErrorDetail['_tag'];
  constructor(readonly detail: LoraCommandErrorDetail) {
    super(describeLoraCommandError(detail));
    this._tag = detail._tag;
  }
}

/** A digest of what a model's weights hold now (the source digests of its targets). */
export const weightsDigest = (header: Pick<ModelHeader, 'current'>): string =>
  createHash('sha256').update(JSON.stringify(Object.keys(header.current).sort().map((k) => [k, header.current[k]]))).digest('hex');

/** The recorded state: undefined when there is none; Left when the file is damaged. */
export const readLoraState = async (model: string): Promise<E.Either<LoraCommandErrorDetail, LoraState | undefined>> => {
  const path = loraStatePath(model);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as { code?: string }).code === 'ENOENT') return E.right(undefined);
    return E.left({ _tag: 'LoraStateInvalid', path, detail: (e as Error).message });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return E.left({ _tag: 'LoraStateInvalid', path, detail: `not JSON: ${(e as Error).message}` });
  }
  const decoded = LoraStateCodec.decode(json);
  return E.isLeft(decoded) ? E.left({ _tag: 'LoraStateInvalid', path, detail: PathReporter.report(decoded).slice(0, 2).join('; ') }) : E.right(decoded.right);
};

/** Writes the state beside the model (temporary name, then rename). */
export const writeLoraState = async (model: string, state: LoraState): Promise<void> => {
  const path = loraStatePath(model);
  const temporary = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await writeFile(temporary, `${JSON.stringify(state, null, 2)}\n`);
    await rename(temporary, path);
  } catch (e) {
    await rm(temporary, { force: true });
    throw e;
  }
};

export type LoraAction = 'apply' | 'switch' | 'remove';

/** The adapters a command leaves active (pure). */
export const nextAdapters = (action: LoraAction, active: readonly ActiveAdapter[], named: readonly ActiveAdapter[]): E.Either<LoraCommandErrorDetail, ActiveAdapter[]> => {
  if (action === 'apply') return named.length === 0 ? E.left({ _tag: 'NoAdapters', action }) : E.right([...active, ...named]);
  if (action === 'switch') return named.length === 0 ? E.left({ _tag: 'NoAdapters', action }) : E.right([...named]);
  if (named.length === 0) return E.right([]);
  for (const n of named) if (!active.some((a) => a.path === n.path)) return E.left({ _tag: 'AdapterNotActive', adapter: n.path, active: active.map((a) => a.path) });
  return E.right(active.filter((a) => !named.some((n) => n.path === a.path)));
};

/** The recorded state, when it still describes the model's weights. */
export const currentLoraState = async (model: string, header: ModelHeader): Promise<{ state: LoraState | undefined; stale: boolean }> => {
  const recorded = await readLoraState(model);
  if (E.isLeft(recorded)) throw new LoraCommandError(recorded.left);
  if (recorded.right === undefined) return { state: undefined, stale: false };
  return recorded.right.model === weightsDigest(header) ? { state: recorded.right, stale: false } : { state: recorded.right, stale: true };
};

const readHeader = async (model: string): Promise<ModelHeader> => {
  const header = await readModelHeaderTE(model)();
  if (E.isLeft(header)) throw new ModelFileError(header.left);
  return header.right;
};

export interface LoraCommandResult {
  readonly action: LoraAction;
  readonly output: string;
  readonly base: string;
  readonly adapters: readonly ActiveAdapter[];
  readonly changed: number;
  readonly bytesMoved: number;
  readonly milliseconds: number;
}

/** One lora command over files; rejects with LoraCommandError, RefitFilesError or ModelFileError. */
export const runLoraCommand = async (
  action: LoraAction,
  model: string,
  adapterArguments: readonly string[],
  options: { readonly weights?: string; readonly output?: string; readonly signal?: AbortSignal; readonly onProgress?: (p: RefitProgress) => void } = {},
): Promise<LoraCommandResult> => {
  const header = await readHeader(model);
  const { state, stale } = await currentLoraState(model, header);
  const usable = stale ? undefined : state;
  const base = options.weights !== undefined ? resolve(options.weights) : usable?.base;
  if (base === undefined) throw new LoraCommandError(stale ? { _tag: 'StaleLoraState', model } : { _tag: 'NoBaseWeights', model });
  const named = adapterArguments.map(parseLoraArgument).map((a) => ({ path: resolve(a.path), weight: a.weight }));
  const adapters = nextAdapters(action, usable?.adapters ?? [], named);
  if (E.isLeft(adapters)) throw new LoraCommandError(adapters.left);
  const output = options.output ?? model;
  const result = await refitFile(model, { checkpoint: base, lora: adapters.right }, {
    ...(options.output !== undefined ? { output: options.output } : {}),
    ...(options.signal ? { signal: options.signal } : {}),
    ...(options.onProgress ? { capabilities: { onProgress: options.onProgress } } : {}),
  });
  await writeLoraState(output, { version: 1, model: weightsDigest(await readHeader(output)), base, adapters: adapters.right });
  return { action, output, base, adapters: adapters.right, changed: result.report.changed, bytesMoved: result.report.bytesMoved, milliseconds: result.report.milliseconds };
};

const progressBar = (json: boolean): { onProgress?: (p: RefitProgress) => void; stop: () => void } => {
  if (json || !process.stderr.isTTY) return { stop: () => undefined };
  const bar = new SingleBar({ format: 'lora [{bar}] {percentage}% | {value}/{total} weights', stream: process.stderr, hideCursor: true }, Presets.shades_classic);
  let started = false;
  return {
    onProgress: (p) => {
      if (!started) bar.start(Math.max(1, p.total), 0);
      started = true;
      bar.update(p.done);
    },
    stop: () => started && bar.stop(),
  };
};

const describeAdapters = (adapters: readonly ActiveAdapter[]): string =>
  adapters.length === 0 ? 'none (base weights)' : adapters.map((a) => (a.weight === 1 ? a.path : `${a.path}:${a.weight}`)).join(', ');

/** Registers `lora apply | switch | remove`. */
export const registerLoraCommands = (program: Command, ctx: CliContext): Command => {
  const lora = program.command('lora').description('apply, switch or remove LoRA adapters on top of base weights (recorded in MODEL.trtr.lora.json)');
  const action = (name: LoraAction) => async (model: string, adapters: string[], options: { weights?: string; output?: string }) => {
    const bar = progressBar(ctx.json());
    const aborter = new AbortController();
    const onSignal = () => aborter.abort();
    process.once('SIGINT', onSignal);
    try {
      const r = await runLoraCommand(name, model, adapters, { ...options, signal: aborter.signal, ...(bar.onProgress ? { onProgress: bar.onProgress } : {}) });
      bar.stop();
      if (ctx.json()) console.log(JSON.stringify({ command: 'lora', ...r }, null, 2));
      else console.log(`${name}: active adapters ${describeAdapters(r.adapters)} on ${r.base}\nrefitted ${r.changed} weights (${(r.bytesMoved / 2 ** 20).toFixed(2)} MiB) in ${r.milliseconds.toFixed(1)} ms; wrote ${r.output}`);
    } finally {
      bar.stop();
      process.off('SIGINT', onSignal);
    }
  };
  const common = (command: Command) =>
    command
      .option('--weights <checkpoint>', 'the base checkpoint (default: the one recorded by the last lora command)')
      .option('-o, --output <file>', 'write the model here instead of in place');
  common(lora.command('apply').description('add adapters on top of the active ones').argument('<model>', 'MODEL.trtr').argument('<adapters...>', 'adapter DIR or FILE, optionally :SCALE')).action(action('apply'));
  common(lora.command('switch').description('make these adapters the active ones').argument('<model>', 'MODEL.trtr').argument('<adapters...>', 'adapter DIR or FILE, optionally :SCALE')).action(action('switch'));
  common(lora.command('remove').description('remove adapters (all when none are named): back to the base weights').argument('<model>', 'MODEL.trtr').argument('[adapters...]', 'adapters to remove')).action(action('remove'));
  return lora;
};
