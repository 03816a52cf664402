/** MutableModule scenarios: a LoRA adapter loaded into it (gpt2_tiny, against PyTorch's output), a training
 *  loop that changes a few tensors per step and runs after each (against the TypeScript reference
 *  evaluator on the hand-written networks), and failures that leave the engines as they were. */
import { describe, expect, it } from 'vitest';
import { defaultCompiler, MutableModule, MutableModuleError, type StateTensor, type UpdateReport } from '../src/index.js';
import { evaluate } from '../src/reference/index.js';
import { cnnModel, mlpModel } from '../src/demo/models.js';
import { exprSources } from '../src/weightmap/expr.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, outputBytes, random } from './e2e-support.js';

const floatState = (module: MutableModule): Map<string, { shape: readonly number[]; data: Float32Array }> =>
  new Map([...module.parameters()].filter(([, t]) => t.data instanceof Float32Array).map(([n, t]) => [n, { shape: t.shape, data: t.data as Float32Array }]));

/** Targets of the compiled model that read any of `names` (what a refit of them must move at most). */
const targetsReading = (module: MutableModule, names: readonly string[]): number =>
  module.model.weightMap.targets.filter((t) => t.status === 'mapped' && exprSources(t.expr).some((s) => names.includes(s))).length;

describe('MutableModule', () => {
  it('loads a LoRA adapter into gpt2_tiny and runs: matches expected_lora; loading the v1 state dict goes back', async () => {
    const inputs = readSafetensors(fixture('gpt2_tiny', 'inputs.safetensors'));
    const expected = (name: string) => readSafetensors(fixture('gpt2_tiny', `${name}.safetensors`)).output;
    const events: UpdateReport[] = [];
    await using module = await MutableModule.fromOnnx(fixture('gpt2_tiny', 'model_dynamo.onnx'), fixture('gpt2_tiny', 'weights_v1.safetensors'), { onUpdate: (r) => events.push(r) });
    const v1 = module.stateDict();
    const first = await module.run(inputs);
    expect(first.update).toBeUndefined();
    expectClose(first.outputs.output, expected('expected_v1'));

    const changed = await module.mergeLora(fixture('gpt2_tiny', 'lora'));
    expect(changed).toEqual(['transformer.h.0.attn.c_attn.weight', 'transformer.h.1.attn.c_attn.weight']);
    expect(module.pending).toEqual({ tensors: changed, recompile: undefined });
    const withLora = await module.run(inputs);
    expect(withLora.update?.decision).toBe('refit');
    expect(withLora.update?.tensors).toEqual(changed);
    expect(withLora.update?.weightsMoved).toBe(targetsReading(module, changed));
    expect(events).toEqual([withLora.update]);
    expectClose(withLora.outputs.output, expected('expected_lora'));

    expect(module.loadStateDict(v1)).toEqual({ missing: [], unexpected: [] });
    const back = await module.run(inputs);
    // Every tensor was loaded, but only the two LoRA targets differ from what the engines hold.
    expect(back.update?.decision).toBe('refit');
    expect(back.update?.weightsMoved).toBe(targetsReading(module, changed));
    expect(outputBytes(back.outputs)).toEqual(outputBytes(first.outputs));
  });

  it.each([
    ['mlp', 'model_legacy.onnx', (s: Map<string, { shape: readonly number[]; data: Float32Array }>) => mlpModel(s, 4).network],
    ['cnn_bn', 'model_dynamo.onnx', (s: Map<string, { shape: readonly number[]; data: Float32Array }>) => cnnModel(s, 2).network],
  ] as const)('a training loop on %s: a few tensors change per step, each run refits only those', async (name, file, network) => {
    const inputs = readSafetensors(fixture(name, 'inputs.safetensors'));
    await using module = await MutableModule.fromOnnx(fixture(name, file), fixture(name, 'weights_v1.safetensors'));
    const next = random(7);
    const names = [...floatState(module).keys()];
    for (let step = 0; step < 6; step++) {
      const picked = [...new Set([names[Math.floor(next() * names.length)], names[Math.floor(next() * names.length)]])].sort();
      for (const n of picked) {
        const t = module.get(n)!;
        // A gradient-like step; multiplicative, so variances stay positive.
        const data = Float32Array.from(t.data as Float32Array, (v) => v * (1 + 0.2 * (next() - 0.5)));
        module.set(n, { shape: t.shape, data });
      }
      const { outputs, update } = await module.run(inputs);
      expect(update?.decision).toBe('refit');
      expect(update?.tensors).toEqual(picked);
      expect(update?.weightsMoved).toBe(targetsReading(module, picked));
      expect(update?.weightsMoved).toBeGreaterThan(0);
      const reference = evaluate(network(floatState(module)), { x: inputs.x.data as Float32Array }).output;
      expectClose(outputs[module.outputs[0]], { dtype: 'float32', shape: outputs[module.outputs[0]].shape, data: reference });
    }
    if (name === 'cnn_bn') {
      // A tensor that feeds no weight (BatchNorm's step counter) changes nothing in the engines.
      module.set('1.num_batches_tracked', { dtype: 'int64', shape: [], data: BigInt64Array.from([99n]) });
      const { update } = await module.run(inputs);
      expect(update).toMatchObject({ decision: 'none', weightsMoved: 0 });
    }
  });

  it('ONNX source: a new name recompiles through the compiler capability; a shape the graph fixes is refused by name', async () => {
    const inputs = readSafetensors(fixture('mlp', 'inputs.safetensors'));
    const compiled: string[] = [];
    const decisions: string[] = [];
    await using module = await MutableModule.fromOnnx(fixture('mlp', 'model_dynamo.onnx'), fixture('mlp', 'weights_v1.safetensors'), {
      compiler: (source, state) => {
        compiled.push([...state.keys()].sort().join(','));
        return defaultCompiler(source, state);
      },
      onUpdate: (r) => decisions.push(r.decision),
    });
    expect(compiled).toHaveLength(1);
    const before = outputBytes((await module.run(inputs)).outputs);
    module.set('extra.weight', { shape: [2], data: Float32Array.from([1, 2]) });
    expect(module.pending.recompile).toBe("added: 'extra.weight'");
    const added = await module.run(inputs);
    expect(added.update).toMatchObject({ decision: 'recompile', reason: "added: 'extra.weight'", weightsMoved: 0 });
    expect(compiled).toHaveLength(2);
    expect(compiled[1]).toContain('extra.weight');
    expect(outputBytes(added.outputs)).toEqual(before);

    module.set('3.weight', { shape: [64, 65], data: new Float32Array(64 * 65) });
    const refused = await module.run(inputs).catch((e: unknown) => e);
    expect((refused as MutableModuleError)._tag).toBe('RefitFailed');
    expect((refused as Error).message).toMatch(/'3\.weight': expected shape \[64,64\], found \[64,65\]/);
    expect(module.pending.recompile).toMatch(/'3\.weight' float32\[64,64\] -> float32\[64,65\]/);
    module.discardChanges();
    expect(outputBytes((await module.run(inputs)).outputs)).toEqual(before);
    expect(decisions).toEqual(['recompile']);
  });

  it('a refit that fails leaves the engines as they were and the change pending; discardChanges restores', async () => {
    const inputs = readSafetensors(fixture('mlp', 'inputs.safetensors'));
    using module = await MutableModule.fromOnnx(fixture('mlp', 'model_legacy.onnx'), fixture('mlp', 'weights_v1.safetensors'));
    const before = outputBytes((await module.run(inputs)).outputs);
    const w = module.get('3.weight')!;
    const poisoned = Float32Array.from(w.data as Float32Array);
    poisoned[5] = Number.NaN;
    module.set('3.weight', { shape: w.shape, data: poisoned });
    module.set('0.bias', { shape: [64], data: new Float32Array(64).fill(0.5) });
    const error = await module.run(inputs).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(MutableModuleError);
    expect((error as MutableModuleError)._tag).toBe('RefitFailed');
    expect((error as Error).message).toMatch(/non-finite|NaN/i);
    expect(module.pending.tensors).toEqual(['0.bias', '3.weight']);
    module.discardChanges();
    const after = await module.run(inputs);
    expect(after.update).toBeUndefined();
    expect(outputBytes(after.outputs)).toEqual(before);

    // Strict loading checks the names first and loads nothing on a mismatch.
    const dict = module.stateDict();
    dict.delete('5.bias');
    dict.set('extra', { dtype: 'float32', shape: [1], data: new Float32Array(1) } satisfies StateTensor);
    dict.set('0.weight', { dtype: 'float32', shape: [64, 32], data: new Float32Array(64 * 32) });
    const strict = (() => {
      try {
        module.loadStateDict(dict);
      } catch (e) {
        return e;
      }
    })();
    expect((strict as MutableModuleError)._tag).toBe('KeyMismatch');
    expect((strict as Error).message).toMatch(/missing '5\.bias'.*unexpected 'extra'/);
    expect(module.pending.tensors).toEqual([]);
    // Not strict: the names both have are loaded, the rest reported.
    expect(module.loadStateDict(dict, { strict: false })).toEqual({ missing: ['5.bias'], unexpected: ['extra'] });
    expect(module.pending.tensors.length).toBe(7);
    expect(() => module.set('0.bias', { shape: [3], data: new Float32Array(2) })).toThrow(/holds 3 values; 2 were given/);
  });
});
