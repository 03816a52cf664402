/**
 * The matcher's evidence rules (src/weightmap/match.ts settle / settleBatchNorm) and what they mean on
 * real exports: equal-valued checkpoint tensors are told apart by names, Identity aliases and module
 * scopes, or compile refuses with AmbiguousWeights; a map file settles what evidence cannot; checkpoint
 * tensors no weight reads are pinned, and a plan that changes one is refused.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { settle, settleBatchNorm, isAmbiguity, isDegenerate, noEvidence } from '../src/weightmap/match.js';
import { compile, CompileError } from '../src/compile/compile.js';
import { exprSources } from '../src/weightmap/expr.js';
import { planRefit } from '../src/plan/plan.js';
import { memoryStore } from '../src/weightmap/store.js';
import { ModelProtoType } from '../src/trace/onnx-schema.js';
import { fixture, temporaryDirectory } from './e2e-support.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { readSafetensors } from './support/h5-safetensors.js';

describe('settle: evidence decides among equal-valued candidates, never name similarity', () => {
  const cands = ['blocks.0.attn.proj.bias', 'blocks.0.norm1.bias', 'blocks.1.attn.proj.bias'];
  it('the use\'s own name, then an Identity alias, then `<scope>.<suffix>`', () => {
    expect(settle(cands, { names: ['blocks.0.norm1.bias'], aliases: [], scopes: [] }, 'bias', true)).toMatchObject({ chosen: 'blocks.0.norm1.bias', by: 'name' });
    expect(settle(cands, { names: [], aliases: ['blocks.1.attn.proj.bias'], scopes: [] }, 'bias', true)).toMatchObject({ chosen: 'blocks.1.attn.proj.bias', by: 'alias' });
    expect(settle(cands, { names: [], aliases: [], scopes: ['blocks.0.attn.proj'] }, 'bias', true)).toMatchObject({ chosen: 'blocks.0.attn.proj.bias', by: 'scope' });
  });
  it('a parent scope, a similar name or no evidence at all is ambiguous for degenerate values', () => {
    expect(isAmbiguity(settle(cands, { names: [], aliases: [], scopes: ['blocks.0'] }, 'bias', true))).toBe(true);
    expect(isAmbiguity(settle(cands, { names: ['blocks.0.attn.proj.weight'], aliases: [], scopes: [] }, 'bias', true))).toBe(true);
    expect(isAmbiguity(settle(cands, noEvidence, 'bias', true))).toBe(true);
  });
  it('non-degenerate equal values are one tied tensor: either serves', () => {
    expect(settle(['lm_head.weight', 'wte.weight'], noEvidence, 'weight', false)).toMatchObject({ by: 'tied' });
  });
  it('property: the chosen candidate is always one the evidence names exactly, or the values are tied', () => {
    const name = fc.constantFrom('a', 'b', 'c').chain((m) => fc.constantFrom(`${m}.bias`, `${m}.weight`, `x.${m}.bias`));
    fc.assert(fc.property(fc.uniqueArray(name, { minLength: 2, maxLength: 6 }), fc.array(name, { maxLength: 2 }), fc.array(name, { maxLength: 2 }), fc.array(fc.constantFrom('a', 'b', 'x.a', 'c'), { maxLength: 2 }), fc.boolean(), (candidates, names, aliases, scopes, degenerate) => {
      const s = settle(candidates, { names, aliases, scopes }, 'bias', degenerate);
      if (isAmbiguity(s)) {
        expect([...s.candidates].sort()).toEqual([...new Set(candidates)].sort());
        return;
      }
      expect(candidates).toContain(s.chosen);
      if (s.by === 'name') expect(names).toContain(s.chosen);
      else if (s.by === 'alias') expect(aliases).toContain(s.chosen);
      else if (s.by === 'scope') expect(scopes.map((x) => `${x}.bias`)).toContain(s.chosen);
      else expect({ by: s.by, degenerate }).toEqual({ by: 'tied', degenerate: false });
    }), { numRuns: 300 });
  });
  it('degenerate: at most two distinct values', () => {
    expect(isDegenerate(new Float32Array([0, 0, 0]))).toBe(true);
    expect(isDegenerate(new Float32Array([1, 0, 1, 0]))).toBe(true);
    expect(isDegenerate(new Float32Array([1, 0, 2]))).toBe(false);
  });
});

describe('settleBatchNorm: which BatchNorm a convolution folded, among groups with equal statistics', () => {
  const groups = ['stem.1.', 'block1.1.', 'block2.1.'];
  it('the fused node\'s scope (dynamo), then the next module of a Sequential, then convN -> bnN', () => {
    expect(settleBatchNorm('block1.0.weight', groups, { names: [], aliases: [], scopes: ['block2.1'] })).toMatchObject({ chosen: 'block2.1.', by: 'scope' });
    expect(settleBatchNorm('block1.0.weight', groups, noEvidence)).toMatchObject({ chosen: 'block1.1.', by: 'module-order' });
    expect(settleBatchNorm('layer1.0.conv2.weight', ['layer1.0.bn1.', 'layer1.0.bn2.'], noEvidence)).toMatchObject({ chosen: 'layer1.0.bn2.', by: 'module-order' });
  });
  it('two BatchNorms in the parent with nothing to pair them is ambiguous', () => {
    expect(isAmbiguity(settleBatchNorm('layer1.0.conv.weight', ['layer1.0.bn_a.', 'layer1.0.bn_b.'], noEvidence))).toBe(true);
    expect(isAmbiguity(settleBatchNorm('layer1.0.weight', ['layer2.1.', 'layer3.1.'], noEvidence))).toBe(true);
  });
});

/** The ONNX file without the dynamo exporter's module scopes (node metadata is not in our schema). */
const withoutScopes = (path: string, out: string): string => {
  const model = ModelProtoType.decode(readFileSync(path));
  writeFileSync(out, ModelProtoType.encode(model).finish());
  return out;
};

