/**
 * The cache key: sha256 of the canonical structure of a model's segments (canonical.ts says why equal
 * forms mean equal computations, and why renaming tensors or reordering independent nodes keeps the form),
 * of how the segments are wired to each other, of the build configuration, of the backend (name, version,
 * ABI version) and of the device. Weight values are never read: only their dtype and shape, so hashing
 * costs time in the number of layers, not in the size of the model.
 *
 * Pure: the backend and device descriptions are inputs (device.ts reads them from the machine).
 */
import { createHash } from 'node:crypto';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import type { Layer, NetworkDefinition, Weights } from '../network/types.js';
import type { Attribute, Node, TensorType } from '../trace/ir.js';
import { canonicalizeDag, type CanonicalError, type Dag, type DagNode } from './canonical.js';

export interface BackendInfo {
  readonly name: string;
  readonly version: string;
  readonly abi: number;
}

export interface DeviceInfo {
  readonly kind: string;
  readonly model: string;
  /** Instruction-set features relevant to kernels, sorted. */
  readonly features: readonly string[];
}

export type BuildConfigValue = string | number | boolean;
export type BuildConfigRecord = Readonly<Record<string, BuildConfigValue>>;

/** The structure of a fallback segment (ONNX nodes run by ONNX Runtime). */
export interface FallbackStructure {
  readonly opset: number;
  readonly nodes: readonly Node[];
  readonly inputs: ReadonlyArray<{ readonly name: string; readonly type: TensorType }>;
  readonly outputs: readonly string[];
  /** Initializers the segment reads: their names are rebound on a hit like weights, values not hashed. */
  readonly constants: ReadonlyArray<{ readonly name: string; readonly type: TensorType }>;
}

export type SegmentStructure = { readonly kind: 'engine'; readonly network: NetworkDefinition } | ({ readonly kind: 'fallback' } & FallbackStructure);

export interface KeyInput {
  /** In run order; a segment's inputs are graph inputs or outputs of earlier segments, by name. */
  readonly segments: readonly SegmentStructure[];
  readonly build: BuildConfigRecord;
  readonly backend: BackendInfo;
  readonly device: DeviceInfo;
}

/** Names of one segment in canonical order: what a hit uses to address another model's engine. */
export interface CanonicalNames {
  /** Layer (engine) or node (fallback) names in canonical order. */
  readonly layers: readonly string[];
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  /** Fallback initializers in canonical order (empty for engines). */
  readonly constants: readonly string[];
}

export interface SegmentKeyPart {
  readonly kind: 'engine' | 'fallback';
  readonly digest: string;
  readonly layers: number;
  readonly weights: number;
}

/** The key's parts in clear (stored in the manifest; `ls` prints them). */
export interface KeyParts {
  readonly format: 1;
  readonly segments: readonly SegmentKeyPart[];
  readonly wiring: string;
  readonly build: BuildConfigRecord;
  readonly backend: BackendInfo;
  readonly device: DeviceInfo;
}

export interface CacheKey {
  /** 64 hex digits. */
  readonly digest: string;
  readonly parts: KeyParts;
  /** Per segment, in the order given. */
  readonly names: readonly CanonicalNames[];
}

export const KeyPartsCodec: t.Type<KeyParts> = t.type({
  format: t.literal(1),
  segments: t.readonlyArray(t.type({ kind: t.keyof({ engine: null, fallback: null }), digest: t.string, layers: t.number, weights: t.number })),
  wiring: t.string,
  build: t.record(t.string, t.union([t.string, t.number, t.boolean])),
  backend: t.type({ name: t.string, version: t.string, abi: t.number }),
  device: t.type({ kind: t.string, model: t.string, features: t.readonlyArray(t.string) }),
}) as unknown as t.Type<KeyParts>;

export type KeyError = { readonly _tag: 'InvalidStructure'; readonly segment: number; readonly detail: CanonicalError };

