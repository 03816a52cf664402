/**
 * LoRA adapters merged at the checkpoint level: W' = W + sum_k weight_k * scaling_k * (B_k @ A_k), laid
 * out as the base tensor is (transposed for PEFT's fan_in_fan_out, i.e. GPT-2's Conv1D stored [in, out];
 * reshaped for Conv2d). The merged checkpoint then goes through the weight map's expressions like any
 * checkpoint, so a transposed or BatchNorm-folded target gets the transposed or folded delta.
 *
 * Two formats: PEFT (`<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r], adapter_config.json
 * with r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, fan_in_fan_out) and Kohya / diffusers
 * (`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`).
 */
import * as E from 'fp-ts/lib/Either.js';
import { moduleScaling, outsideTransformedLayers, type AdapterConfig } from '../checkpoint/adapter.js';
import type { F32Tensor } from '../weightmap/evaluate.js';
import { normalizeName } from '../weightmap/match.js';
import { isFloatDtype, overlayStore, readF32, type TensorStore } from '../weightmap/store.js';

export interface LoraModule {
  /** The module as the adapter names it. */
  readonly module: string;
  /** A (PEFT) / lora_down (Kohya): [r, in] or [r, in, kh, kw]. */
  readonly down: string;
  /** B (PEFT) / lora_up (Kohya): [out, r] or [out, r, 1, 1]. */
  readonly up: string;
  readonly rank: number;
  readonly scaling: number;
  /** The base weight is stored [in, out] (GPT-2 Conv1D): the delta is transposed. */
  readonly fanInFanOut: boolean;
}

export interface LoraAdapter {
  readonly format: 'peft' | 'kohya';
  readonly modules: readonly LoraModule[];
  readonly tensors: TensorStore;
  /** PEFT's target_modules (suffixes, or one regular expression over full module names): each must name
   *  a module of the model the adapter goes on (checkAdapterTargets). */
  readonly targetModules?: readonly string[] | string;
}

export type LoraErrorDetail =
  | { readonly _tag: 'InvalidAdapter'; readonly tensor?: string; readonly detail: string }
  | { readonly _tag: 'NoBaseWeight'; readonly module: string; readonly detail: string }
  | { readonly _tag: 'DeltaShapeMismatch'; readonly module: string; readonly base: string; readonly expected: readonly number[]; readonly found: readonly number[] }
  | { readonly _tag: 'UnsupportedAdapterSetting'; readonly setting: string; readonly detail: string }
  | { readonly _tag: 'NonFiniteMerge'; readonly module: string; readonly base: string; readonly count: number; readonly scale: number };

export const describeLoraError = (e: LoraErrorDetail): string =>
  e._tag === 'InvalidAdapter' ? `LoRA adapter${e.tensor ? ` tensor '${e.tensor}'` : ''}: ${e.detail}`
  : e._tag === 'NoBaseWeight' ? `LoRA module '${e.module}': ${e.detail}`
  : e._tag === 'UnsupportedAdapterSetting' ? `LoRA adapter setting ${e.detail}`
  : e._tag === 'NonFiniteMerge' ? `LoRA module '${e.module}': merging it into '${e.base}' at scale ${e.scale} gives ${e.count} non-finite value(s) (NaN or infinity)`
  : `LoRA module '${e.module}': the delta for '${e.base}' has shape [${e.found}], the base weight [${e.expected}]`;

export class LoraError extends Error {
  override readonly name = 'LoraError';
  readonly _tag: LoraErrorDetail['_tag'];
  constructor(readonly detail: LoraErrorDetail) {
    super(describeLoraError(detail));
    this._tag = detail._tag;
  }
}

const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);
const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

const PEFT = /^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$/;

