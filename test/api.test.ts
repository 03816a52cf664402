/** The public API, imported only through src/index.ts: the whole flow on a fixture, the TaskEither forms,
 *  abort and progress, errors, and the building blocks it re-exports. */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import * as E from 'fp-ts/lib/Either.js';
import {
  buildEngine, compile, compileTE, GraphBuilder, load, loadTE, openSafetensors, parseLoraArgument, planRefit, refit, RefitPlanCodec, run, runTE, save,
  TrtRefitError, writeSafetensors, type NetworkDefinition, type Progress,
} from '../src/index.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { fixture, outputBytes, temporaryDirectory } from './e2e-support.js';

const gpt2 = (file: string) => fixture('gpt2_tiny', file);
const expected = (name: string) => readSafetensors(gpt2(`${name}.safetensors`)).output;

describe('public API (src/index.ts)', () => {
  it('compile -> run -> planRefit -> refit (v2, LoRA) -> save -> load -> run on gpt2_tiny, matching PyTorch', async () => {
    using dir = temporaryDirectory();
    const inputs = readSafetensors(gpt2('inputs.safetensors'));
    const events: Progress[] = [];
    await using model = await compile(gpt2('model_dynamo.onnx'), gpt2('weights_v1.safetensors'), { onProgress: (p) => events.push(p) });
    // One 'build' event per engine segment, then 'done'.
    const builds = events.filter((e) => e.operation === 'compile' && e.phase === 'build');
    expect(builds.length).toBe(model.compiled.engineStages().length);
    expect(events[events.length - 1]).toMatchObject({ operation: 'compile', phase: 'done', enginesBuilt: builds.length });
    expect(model.coverage().unmapped).toEqual([]);
    expectClose((await model.run(inputs)).output, expected('expected_v1'));

    const plan = await planRefit(model, gpt2('weights_v2.safetensors'));
    expect(E.isRight(RefitPlanCodec.decode(JSON.parse(JSON.stringify(plan))))).toBe(true);
    expect(plan.totals.changed).toBe(plan.totals.targets);

    const refitEvents: Progress[] = [];
    const toV2 = await refit(model, gpt2('weights_v2.safetensors'), { onProgress: (p) => refitEvents.push(p) });
    expect(toV2.report.changed).toBe(plan.totals.changed);
    expect(refitEvents.some((e) => e.operation === 'refit' && e.phase === 'engine')).toBe(true);
    expect(refitEvents[refitEvents.length - 1]).toMatchObject({ operation: 'refit', phase: 'done', done: toV2.report.changed });
    expectClose((await run(model, inputs)).output, expected('expected_v2'));

    const lora = await model.refit({ checkpoint: gpt2('weights_v1.safetensors'), lora: [parseLoraArgument(`${gpt2('lora')}:1`)] });
    expect(lora.report.changed).toBeGreaterThan(0);
    expectClose((await model.run(inputs)).output, expected('expected_lora'));

    const file = join(dir.path, 'gpt2.trtr');
    await save(model, file);
    // A plan from the file's header alone agrees with the plan of the model in memory.
    expect(await planRefit(file, gpt2('weights_v2.safetensors'))).toEqual(await planRefit(model, gpt2('weights_v2.safetensors')));
    {
      using reread = await load(file);
      expect(outputBytes(await reread.run(inputs))).toEqual(outputBytes(await model.run(inputs)));
    }
  });

  it('TaskEither forms return tagged Lefts; Promise forms reject with TrtRefitError carrying the same tag', async () => {
    using dir = temporaryDirectory();
    const missing = await loadTE(join(dir.path, 'missing.trtr'))();
    expect(E.isLeft(missing) && missing.left._tag).toBe('ModelFile');
    const corrupt = join(dir.path, 'corrupt.trtr');
    writeFileSync(corrupt, 'TRTREFIT but not really a model file, long enough to pass the first size check....');
    const error = await load(corrupt).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(TrtRefitError);
    expect((error as TrtRefitError)._tag).toBe('ModelFileInvalid');
    expect((error as TrtRefitError).stage).toBe('ModelFile');
    expect((error as Error).message).toContain('corrupt.trtr');

    // An mlp checkpoint for the gpt2 graph: nothing maps.
    const unmapped = await compileTE(gpt2('model_dynamo.onnx'), fixture('mlp', 'weights_v1.safetensors'))();
    expect(E.isLeft(unmapped) && unmapped.left._tag === 'Compile' && unmapped.left.detail._tag).toBe('UnmappedWeights');

    using model = await compile(fixture('mlp', 'model_legacy.onnx'), fixture('mlp', 'weights_v1.safetensors'));
    const badInput = await runTE(model, { x: new Float32Array(3) })();
    expect(E.isLeft(badInput) && badInput.left._tag === 'Run' && badInput.left.detail._tag).toBe('InputMismatch');
    const wrongWeights = await refit(model, fixture('cnn_bn', 'weights_v1.safetensors')).catch((e: unknown) => e);
    expect((wrongWeights as TrtRefitError)._tag).toBe('PlanHasErrors');
  });

  it('an aborted compile or refit changes nothing and rejects with Aborted; a disposed model refuses calls', async () => {
    const inputs = readSafetensors(fixture('mlp', 'inputs.safetensors'));
    const aborted = AbortSignal.abort();
    const c = await compile(fixture('mlp', 'model_legacy.onnx'), fixture('mlp', 'weights_v1.safetensors'), { signal: aborted }).catch((e: unknown) => e);
    expect((c as TrtRefitError)._tag).toBe('Aborted');

    // Abort while the compile builds its engines.
    const during = new AbortController();
    const c2 = await compile(fixture('mlp', 'model_legacy.onnx'), fixture('mlp', 'weights_v1.safetensors'), { signal: during.signal, onProgress: (p) => p.operation === 'compile' && p.phase === 'read' && during.abort() }).catch((e: unknown) => e);
    expect((c2 as TrtRefitError)._tag).toBe('Aborted');

    const model = await compile(fixture('mlp', 'model_legacy.onnx'), fixture('mlp', 'weights_v1.safetensors'));
    const before = outputBytes(await model.run(inputs));
    const r = await refit(model, fixture('mlp', 'weights_v2.safetensors'), { signal: aborted }).catch((e: unknown) => e);
    expect((r as TrtRefitError)._tag).toBe('Aborted');
    expect(outputBytes(await model.run(inputs))).toEqual(before);
    await model[Symbol.asyncDispose]();
    expect(model.disposed).toBe(true);
    expect(((await refit(model, fixture('mlp', 'weights_v2.safetensors')).catch((e: unknown) => e)) as TrtRefitError)._tag).toBe('Disposed');
    expect(((await model.run(inputs).catch((e: unknown) => e)) as TrtRefitError)._tag).toBe('ModelDisposed');
  });

  it('re-exports the building blocks: network-builder engines, GraphBuilder, safetensors', async () => {
    // y = x W^T + b for a 2x3 layer, against a sum written out here.
    const kernel = Float32Array.from([1, 2, 3, -1, 0.5, 4]);
    const bias = Float32Array.from([0.25, -2]);
    const network: NetworkDefinition = {
      inputs: [{ name: 'x', dtype: 'float32', shape: [1, 3] }],
      layers: [{ kind: 'fullyConnected', name: 'fc', input: 'x', output: 'y', outFeatures: 2, kernel: { dtype: 'float32', shape: [2, 3], data: kernel }, bias: { dtype: 'float32', shape: [2], data: bias } }],
      outputs: [{ tensor: 'y', name: 'y' }],
    };
    using engine = buildEngine(network);
    const x = Float32Array.from([0.5, -1, 2]);
    const y = engine.run({ x }).y;
    for (let o = 0; o < 2; o++) expect(y[o]).toBeCloseTo(bias[o] + kernel[o * 3] * x[0] + kernel[o * 3 + 1] * x[1] + kernel[o * 3 + 2] * x[2], 5);

    const b = new GraphBuilder('g', 17);
    const input = b.input('x', 'float32', [1, 3]);
    b.output(b.op('Relu', [input], {}, 'relu'));
    expect(b.build().nodes.map((n) => n.opType)).toEqual(['Relu']);

    using dir = temporaryDirectory();
    const path = join(dir.path, 't.safetensors');
    await writeSafetensors(path, [{ name: 'w', dtype: 'F32', shape: [2, 3], data: new Uint8Array(kernel.buffer) }]);
    using file = await openSafetensors(path);
    expect([...file.tensors.keys()]).toEqual(['w']);
    expect(Array.from(new Float32Array(Uint8Array.from(file.bytes('w')).buffer))).toEqual(Array.from(kernel));
  });
});