export class KeyErrorException extends Error {
  override readonly name = 'KeyError';
  readonly _tag: KeyError['_tag'];
  constructor(readonly detail: KeyError) {
    super(`segment ${detail.segment}: ${detail.detail._tag === 'UndefinedTensor' ? `'${detail.detail.node}' reads '${detail.detail.tensor}', which nothing before it defines` : `'${detail.detail.node}' defines '${detail.detail.tensor}' a second time`}`);
    this._tag = detail._tag;
  }
}

/** JSON with object keys sorted, so equal values print alike. */
export const stableJson = (value: unknown): string => {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  if (Array.isArray(value)) return `[${value.map(stableJson).join(',')}]`;
  const record = value as Record<string, unknown>;
  return `{${Object.keys(record).filter((k) => record[k] !== undefined).sort().map((k) => `${JSON.stringify(k)}:${stableJson(record[k])}`).join(',')}}`;
};

const weightShape = (w: Weights): string => `w(${w.dtype};${w.shape.join('x')})`;

const isWeights = (v: unknown): v is Weights => typeof v === 'object' && v !== null && 'data' in v && ArrayBuffer.isView((v as Weights).data);

/** The operand fields of each layer kind, in operand order. */
const operandsOf = (layer: Layer): readonly string[] => {
  switch (layer.kind) {
    case 'matrixMultiply': case 'elementwise': return [layer.a, layer.b];
    case 'concatenation': return layer.inputs;
    case 'gather': return [layer.data, layer.indices];
    case 'constant': return [];
    default: return [layer.input];
  }
};
const operandFields = new Set(['name', 'output', 'input', 'a', 'b', 'inputs', 'data', 'indices']);

/** Everything about a layer but its names and operands: kind, attributes, weight dtypes and shapes. */
export const layerLabel = (layer: Layer): string => {
  const fields: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(layer)) {
    if (operandFields.has(k)) continue;
    fields[k] = isWeights(v) ? weightShape(v) : v;
  }
  return stableJson(fields);
};

export const networkDag = (net: NetworkDefinition): Dag => ({
  sources: net.inputs.map((i) => ({ name: i.name, label: `${i.dtype}[${i.shape.join(',')}]` })),
  nodes: net.layers.map((l): DagNode => ({ name: l.name, label: layerLabel(l), inputs: operandsOf(l), outputs: [l.output] })),
  sinks: net.outputs.map((o) => o.tensor),
});

const attributeLabel = (a: Attribute): unknown => {
  if (a.kind !== 'tensor') return a;
  // Tensor attributes are attributes, not weights: their values count (they are small).
  const bytes = new Uint8Array(a.value.data.buffer, a.value.data.byteOffset, a.value.data.byteLength);
  return { kind: 'tensor', dtype: a.value.dtype, shape: a.value.shape, sha256: createHash('sha256').update(bytes).digest('hex') };
};

export const fallbackDag = (f: FallbackStructure): Dag => {
  const typeLabel = (t: TensorType) => `${t.dtype}[${t.shape.join(',')}]`;
  return {
    sources: f.inputs.map((i) => ({ name: i.name, label: typeLabel(i.type) })),
    // Initializers are leaf nodes (named like weights), so their order in the list does not matter.
    nodes: [
      ...f.constants.map((c): DagNode => ({ name: c.name, label: `initializer ${typeLabel(c.type)}`, inputs: [], outputs: [c.name] })),
      ...f.nodes.map((node): DagNode => ({
        name: node.name,
        label: stableJson({ op: node.opType, domain: node.domain, attributes: Object.fromEntries(Object.entries(node.attributes).map(([k, a]) => [k, attributeLabel(a)])) }),
        inputs: node.inputs,
        outputs: node.outputs,
      })),
    ],
    sinks: f.outputs,
  };
};

const sha256 = (pieces: Iterable<string>): string => {
  const h = createHash('sha256');
  for (const p of pieces) h.update(p);
  return h.digest('hex');
};