describe('real exports', () => {
  it('fresh_cnn_bn (equal BatchNorm statistics everywhere), both exports: each conv pairs with its own BatchNorm', async () => {
    for (const file of ['model_dynamo.onnx', 'model_legacy.onnx']) {
      using model = await compile(fixture('fresh_cnn_bn', file), fixture('fresh_cnn_bn', 'weights_v1.safetensors'));
      const kernels = model.weightMap.targets.filter((t) => t.role === 'kernel' && t.expr.op === 'bnFoldWeight');
      expect(kernels.length).toBe(4);
      for (const k of kernels) {
        const [conv, gamma] = exprSources(k.expr);
        expect(gamma.replace(/\.\d+\.weight$/, ''), `${file} ${k.id}`).toBe(conv.replace(/\.\d+\.weight$/, ''));
      }
      // The folded biases (dropped by dynamo: restored) read the same BatchNorm.
      const biases = model.weightMap.targets.filter((t) => t.role === 'bias' && t.expr.op === 'bnFoldBias');
      expect(biases.length, file).toBe(4);
    }
  });

  it('bert_tiny without module scopes: equal-valued parameters are refused as ambiguous, naming the candidates; a map file settles them', async () => {
    using dir = temporaryDirectory();
    const onnx = withoutScopes(fixture('bert_tiny', 'model_dynamo.onnx'), join(dir.path, 'bert.onnx'));
    const error = await compile(onnx, fixture('bert_tiny', 'weights_v1.safetensors')).then(() => undefined, (e: unknown) => e);
    expect(error).toBeInstanceOf(CompileError);
    const detail = (error as CompileError).detail;
    expect(detail._tag).toBe('AmbiguousWeights');
    if (detail._tag !== 'AmbiguousWeights') return;
    for (const w of detail.weights) expect(w.candidates.length).toBeGreaterThan(1);
    expect((error as Error).message).toContain(detail.weights[0].candidates[0]);

    // Settle every ambiguity with the right tensor, known from the scoped export.
    using scoped = await compile(fixture('bert_tiny', 'model_dynamo.onnx'), fixture('bert_tiny', 'weights_v1.safetensors'));
    const truth = new Map(scoped.weightMap.targets.map((t) => [t.id, exprSources(t.expr)]));
    const map: Record<string, string> = {};
    for (const w of detail.weights) map[w.id] = truth.get(w.id)![0];
    using settled = await compile(onnx, fixture('bert_tiny', 'weights_v1.safetensors'), { map });
    for (const t of settled.weightMap.targets) expect(exprSources(t.expr), t.id).toEqual(truth.get(t.id));
    expect(settled.weightMap.ties.filter((x) => x.evidence === 'map-file').length).toBe(detail.weights.length);
  });

  it('a map file entry that names no weight, or a tensor with other values, is refused', async () => {
    const bad = await compile(fixture('mlp', 'model_dynamo.onnx'), fixture('mlp', 'weights_v1.safetensors'), { map: { 'engine/0/nothing/kernel': 'fc1.weight' } }).then(() => undefined, (e: unknown) => e);
    expect((bad as CompileError).detail._tag).toBe('MapFileMismatch');
  });
});