/** PEFT modules of an adapter: lora_A / lora_B pairs, with rank and scaling from the config. */
export const peftModules = (config: AdapterConfig, tensors: TensorStore): E.Either<LoraErrorDetail, LoraModule[]> => {
  const byModule = new Map<string, { a?: string; b?: string }>();
  for (const name of tensors.tensors.keys()) {
    const m = PEFT.exec(name);
    if (m === null) continue;
    const entry = byModule.get(m[1]) ?? {};
    if (m[2] === 'A') entry.a = name;
    else entry.b = name;
    byModule.set(m[1], entry);
  }
  const out: LoraModule[] = [];
  for (const [module, { a, b }] of [...byModule].sort(([x], [y]) => compare(x, y))) {
    if (a === undefined || b === undefined) return E.left({ _tag: 'InvalidAdapter', tensor: a ?? b, detail: `module '${module}' has no lora_${a === undefined ? 'A' : 'B'}` });
    for (const name of [a, b]) {
      const dtype = tensors.tensors.get(name)!.dtype;
      if (!isFloatDtype(dtype)) return E.left({ _tag: 'InvalidAdapter', tensor: name, detail: `LoRA factors must be floating point (F32, F16, BF16, F64); found ${dtype}` });
    }
    const outside = outsideTransformedLayers(config, module);
    if (outside !== undefined) return E.left({ _tag: 'UnsupportedAdapterSetting', setting: 'layers_to_transform', detail: `layers_to_transform: ${outside}` });
    const { rank, scaling } = moduleScaling(config, module);
    const sa = tensors.tensors.get(a)!.shape;
    const sb = tensors.tensors.get(b)!.shape;
    if (sa[0] !== rank || sb[1] !== rank) return E.left({ _tag: 'InvalidAdapter', tensor: a, detail: `rank ${rank} expected; lora_A is [${sa}], lora_B is [${sb}]` });
    out.push({ module, down: a, up: b, rank, scaling, fanInFanOut: config.fanInFanOut });
  }
  return out.length === 0 ? E.left({ _tag: 'InvalidAdapter', detail: 'no lora_A / lora_B tensors' }) : E.right(out);
};

const KOHYA = /^(.*)\.lora_(down|up)\.weight$/;

/** Kohya / diffusers modules: lora_down / lora_up pairs; scaling alpha / rank (alpha defaults to rank). */
export const kohyaModules = (tensors: TensorStore): E.Either<LoraErrorDetail, LoraModule[]> => {
  const byModule = new Map<string, { down?: string; up?: string }>();
  for (const name of tensors.tensors.keys()) {
    const m = KOHYA.exec(name);
    if (m === null) continue;
    const entry = byModule.get(m[1]) ?? {};
    if (m[2] === 'down') entry.down = name;
    else entry.up = name;
    byModule.set(m[1], entry);
  }
  const out: LoraModule[] = [];
  for (const [module, { down, up }] of [...byModule].sort(([x], [y]) => compare(x, y))) {
    if (down === undefined || up === undefined) return E.left({ _tag: 'InvalidAdapter', tensor: down ?? up, detail: `module '${module}' has no lora_${down === undefined ? 'down' : 'up'}` });
    const alphaName = `${module}.alpha`;
    for (const name of [down, up, ...(tensors.tensors.has(alphaName) ? [alphaName] : [])]) {
      const dtype = tensors.tensors.get(name)!.dtype;
      if (!isFloatDtype(dtype)) return E.left({ _tag: 'InvalidAdapter', tensor: name, detail: `LoRA tensors must be floating point (F32, F16, BF16, F64); found ${dtype}` });
    }
    const rank = tensors.tensors.get(down)!.shape[0];
    if (tensors.tensors.get(up)!.shape[1] !== rank) return E.left({ _tag: 'InvalidAdapter', tensor: up, detail: `lora_up's second dimension is not the rank ${rank}` });
    const alpha = tensors.tensors.has(alphaName) ? tensors.toFloat32(alphaName)[0] : rank;
    out.push({ module, down, up, rank, scaling: alpha / rank, fanInFanOut: false });
  }
  return out.length === 0 ? E.left({ _tag: 'InvalidAdapter', detail: 'no lora_down / lora_up tensors' }) : E.right(out);
};