interface SegmentCanon {
  readonly part: SegmentKeyPart;
  readonly names: CanonicalNames;
}

const canonicalSegment = (segment: SegmentStructure, index: number): E.Either<KeyError, SegmentCanon> => {
  const dag = segment.kind === 'engine' ? networkDag(segment.network) : fallbackDag(segment);
  const c = canonicalizeDag(dag);
  if (!c.ok) return E.left({ _tag: 'InvalidStructure', segment: index, detail: c.error });
  const header = segment.kind === 'engine' ? 'engine\n' : `fallback opset ${segment.opset}\n`;
  const digest = sha256([header, ...c.value.pieces]);
  const ordered = c.value.order.map((i) => dag.nodes[i].name);
  if (segment.kind === 'engine') {
    const weights = segment.network.layers.reduce((sum, l) => sum + Object.values(l).filter(isWeights).length, 0);
    return E.right({
      part: { kind: 'engine', digest, layers: segment.network.layers.length, weights },
      names: { layers: ordered, inputs: segment.network.inputs.map((i) => i.name), outputs: segment.network.outputs.map((o) => o.name), constants: [] },
    });
  }
  const constantNames = new Set(segment.constants.map((k) => k.name));
  return E.right({
    part: { kind: 'fallback', digest, layers: segment.nodes.length, weights: segment.constants.length },
    names: { layers: ordered.filter((name) => !constantNames.has(name)), inputs: segment.inputs.map((i) => i.name), outputs: [...segment.outputs], constants: ordered.filter((name) => constantNames.has(name)) },
  });
};

/** How segments feed each other, by position: each segment input is a graph input (`g<k>`, numbered in
 *  order of first use) or output `j` of an earlier segment `s` (`s<s>.<j>`). */
const wiringOf = (segments: readonly SegmentStructure[]): string => {
  const produced = new Map<string, string>();
  const external = new Map<string, number>();
  const lines: string[] = [];
  segments.forEach((segment, s) => {
    const inputs = segment.kind === 'engine' ? segment.network.inputs.map((i) => i.name) : segment.inputs.map((i) => i.name);
    lines.push(inputs.map((name) => {
      const p = produced.get(name);
      if (p !== undefined) return p;
      if (!external.has(name)) external.set(name, external.size);
      return `g${external.get(name)}`;
    }).join(' '));
    const outputs = segment.kind === 'engine' ? segment.network.outputs.map((o) => o.name) : segment.outputs;
    outputs.forEach((name, j) => produced.set(name, `s${s}.${j}`));
  });
  return lines.join('\n');
};

export const cacheKey = (input: KeyInput): E.Either<KeyError, CacheKey> => {
  const canon: SegmentCanon[] = [];
  for (let i = 0; i < input.segments.length; i++) {
    const c = canonicalSegment(input.segments[i], i);
    if (E.isLeft(c)) return c;
    canon.push(c.right);
  }
  const device: DeviceInfo = { ...input.device, features: [...input.device.features].sort() };
  const parts: KeyParts = {
    format: 1,
    segments: canon.map((c) => c.part),
    wiring: sha256([wiringOf(input.segments)]),
    build: input.build,
    backend: input.backend,
    device,
  };
  return E.right({ digest: sha256(['trt-refit cache key\n', stableJson(parts)]), parts, names: canon.map((c) => c.names) });
};

/** The key of a list of engine networks (one model's engine segments, or one tensor-parallel rank). */
export const networksKey = (networks: readonly NetworkDefinition[], rest: Omit<KeyInput, 'segments'>): E.Either<KeyError, CacheKey> =>
  cacheKey({ ...rest, segments: networks.map((network) => ({ kind: 'engine' as const, network })) });

export const cacheKeyOrThrow = (input: KeyInput): CacheKey => {
  const r = cacheKey(input);
  if (E.isLeft(r)) throw new KeyErrorException(r.left);
  return r.right;
};
