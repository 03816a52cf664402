/**
 * The cache wired to the native engines (ffi/): a list of networks (one model's engine segments, or one
 * tensor-parallel rank) compiled with a cache. A miss builds every network and stores its stripped
 * engine plus the canonical names of the networks that built it; a hit deserializes the stripped engines
 * and refits them with the current networks' weights.
 *
 * Names: the key ignores layer and tensor names, so a hit may come from a model whose layers and
 * tensors are named differently. The canonical order pairs them up: the current network's k-th layer in
 * canonical order is the cached engine's k-th, so its weights go to that layer's name; inputs and
 * outputs pair by position. CachedEngine translates both ways.
 */
import * as t from 'io-ts';
import * as E from 'fp-ts/lib/Either.js';
import { buildConfig, buildEngine, Engine, type BuildOptions, type HostTensor, type WeightUpdate } from '../../ffi/engine.js';
import { networkWeights, type NetworkDefinition } from '../network/types.js';
import { currentDevice, nativeBackend } from './device.js';
import { cacheKeyOrThrow, type BackendInfo, type BuildConfigRecord, type CacheKey, type CanonicalNames, type DeviceInfo, type SegmentStructure } from './key.js';
import type { Blob, CacheEntry } from './store.js';
import type { CompileSteps } from './compile.js';

export const BINDINGS_BLOB = 'bindings.json';
export const engineBlobName = (index: number): string => `engine-${index}.plan`;

const NamesCodec = t.type({ layers: t.readonlyArray(t.string), inputs: t.readonlyArray(t.string), outputs: t.readonlyArray(t.string), constants: t.readonlyArray(t.string) });
const BindingsCodec = t.type({ version: t.literal(1), segments: t.readonlyArray(NamesCodec) });

/** An engine whose input, output and layer names may differ from the network it serves. */
export class CachedEngine implements Disposable {
  constructor(
    readonly engine: Engine,
    /** current input name -> engine input name */
    private readonly inputNames: ReadonlyMap<string, string>,
    /** engine output name -> current output name */
    private readonly outputNames: ReadonlyMap<string, string>,
    /** current layer name -> engine layer name */
    readonly layerNames: ReadonlyMap<string, string>,
  ) {}

  run(inputs: Record<string, HostTensor>): Record<string, Float32Array> {
    const feeds: Record<string, HostTensor> = {};
    for (const [name, data] of Object.entries(inputs)) feeds[this.inputNames.get(name) ?? name] = data;
    const outputs = this.engine.run(feeds);
    const out: Record<string, Float32Array> = {};
    for (const [name, data] of Object.entries(outputs)) out[this.outputNames.get(name) ?? name] = data;
    return out;
  }

  /** Refits with updates addressed by the current network's layer names. */
  refit(updates: readonly WeightUpdate[]): void {
    this.engine.refit(updates.map((u) => ({ ...u, layer: this.layerNames.get(u.layer) ?? u.layer })));
  }

  [Symbol.dispose](): void {
    this.engine[Symbol.dispose]();
  }
}

const identity = (names: readonly string[]) => new Map(names.map((n) => [n, n]));

/** Pairs the current names with the cached ones by canonical position. */
const pairNames = (current: CanonicalNames, cached: CanonicalNames) => ({
  layers: new Map(current.layers.map((n, i) => [n, cached.layers[i]])),
  inputs: new Map(current.inputs.map((n, i) => [n, cached.inputs[i]])),
  outputs: new Map(cached.outputs.map((n, i) => [n, current.outputs[i]])),
});

export interface NativeCacheContext {
  readonly backend?: BackendInfo;
  readonly device?: DeviceInfo;
}

/** The key of engine networks built with `options` on this backend and device. */
export const nativeKey = (segments: readonly SegmentStructure[], options: BuildOptions, context: NativeCacheContext = {}): CacheKey =>
  cacheKeyOrThrow({ segments, build: buildConfig(options) as BuildConfigRecord, backend: context.backend ?? nativeBackend(), device: context.device ?? currentDevice() });