const KOHYA_PREFIXES = ['lora_unet_', 'lora_te1_', 'lora_te2_', 'lora_te_', 'lora_'];

/** The base checkpoint tensor a module's delta is added to. */
export const baseWeightOf = (module: LoraModule, format: 'peft' | 'kohya', base: TensorStore): string | undefined => {
  const names = [...base.tensors.keys()].filter((n) => n.endsWith('.weight'));
  if (format === 'peft') {
    const want = normalizeName(module.module);
    const exact = names.filter((n) => normalizeName(n.slice(0, -'.weight'.length)) === want);
    if (exact.length === 1) return exact[0];
    const bySuffix = names.filter((n) => normalizeName(n.slice(0, -'.weight'.length)).endsWith(`.${want}`) || want.endsWith(`.${normalizeName(n.slice(0, -'.weight'.length))}`));
    return bySuffix.length === 1 ? bySuffix[0] : undefined;
  }
  const prefix = KOHYA_PREFIXES.find((p) => module.module.startsWith(p)) ?? '';
  const key = module.module.slice(prefix.length);
  const flat = (n: string) => n.slice(0, -'.weight'.length).replace(/\./g, '_');
  const exact = names.filter((n) => flat(n) === key);
  if (exact.length === 1) return exact[0];
  const bySuffix = names.filter((n) => flat(n).endsWith(`_${key}`) || key.endsWith(`_${flat(n)}`));
  return bySuffix.length === 1 ? bySuffix[0] : undefined;
};

/** scale * up @ down, as a [out, in * kh * kw] matrix (float64 accumulation, rounded once). */
export const loraDelta = (up: F32Tensor, down: F32Tensor, scale: number): F32Tensor => {
  const out = up.shape[0];
  const rank = up.shape[1];
  const inner = count(down.shape) / rank;
  const result = new Float32Array(out * inner);
  const row = new Float64Array(inner);
  for (let o = 0; o < out; o++) {
    row.fill(0);
    for (let r = 0; r < rank; r++) {
      const u = up.data[o * count(up.shape.slice(1)) + r * count(up.shape.slice(2))];
      if (u === 0) continue;
      const d = r * inner;
      for (let i = 0; i < inner; i++) row[i] += u * down.data[d + i];
    }
    for (let i = 0; i < inner; i++) result[o * inner + i] = Math.fround(row[i] * scale);
  }
  return { shape: [out, inner], data: result };
};

export interface WeightedAdapter {
  readonly adapter: LoraAdapter;
  /** Multiplies the adapter's own scaling (1 = as trained). */
  readonly weight: number;
}

/**
 * The base checkpoint with every adapter's delta added to its target weights (float32). Several adapters
 * may touch the same weight; deltas add in the order given. The base store is not changed; with no
 * adapters the base store itself is returned.
 */
const PEFT_PREFIX = 'base_model.model.';
const FLOAT32_MAX = 3.4028234663852886e38;

/**
 * Refuses what a merge would otherwise serve silently: a PEFT target_modules entry that names no module of
 * the model (no base checkpoint weight, and no module of the adapter, matches it), and an adapter weight
 * that is not a finite number.
 */
