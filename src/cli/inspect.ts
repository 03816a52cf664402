/**
 * `trt-refit inspect MODEL.trtr [--weights]`: what a compiled model holds, from its header alone (no engine
 * is built): inputs and outputs, segments (engine or ONNX Runtime fallback, layers, weights, blob sizes,
 * operator types, why operators fell back), the weight map's coverage, every weight with its checkpoint
 * sources and whether it still holds its build values, and the LoRA state the lora commands recorded.
 */
import { stat } from 'node:fs/promises';
import type { Command } from 'commander';
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { readModelHeaderTE, ModelFileError } from '../model/file.js';
import type { ModelHeader, TensorDesc } from '../model/format.js';
import { exprSources } from '../weightmap/expr.js';
import { coverage } from '../weightmap/map.js';
import { currentLoraState, type CliContext } from './lora.js';

const Shape = t.readonlyArray(t.number);
const TensorDescJson = t.type({ name: t.string, dtype: t.string, shape: Shape });

/** The `--json` document of `inspect` (tests decode it with this codec). */
export const InspectJsonCodec = t.type({
  command: t.literal('inspect'),
  path: t.string,
  bytes: t.number,
  version: t.number,
  build: t.type({ weightPrecision: t.string, tacticSearch: t.boolean, allowUnmapped: t.boolean, source: t.string }),
  inputs: t.readonlyArray(TensorDescJson),
  outputs: t.readonlyArray(t.string),
  segments: t.readonlyArray(t.type({
    index: t.number, kind: t.keyof({ engine: null, fallback: null }), inputs: t.readonlyArray(t.string), outputs: t.readonlyArray(t.string),
    bytes: t.number, nodes: t.number, opTypes: t.readonlyArray(t.string), weights: t.number,
  })),
  fallbackReasons: t.readonlyArray(t.type({ node: t.string, reason: t.string })),
  coverage: t.type({ mapped: t.number, constant: t.number, unmapped: t.readonlyArray(t.string), refitted: t.number }),
  weights: t.readonlyArray(t.type({
    id: t.string, kind: t.keyof({ engine: null, fallback: null }), segment: t.number, status: t.keyof({ mapped: null, constant: null, unmapped: null }),
    dtype: t.string, shape: Shape, bytes: t.number, sources: t.readonlyArray(t.string), methods: t.readonlyArray(t.string),
    holds: t.keyof({ built: null, refitted: null, constant: null }),
  })),
  lora: t.union([t.null, t.type({ base: t.string, adapters: t.readonlyArray(t.type({ path: t.string, weight: t.number })), stale: t.boolean })]),
  /** Choices among equal-valued checkpoint tensors and the evidence that settled them. */
  settled: t.readonlyArray(t.type({ target: t.string, chosen: t.string, alternatives: t.readonlyArray(t.string), evidence: t.string })),
  /** Checkpoint tensors no weight reads, and why: a refit that changes them is refused. */
  pinned: t.readonlyArray(t.intersection([t.type({ name: t.string, kind: t.string, reason: t.string }), t.partial({ twin: t.string })])),
});
export type InspectJson = t.TypeOf<typeof InspectJsonCodec>;

const bytesPer = (dtype: string): number => (dtype === 'float64' || dtype === 'int64' || dtype === 'uint64' ? 8 : dtype === 'float16' || dtype === 'bfloat16' || dtype === 'int16' || dtype === 'uint16' ? 2 : dtype === 'int8' || dtype === 'uint8' || dtype === 'bool' ? 1 : 4);

/** The inspect document of a header (pure). */
export const describeModel = (path: string, fileBytes: number, header: ModelHeader, lora: InspectJson['lora']): InspectJson => {
  const map = header.weightMap;
  const cover = coverage(map);
  const holds = (id: string, status: string, built: string): 'built' | 'refitted' | 'constant' =>
    status !== 'mapped' ? 'constant' : (header.current[id] ?? built) === built ? 'built' : 'refitted';
  const weights = map.targets.map((w) => ({
    id: w.id, kind: w.kind, segment: w.segment, status: w.status, dtype: w.dtype, shape: [...w.shape],
    bytes: w.shape.reduce((a, b) => a * b, 1) * bytesPer(w.dtype),
    sources: w.status === 'mapped' ? exprSources(w.expr) : [], methods: [...w.methods], holds: holds(w.id, w.status, w.built.sourceDigest),
  }));
  const partition = new Map(header.partition.segments.map((s) => [s.index, s]));
  return {
    command: 'inspect', path, bytes: fileBytes, version: header.version, build: header.build,
    inputs: header.inputs.map((i: TensorDesc) => ({ name: i.name, dtype: i.dtype, shape: [...i.shape] })),
    outputs: [...header.outputs],
    segments: header.segments.map((s) => ({
      index: s.index, kind: s.kind, inputs: [...s.inputs], outputs: [...s.outputs], bytes: s.blob.length,
      nodes: partition.get(s.index)?.nodes ?? 0, opTypes: [...(partition.get(s.index)?.opTypes ?? [])],
      weights: weights.filter((w) => w.segment === s.index).length,
    })),
    fallbackReasons: [...header.partition.fallbackReasons],
    coverage: { mapped: cover.mapped, constant: cover.constant, unmapped: [...cover.unmapped], refitted: weights.filter((w) => w.holds === 'refitted').length },
    weights,
    lora,
    settled: map.ties.map((x) => ({ target: x.target, chosen: x.chosen, alternatives: [...x.alternatives], evidence: x.evidence ?? 'unrecorded' })),
    pinned: (map.pinned ?? []).map((p) => ({ name: p.name, kind: p.kind, reason: p.reason, ...(p.twin !== undefined ? { twin: p.twin } : {}) })),
  };
};

