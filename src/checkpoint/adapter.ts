/**
 * PEFT LoRA adapters: `adapter_config.json` (decoded for the fields that change the merged weights;
 * PEFT's many other fields are allowed and ignored) with `adapter_model.safetensors`. The tensors pair up
 * per module as `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]; the merged delta is
 * scaling * B @ A, with scaling = alpha / r (alpha / sqrt(r) with use_rslora), per-module rank and alpha
 * taken from rank_pattern / alpha_pattern where a key matches the module name.
 */
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import * as t from 'io-ts';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import type { OpenOptions } from '../safetensors/reader.js';
import { type Checkpoint, openSingleTE } from './checkpoint.js';
import { CheckpointError, type CheckpointIssue } from './errors.js';
import { allowedRoots, readConfinedText } from './confine.js';

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';

const isPositiveInteger = (u: unknown): u is number => typeof u === 'number' && Number.isSafeInteger(u) && u > 0;
const PositiveInteger = new t.Type<number, number, unknown>(
  'PositiveInteger',
  isPositiveInteger,
  (u, c) => (isPositiveInteger(u) ? t.success(u) : t.failure(u, c)),
  (a) => a,
);

/** The fields of a PEFT LoRA config that matter here; unknown fields pass (PEFT writes dozens). */
export const AdapterConfigCodec = t.intersection(
  [
    t.type({
      r: PositiveInteger,
      lora_alpha: t.number,
      target_modules: t.union([t.array(t.string), t.string]),
    }),
    t.partial({
      peft_type: t.string,
      fan_in_fan_out: t.boolean,
      use_rslora: t.boolean,
      rank_pattern: t.union([t.null, t.record(t.string, PositiveInteger)]),
      alpha_pattern: t.union([t.null, t.record(t.string, t.number)]),
      // Settings that change what the adapter does beyond W + scaling * B @ A: refused unless inert.
      use_dora: t.unknown,
      layers_to_transform: t.unknown,
      layers_pattern: t.unknown,
      modules_to_save: t.unknown,
      bias: t.unknown,
    }),
  ],
  'AdapterConfig',
);

export interface AdapterConfig {
  readonly r: number;
  readonly loraAlpha: number;
  /** A list of module-name suffixes, or one regular expression matched against the full name. */
  readonly targetModules: readonly string[] | string;
  readonly fanInFanOut: boolean;
  readonly useRslora: boolean;
  readonly rankPattern: Readonly<Record<string, number>>;
  readonly alphaPattern: Readonly<Record<string, number>>;
  /** PEFT's layers_to_transform: only modules of these layers carry the adapter (absent: every layer). */
  readonly layersToTransform?: readonly number[];
  /** PEFT's layers_pattern: the module-list names whose index counts as the layer ([]: any). */
  readonly layersPattern: readonly string[];
}

export interface LoraPair {
  /** Module name as the adapter stores it (with PEFT's `base_model.model.` prefix). */
  readonly module: string;
  readonly a: string;
  readonly b: string;
  readonly rank: number;
  readonly scaling: number;
}

export interface Adapter extends Disposable {
  readonly path: string;
  readonly config: AdapterConfig;
  readonly tensors: Checkpoint;
  readonly pairs: readonly LoraPair[];
  close(): void;
}