describe('pinned checkpoint tensors', () => {
  it('a plan that changes a pinned tensor, or lets tied copies differ, is refused by name; unchanged ones pass', async () => {
    using model = await compile(fixture('mlp', 'model_dynamo.onnx'), fixture('mlp', 'weights_v1.safetensors'));
    const v1 = readSafetensors(fixture('mlp', 'weights_v1.safetensors'));
    const f32 = (name: string) => ({ shape: v1[name].shape, data: Float32Array.from(v1[name].data as Float32Array) });
    const source = model.weightMap.sources[0].name;
    const pinnedName = 'extra.bias';
    const map = {
      ...model.weightMap,
      pinned: [
        { name: pinnedName, kind: 'dropped' as const, reason: 'zero at export', digest: (await import('../src/weightmap/digest.js')).valueDigest(new Float32Array(4)) },
        { name: 'copy', kind: 'tied' as const, twin: source, reason: 'tied', digest: '' },
      ],
    };
    const tensors = (pin: Float32Array, copy: Float32Array) => memoryStore([
      ...Object.keys(v1).filter((n) => v1[n].data instanceof Float32Array).map((n) => [n, f32(n)] as const),
      [pinnedName, { shape: [4], data: pin }], ['copy', { shape: f32(source).shape, data: copy }],
    ]);
    const ok = planRefit(map, tensors(new Float32Array(4), f32(source).data));
    expect(ok.problems.filter((p) => p.severity === 'error')).toEqual([]);
    const changed = planRefit(map, tensors(Float32Array.of(0, 0, 1, 0), f32(source).data));
    expect(changed.problems).toContainEqual(expect.objectContaining({ _tag: 'PinnedChanged', source: pinnedName }));
    const other = f32(source).data.slice();
    other[0] += 1;
    const diverged = planRefit(map, tensors(new Float32Array(4), other));
    expect(diverged.problems).toContainEqual(expect.objectContaining({ _tag: 'TiedDiverged', source: 'copy', twin: source }));
  });

  it('compile records a checkpoint tensor the graph does not read as pinned, and a checkpoint that changes it is refused', async () => {
    using dir = temporaryDirectory();
    const v1 = readSafetensors(fixture('mlp', 'weights_v1.safetensors'));
    const entries = (extra: Float32Array) => [
      ...Object.entries(v1).map(([name, t]) => ({ name, dtype: 'F32' as const, shape: [...t.shape], data: new Uint8Array((t.data as Float32Array).buffer.slice(0)) })),
      { name: 'unused_head.weight', dtype: 'F32' as const, shape: [3, 2], data: new Uint8Array(extra.buffer) },
    ];
    await writeSafetensors(join(dir.path, 'a.safetensors'), entries(Float32Array.of(1, 2, 3, 4, 5, 6)));
    await writeSafetensors(join(dir.path, 'b.safetensors'), entries(Float32Array.of(1, 2, 3, 4, 5, 7)));
    using model = await compile(fixture('mlp', 'model_dynamo.onnx'), join(dir.path, 'a.safetensors'));
    expect(model.weightMap.pinned).toContainEqual(expect.objectContaining({ name: 'unused_head.weight', kind: 'unread' }));
    const { openCheckpoint } = await import('../src/checkpoint/checkpoint.js');
    using same = await openCheckpoint(join(dir.path, 'a.safetensors'));
    expect(planRefit(model.weightMap, same).problems.filter((p) => p.severity === 'error')).toEqual([]);
    using b = await openCheckpoint(join(dir.path, 'b.safetensors'));
    expect(planRefit(model.weightMap, b).problems).toContainEqual(expect.objectContaining({ _tag: 'PinnedChanged', source: 'unused_head.weight' }));
  });
});