/** Loads engine `index` of a verified entry and refits it with `network`'s weights. */
export const loadAndRefit = (entry: CacheEntry, index: number, network: NetworkDefinition, current: CanonicalNames): CachedEngine => {
  const bindings = bindingsOf(entry);
  const cachedNames = bindings.segments[index];
  const plan = entry.blobs.get(engineBlobName(index));
  if (cachedNames === undefined || plan === undefined) throw new Error(`cache entry ${entry.key.slice(0, 12)} has no engine ${index}`);
  const names = pairNames(current, cachedNames);
  const engine = Engine.deserialize(plan);
  try {
    const cached = new CachedEngine(engine, names.inputs, names.outputs, names.layers);
    cached.refit(networkWeights(network).map((w) => ({ layer: w.layer, role: w.role, weights: w.weights })));
    return cached;
  } catch (e) {
    engine[Symbol.dispose]();
    throw e;
  }
};

export const bindingsOf = (entry: CacheEntry): t.TypeOf<typeof BindingsCodec> => {
  const blob = entry.blobs.get(BINDINGS_BLOB);
  if (blob === undefined) throw new Error(`cache entry ${entry.key.slice(0, 12)} has no ${BINDINGS_BLOB}`);
  const decoded = BindingsCodec.decode(JSON.parse(new TextDecoder().decode(blob)));
  if (E.isLeft(decoded)) throw new Error(`cache entry ${entry.key.slice(0, 12)}: ${BINDINGS_BLOB} does not decode`);
  return decoded.right;
};

export const bindingsBlob = (names: readonly CanonicalNames[]): Blob => ({ name: BINDINGS_BLOB, data: new TextEncoder().encode(JSON.stringify({ version: 1, segments: names })) });

/** Builds one network and returns it with its stripped engine file. */
export const buildStripped = (network: NetworkDefinition, options: BuildOptions): { engine: CachedEngine; plan: Uint8Array } => {
  const engine = buildEngine(network, options);
  const plan = engine.serialize({ includeWeights: false });
  return { engine: new CachedEngine(engine, identity(network.inputs.map((i) => i.name)), identity(network.outputs.map((o) => o.name)), identity(network.layers.map((l) => l.name))), plan };
};

export interface NativeEngines extends Disposable {
  readonly engines: readonly CachedEngine[];
}

const disposeAll = (engines: readonly CachedEngine[]) => engines.forEach((e) => e[Symbol.dispose]());

/** compileWithCache steps for a list of networks on the native engine. */
export const nativeEngineSteps = (networks: readonly NetworkDefinition[], options: BuildOptions = {}, context: NativeCacheContext = {}): CompileSteps<NativeEngines> & { keyValue: () => CacheKey } => {
  let key: CacheKey | undefined;
  const keyValue = () => (key ??= nativeKey(networks.map((network) => ({ kind: 'engine' as const, network })), options, context));
  const wrap = (engines: CachedEngine[]): NativeEngines => ({ engines, [Symbol.dispose]: () => disposeAll(engines) });
  return {
    keyValue,
    key: keyValue,
    build: async () => {
      const engines: CachedEngine[] = [];
      const blobs: Blob[] = [];
      try {
        networks.forEach((network, i) => {
          const built = buildStripped(network, options);
          engines.push(built.engine);
          blobs.push({ name: engineBlobName(i), data: built.plan });
        });
      } catch (e) {
        disposeAll(engines);
        throw e;
      }
      blobs.push(bindingsBlob(keyValue().names));
      return { value: wrap(engines), blobs };
    },
    load: async (entry) => {
      const names = keyValue().names;
      const engines: CachedEngine[] = [];
      try {
        networks.forEach((network, i) => engines.push(loadAndRefit(entry, i, network, names[i])));
      } catch (e) {
        disposeAll(engines);
        throw e;
      }
      return wrap(engines);
    },
  };
};