export const decodeAdapterConfig = (raw: unknown, path: string): E.Either<CheckpointIssue, AdapterConfig> => {
  const decoded = AdapterConfigCodec.decode(raw);
  if (E.isLeft(decoded)) {
    return E.left({ _tag: 'InvalidAdapterConfig', path, detail: PathReporter.report(decoded).slice(0, 3).join('; ') });
  }
  const c = decoded.right;
  if (c.peft_type !== undefined && c.peft_type !== 'LORA') {
    return E.left({ _tag: 'InvalidAdapterConfig', path, detail: `peft_type '${c.peft_type}' is not LORA` });
  }
  const unsupported = (setting: string, detail: string): E.Either<CheckpointIssue, AdapterConfig> =>
    E.left({ _tag: 'UnsupportedAdapterSetting', path, setting, detail: `${setting}: ${detail}` });
  const empty = (v: unknown): boolean => v === undefined || v === null || (Array.isArray(v) && v.length === 0);
  if (c.use_dora !== undefined && c.use_dora !== null && c.use_dora !== false) {
    return unsupported('use_dora', `${JSON.stringify(c.use_dora)}: DoRA adapters (weight-decomposed, with a magnitude vector) are not supported; only plain LoRA is merged`);
  }
  let layersToTransform: number[] | undefined;
  if (!empty(c.layers_to_transform)) {
    const raw = c.layers_to_transform;
    const list = typeof raw === 'number' ? [raw] : Array.isArray(raw) ? raw : undefined;
    if (list === undefined || !list.every((v) => Number.isSafeInteger(v) && (v as number) >= 0)) {
      return E.left({ _tag: 'InvalidAdapterConfig', path, detail: `layers_to_transform ${JSON.stringify(raw)} is not a layer index or a list of them` });
    }
    layersToTransform = list as number[];
  }
  let layersPattern: string[] = [];
  if (!empty(c.layers_pattern)) {
    const raw = c.layers_pattern;
    const list = typeof raw === 'string' ? [raw] : Array.isArray(raw) ? raw : undefined;
    if (list === undefined || !list.every((v) => typeof v === 'string' && v.length > 0)) {
      return E.left({ _tag: 'InvalidAdapterConfig', path, detail: `layers_pattern ${JSON.stringify(raw)} is not a name or a list of names` });
    }
    layersPattern = list as string[];
  }
  if (!empty(c.modules_to_save)) {
    return unsupported('modules_to_save', `${JSON.stringify(c.modules_to_save)}: the adapter replaces whole modules, which a LoRA merge would leave out`);
  }
  if (c.bias !== undefined && c.bias !== null && c.bias !== 'none') {
    return unsupported('bias', `${JSON.stringify(c.bias)}: the adapter trains biases, which a LoRA merge would leave out (only "none" is supported)`);
  }
  if (typeof c.lora_alpha !== 'number' || !Number.isFinite(c.lora_alpha)) {
    return E.left({ _tag: 'InvalidAdapterConfig', path, detail: `lora_alpha ${c.lora_alpha} is not a finite number` });
  }
  for (const [key, value] of Object.entries(c.alpha_pattern ?? {})) {
    if (!Number.isFinite(value)) return E.left({ _tag: 'InvalidAdapterConfig', path, detail: `alpha_pattern['${key}'] ${value} is not a finite number` });
  }
  return E.right({
    r: c.r,
    loraAlpha: c.lora_alpha,
    targetModules: c.target_modules,
    fanInFanOut: c.fan_in_fan_out ?? false,
    useRslora: c.use_rslora ?? false,
    rankPattern: c.rank_pattern ?? {},
    alphaPattern: c.alpha_pattern ?? {},
    ...(layersToTransform !== undefined ? { layersToTransform } : {}),
    layersPattern,
  });
};

const escapeRegExp = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/**
 * The layer index of a module as PEFT reads it for layers_to_transform: the number after one of the
 * layers_pattern names (`encoder.layer.3.attention` -> 3 for "layer"), or with no pattern the last
 * `<name>.<number>.` of the module name. Undefined when the name has none.
 */
export const layerIndexOf = (module: string, layersPattern: readonly string[]): number | undefined => {
  const key = module.startsWith('base_model.model.') ? module.slice('base_model.model.'.length) : module;
  const patterns = layersPattern.length > 0 ? layersPattern.map((p) => new RegExp(`^(?:.*\\.)?${escapeRegExp(p)}\\.(\\d+)\\.`)) : [/^.*\.[^.]*\.(\d+)\./, /^[^.]*\.(\d+)\./];
  for (const pattern of patterns) {
    const m = pattern.exec(key);
    if (m !== null) return Number(m[1]);
  }
  return undefined;
};

/**
 * With layers_to_transform, PEFT puts the adapter only on modules of those layers and ignores factors of
 * any other module when it loads the file. A merge that added them would serve another model than PEFT
 * does, so such a module is refused by name (undefined: every module lies in a transformed layer).
 */
export const outsideTransformedLayers = (config: AdapterConfig, module: string): string | undefined => {
  if (config.layersToTransform === undefined) return undefined;
  const index = layerIndexOf(module, config.layersPattern);
  const wanted = `layers_to_transform [${config.layersToTransform.join(', ')}]${config.layersPattern.length > 0 ? ` (layers_pattern ${config.layersPattern.map((p) => `'${p}'`).join(', ')})` : ''}`;
  if (index === undefined) return `module '${module}' has no layer index, but the adapter is restricted to ${wanted}; PEFT would not apply it`;
  if (!config.layersToTransform.includes(index)) return `module '${module}' lies in layer ${index}, outside ${wanted}; PEFT would not apply it`;
  return undefined;
};

/** PEFT's pattern lookup: the first key whose regular expression matches the end of the module name
 *  at a dot boundary. */
const patternValue = (pattern: Readonly<Record<string, number>>, module: string): number | undefined => {
  for (const [key, value] of Object.entries(pattern)) {
    let matches: boolean;
    try {
      matches = new RegExp(`^(.*\\.)?(${key})$`).test(module);
    } catch {
      matches = module === key || module.endsWith(`.${key}`);
    }
    if (matches) return value;
  }
  return undefined;
};

