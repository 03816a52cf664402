import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { mergeAdapters } from '../src/lora/lora.js';
import { openLora } from '../src/lora/open.js';
import { planRefit, stateAfter } from '../src/plan/plan.js';
import { planCheckpoint } from '../src/plan/index.js';
import { exprSources } from '../src/weightmap/expr.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { applyMap, compileRefittable, fixtureModels, mapFor, traceForRefit } from './support/weightmap.js';

const withAdapters = fixtureModels().filter((f) => f.model === 'bert_tiny' || f.model === 'gpt2_tiny');

describe('LoRA adapters on the fixtures (PEFT)', () => {
  it.each(withAdapters.map((f) => [f.model, f.path]))('%s: weights_v1 + adapter matches expected_lora; back to base matches expected_v1', async (_model, path) => {
    const dir = join(path, '..');
    using v1 = await openCheckpoint(join(dir, 'weights_v1.safetensors'));
    const traced = traceForRefit(path, v1);
    using adapter = await openLora(join(dir, 'lora'));
    const map = mapFor(traced, v1);
    const merged = mergeAdapters(v1, [{ adapter, weight: 1 }]);
    if (E.isLeft(merged)) throw new Error(JSON.stringify(merged.left));
    const { model, engine } = await compileRefittable(traced);
    using _ = model;
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    const output = traced.analyzed.graph.outputs[0];

    // The plan moves exactly the weights that read a LoRA-touched tensor.
    const loraPlan = planRefit(map, merged.right);
    expect(loraPlan.totals.errors).toBe(0);
    const touched = new Set(adapter.modules.map((m) => `${m.module.replace(/^base_model\.model\./, '')}.weight`));
    const changed = loraPlan.entries.filter((e) => e.changed);
    expect(changed.length).toBeGreaterThan(0);
    for (const e of loraPlan.entries) expect(e.changed).toBe(exprSources(e.expr).some((s) => touched.has(s)));

    await applyMap(map, merged.right, model, engine);
    expectClose((await model.run(inputs))[output], readSafetensors(join(dir, 'expected_lora.safetensors')).output);

    // Back to base: the same weights change back, nothing else.
    const back = planRefit(map, v1, { current: stateAfter(loraPlan) });
    expect(back.entries.filter((e) => e.changed).map((e) => e.target)).toEqual(changed.map((e) => e.target));
    await applyMap(map, v1, model, engine);
    expectClose((await model.run(inputs))[output], readSafetensors(join(dir, 'expected_v1.safetensors')).output);
    // And then there is nothing left to do.
    expect(planRefit(map, v1, { current: stateAfter(back, stateAfter(loraPlan)) }).totals.bytesToMove).toBe(0);
  });

  it('plans from files with --lora DIR:SCALE semantics (dry run)', async () => {
    const f = withAdapters.find((x) => x.model === 'gpt2_tiny')!;
    const dir = join(f.path, '..');
    using v1 = await openCheckpoint(join(dir, 'weights_v1.safetensors'));
    const map = mapFor(traceForRefit(f.path, v1), v1);
    const none = await planCheckpoint(map, join(dir, 'weights_v1.safetensors'));
    expect(none.totals.changed).toBe(0);
    const half = await planCheckpoint(map, join(dir, 'weights_v1.safetensors'), { lora: [{ path: join(dir, 'lora'), weight: 0.5 }] });
    // c_attn is a Conv1D ([in, out], fan_in_fan_out): its engine kernel is the transposed merged weight.
    expect(half.entries.filter((e) => e.changed).map((e) => e.layer).sort()).toEqual(['node_Gemm_302', 'node_Gemm_307']);
  });
});