export const checkAdapterTargets = (base: TensorStore, adapters: readonly WeightedAdapter[]): E.Either<LoraErrorDetail, void> => {
  let modules: string[] | undefined;
  for (const { adapter, weight } of adapters) {
    if (!Number.isFinite(weight)) return E.left({ _tag: 'UnsupportedAdapterSetting', setting: 'scale', detail: `scale: ${weight} is not a finite number` });
    // The delta is float32: a factor beyond its range is infinity times every factor product.
    const beyond = adapter.modules.find((m) => !(Math.abs(m.scaling * weight) <= FLOAT32_MAX));
    if (beyond !== undefined) return E.left({ _tag: 'UnsupportedAdapterSetting', setting: 'scale', detail: `scale: ${weight} times module '${beyond.module}''s scaling ${beyond.scaling} is beyond float32's range` });
    const targets = adapter.targetModules;
    if (adapter.format !== 'peft' || targets === undefined) continue;
    modules ??= [
      ...[...base.tensors.keys()].filter((n) => n.endsWith('.weight')).map((n) => n.slice(0, -'.weight'.length)),
      ...adapters.flatMap((a) => a.adapter.modules.map((m) => (m.module.startsWith(PEFT_PREFIX) ? m.module.slice(PEFT_PREFIX.length) : m.module))),
    ];
    const names = modules;
    if (typeof targets === 'string') {
      let pattern: RegExp;
      try {
        pattern = new RegExp(`^(?:${targets})$`);
      } catch (e) {
        return E.left({ _tag: 'UnsupportedAdapterSetting', setting: 'target_modules', detail: `target_modules: '${targets}' is not a regular expression: ${(e as Error).message}` });
      }
      if (!names.some((n) => pattern.test(n) || pattern.test(`${PEFT_PREFIX}${n}`))) {
        return E.left({ _tag: 'UnsupportedAdapterSetting', setting: 'target_modules', detail: `target_modules: '${targets}' matches no module of the model` });
      }
    } else {
      const missing = targets.filter((t) => !names.some((n) => n === t || n.endsWith(`.${t}`)));
      if (missing.length > 0) {
        return E.left({ _tag: 'UnsupportedAdapterSetting', setting: 'target_modules', detail: `target_modules: ${missing.map((m) => `'${m}'`).join(', ')} match${missing.length === 1 ? 'es' : ''} no module of the model` });
      }
    }
  }
  return E.right(undefined);
};

export const mergeAdapters = (base: TensorStore, adapters: readonly WeightedAdapter[]): E.Either<LoraErrorDetail, TensorStore> => {
  if (adapters.length === 0) return E.right(base);
  const checked = checkAdapterTargets(base, adapters);
  if (E.isLeft(checked)) return checked;
  const merged = new Map<string, F32Tensor>();
  for (const { adapter, weight } of adapters) {
    for (const m of adapter.modules) {
      const target = baseWeightOf(m, adapter.format, base);
      if (target === undefined) return E.left({ _tag: 'NoBaseWeight', module: m.module, detail: 'no base checkpoint weight of that module (or more than one)' });
      const current = merged.get(target) ?? readF32(base, target);
      if (current === undefined) return E.left({ _tag: 'NoBaseWeight', module: m.module, detail: `base tensor '${target}' is not a float tensor` });
      const up = readF32(adapter.tensors, m.up)!;
      const down = readF32(adapter.tensors, m.down)!;
      const delta = loraDelta(up, down, m.scaling * weight);
      const [rows, cols] = delta.shape;
      // fan_in_fan_out: the base is [in, out]; the delta [out, in] goes in transposed.
      const expected = m.fanInFanOut ? [cols, rows] : [rows, cols];
      if (count(current.shape) !== rows * cols || (m.fanInFanOut ? current.shape[0] !== cols : current.shape[0] !== rows)) {
        return E.left({ _tag: 'DeltaShapeMismatch', module: m.module, base: target, expected: current.shape, found: expected });
      }
      const data = Float32Array.from(current.data);
      if (m.fanInFanOut) {
        for (let o = 0; o < rows; o++) for (let i = 0; i < cols; i++) data[i * rows + o] = Math.fround(data[i * rows + o] + delta.data[o * cols + i]);
      } else {
        for (let k = 0; k < data.length; k++) data[k] = Math.fround(data[k] + delta.data[k]);
      }
      let bad = 0;
      for (let k = 0; k < data.length; k++) if (!Number.isFinite(data[k]) && Number.isFinite(current.data[k])) bad++;
      if (bad > 0) return E.left({ _tag: 'NonFiniteMerge', module: m.module, base: target, count: bad, scale: m.scaling * weight });
      merged.set(target, { shape: current.shape, data });
    }
  }
  return E.right(overlayStore(base, merged));
};