const human = (bytes: number): string => (bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(2)} MiB` : bytes >= 1024 ? `${(bytes / 1024).toFixed(1)} KiB` : `${bytes} B`);
const tensor = (d: { name: string; dtype: string; shape: readonly number[] }) => `${d.name} ${d.dtype}[${d.shape.join(',')}]`;

/** The text form of the inspect document. */
export const formatInspect = (doc: InspectJson, listWeights: boolean): string => {
  const lines = [
    `${doc.path}: compiled model (format ${doc.version}), ${human(doc.bytes)}; built from ${doc.build.source || '(unknown)'} at ${doc.build.weightPrecision}${doc.build.tacticSearch ? ', tactic search' : ''}`,
    `inputs:  ${doc.inputs.map(tensor).join(', ')}`,
    `outputs: ${doc.outputs.join(', ')}`,
    `segments: ${doc.segments.filter((s) => s.kind === 'engine').length} engine, ${doc.segments.filter((s) => s.kind === 'fallback').length} fallback (ONNX Runtime)`,
    ...doc.segments.map((s) => `  ${String(s.index).padStart(3)} ${s.kind.padEnd(8)} ${String(s.nodes).padStart(5)} nodes ${String(s.weights).padStart(5)} weights ${human(s.bytes).padStart(10)}  ${s.opTypes.join(' ')}`),
    ...doc.fallbackReasons.map((r) => `  fallback ${r.node}: ${r.reason}`),
    `weights: ${doc.coverage.mapped} mapped to the checkpoint, ${doc.coverage.constant} graph constants, ${doc.coverage.unmapped.length} unmapped; ${doc.coverage.refitted} refitted since the build`,
    ...doc.coverage.unmapped.map((id) => `  UNMAPPED ${id}`),
    ...(doc.settled.length > 0 ? [`equal-valued candidates settled: ${doc.settled.length}`] : []),
    ...doc.settled.map((x) => `  ${x.target} <- ${x.chosen} by ${x.evidence}${x.alternatives.length > 0 ? ` (not ${x.alternatives.join(', ')})` : ''}`),
    ...(doc.pinned.length > 0 ? [`pinned checkpoint tensors (a refit that changes them is refused): ${doc.pinned.length}`] : []),
    ...doc.pinned.map((p) => `  ${p.name} (${p.kind}): ${p.reason}`),
    doc.lora === null ? 'lora: none recorded' : `lora: ${doc.lora.adapters.length === 0 ? 'no adapters' : doc.lora.adapters.map((a) => `${a.path}:${a.weight}`).join(', ')} on ${doc.lora.base}${doc.lora.stale ? ' (STALE: the model was refitted since)' : ''}`,
  ];
  if (listWeights) for (const w of doc.weights) lines.push(`  ${w.id}  ${w.dtype}[${w.shape.join(',')}]  ${w.holds}${w.sources.length > 0 ? `  <- ${w.sources.join(', ')} (${w.methods.join(', ')})` : ''}`);
  return lines.join('\n');
};

/** Reads a model's header (and LoRA state) into the inspect document; rejects with ModelFileError. */
export const inspectModel = async (path: string): Promise<InspectJson> => {
  const header = await readModelHeaderTE(path)();
  if (E.isLeft(header)) throw new ModelFileError(header.left);
  const { size } = await stat(path);
  const { state, stale } = await currentLoraState(path, header.right);
  return describeModel(path, size, header.right, state === undefined ? null : { base: state.base, adapters: state.adapters, stale });
};

/** Registers `inspect`. */
export const registerInspectCommand = (program: Command, ctx: CliContext): Command =>
  program
    .command('inspect')
    .description('show a compiled model: segments, weights and their checkpoint sources, map coverage, LoRA state (reads the header only)')
    .argument('<model>', 'MODEL.trtr')
    .option('--weights', 'list every weight with its checkpoint sources')
    .action(async (model: string, options: { weights?: boolean }) => {
      const doc = await inspectModel(model);
      console.log(ctx.json() ? JSON.stringify(doc, null, 2) : formatInspect(doc, options.weights === true));
    });