/** Rank and scaling of one module under a config. */
export const moduleScaling = (config: AdapterConfig, module: string): { rank: number; scaling: number } => {
  const rank = patternValue(config.rankPattern, module) ?? config.r;
  const alpha = patternValue(config.alphaPattern, module) ?? config.loraAlpha;
  return { rank, scaling: config.useRslora ? alpha / Math.sqrt(rank) : alpha / rank };
};

const FLOAT_DTYPES: ReadonlySet<string> = new Set(['F32', 'F16', 'BF16', 'F64']);

const PAIR = /^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$/;

/** Pairs lora_A / lora_B tensors per module and checks their shapes against each other and the rank. */
export const pairTensors = (
  config: AdapterConfig,
  tensors: Checkpoint,
  path: string,
): E.Either<CheckpointIssue, readonly LoraPair[]> => {
  const byModule = new Map<string, { a?: string; b?: string }>();
  for (const name of tensors.tensors.keys()) {
    const match = PAIR.exec(name);
    if (match === null) continue; // biases, modules_to_save, ...: not LoRA factors
    const [, module, which] = match as unknown as [string, string, 'A' | 'B'];
    const entry = byModule.get(module) ?? {};
    entry[which === 'A' ? 'a' : 'b'] = name;
    byModule.set(module, entry);
  }
  const pairs: LoraPair[] = [];
  for (const [module, { a, b }] of byModule) {
    const bad = (tensor: string | undefined, detail: string) => E.left<CheckpointIssue>({ _tag: 'InvalidAdapterTensors', path, tensor, detail });
    if (a === undefined || b === undefined) return bad(a ?? b, `module '${module}' has lora_${a === undefined ? 'A' : 'B'} missing`);
    for (const name of [a, b]) {
      const dtype = (tensors.tensors.get(name) as { dtype: string }).dtype;
      if (!FLOAT_DTYPES.has(dtype)) return bad(name, `LoRA factors must be floating point (F32, F16, BF16, F64); found ${dtype}`);
    }
    const shapeA = (tensors.tensors.get(a) as { shape: readonly number[] }).shape;
    const shapeB = (tensors.tensors.get(b) as { shape: readonly number[] }).shape;
    const { rank, scaling } = moduleScaling(config, module);
    if (shapeA.length !== 2 || shapeA[0] !== rank) return bad(a, `expected [${rank}, in_features], found [${shapeA.join(', ')}]`);
    if (shapeB.length !== 2 || shapeB[1] !== rank) return bad(b, `expected [out_features, ${rank}], found [${shapeB.join(', ')}]`);
    const outside = outsideTransformedLayers(config, module);
    if (outside !== undefined) return bad(a, outside);
    pairs.push({ module, a, b, rank, scaling });
  }
  return E.right(pairs.sort((x, y) => (x.module < y.module ? -1 : x.module > y.module ? 1 : 0)));
};

export const openAdapterTE =
  (directory: string, options: OpenOptions = {}): TE.TaskEither<CheckpointIssue, Adapter> =>
  async () => {
    const configPath = join(directory, ADAPTER_CONFIG);
    // The adapter's files must really lie in its folder: a link to a file elsewhere is refused.
    const roots = allowedRoots(directory);
    const text = readConfinedText(configPath, roots);
    if (E.isLeft(text)) return E.left({ _tag: 'FileRefused', path: directory, file: configPath, detail: `'${configPath}' is refused: ${text.left}` });
    let raw: unknown;
    try {
      raw = JSON.parse(text.right);
    } catch (e) {
      return E.left({ _tag: 'InvalidAdapterConfig', path: configPath, detail: `cannot read it as JSON: ${(e as Error).message}` });
    }
    const config = decodeAdapterConfig(raw, configPath);
    if (E.isLeft(config)) return config;
    const tensors = await openSingleTE(join(directory, ADAPTER_WEIGHTS), options, roots, directory)();
    if (E.isLeft(tensors)) return tensors;
    const pairs = pairTensors(config.right, tensors.right, join(directory, ADAPTER_WEIGHTS));
    if (E.isLeft(pairs)) {
      tensors.right.close();
      return pairs;
    }
    const checkpoint = tensors.right;
    return E.right({
      path: directory,
      config: config.right,
      tensors: checkpoint,
      pairs: pairs.right,
      close: () => checkpoint.close(),
      [Symbol.dispose]: () => checkpoint.close(),
    });
  };

export const openAdapter = async (directory: string, options: OpenOptions = {}): Promise<Adapter> => {
  const result = await openAdapterTE(directory, options)();
  if (E.isLeft(result)) throw new CheckpointError(result.left);
  return result.right;
};
