/**
 * MutableModule's invariant: after any sequence of set, loadStateDict and run, its outputs equal those of
 * a fresh compile with the current state dict, bit for bit.
 *
 * "A fresh compile with the state dict": for an ONNX source, compile() the ONNX file (which builds from the
 * file's own weights) and refit it to the state dict written as a safetensors file, through the file-level
 * path (refitModel: checkpoint -> full plan -> effect); for a builder network, compileNetwork() of the
 * network made from the state dict, built with those weights directly (so shape changes are covered).
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { join } from 'node:path';
import { compile, compileNetwork } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import { MutableModule, type NetworkDefinition, type StateDict, type UpdateDecision } from '../src/index.js';
import { memoryStore } from '../src/weightmap/store.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { toBytes, type Tensor } from '../src/trace/ir.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixture, outputBytes, random, temporaryDirectory } from './e2e-support.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 10 : n);

type Mirror = Map<string, Tensor>;

const safetensorsDtype = { float32: 'F32', int64: 'I64' } as const;

/** The oracle for an ONNX source: compile, then refit to the state dict through a checkpoint file. */
const freshOnnx = async (onnx: string, build: string, state: Mirror, dir: string, inputs: Record<string, Tensor>): Promise<Buffer> => {
  const path = join(dir, `state-${Math.random().toString(36).slice(2)}.safetensors`);
  await writeSafetensors(path, [...state].map(([name, t]) => ({ name, dtype: safetensorsDtype[t.dtype as 'float32' | 'int64'], shape: t.shape, data: toBytes(t.data) })));
  using model = await compile(onnx, build);
  await refitModel(model, { checkpoint: path });
  return outputBytes(await model.run(inputs));
};

/** A value change of one float tensor: multiplicative (variances stay positive), from a seed. */
const perturbed = (t: Tensor, seed: number, scale: number): Tensor => {
  const next = random(seed);
  return { dtype: 'float32', shape: t.shape, data: Float32Array.from(t.data as Float32Array, (v) => v * (1 + scale * (next() - 0.5))) };
};

const onnxOp = fc.oneof(
  fc.record({ kind: fc.constant('set' as const), pick: fc.nat(), seed: fc.nat(), scale: fc.constantFrom(0.05, 0.5) }),
  fc.record({ kind: fc.constant('load' as const), picks: fc.array(fc.nat(), { minLength: 1, maxLength: 4 }), seed: fc.nat(), strict: fc.boolean() }),
  fc.record({ kind: fc.constant('run' as const) }),
);

describe('MutableModule equals a fresh compile with its state dict', () => {
  it.each([
    ['mlp', 'model_dynamo.onnx'],
    ['cnn_bn', 'model_legacy.onnx'],
  ])('%s/%s: random set / loadStateDict / run sequences on random subsets of tensors', async (name, file) => {
    using dir = temporaryDirectory();
    const onnx = fixture(name, file);
    const build = fixture(name, 'weights_v1.safetensors');
    const inputs = readSafetensors(fixture(name, 'inputs.safetensors'));
    await fc.assert(
      fc.asyncProperty(fc.array(onnxOp, { minLength: 1, maxLength: 6 }), async (ops) => {
        await using module = await MutableModule.fromOnnx(onnx, build);
        const mirror: Mirror = module.stateDict();
        const floats = [...mirror.keys()].filter((n) => mirror.get(n)!.dtype === 'float32');
        for (const op of ops) {
          if (op.kind === 'set') {
            const n = floats[op.pick % floats.length];
            const t = perturbed(mirror.get(n)!, op.seed, op.scale);
            mirror.set(n, t);
            module.set(n, t);
          } else if (op.kind === 'load') {
            const subset = new Map([...new Set(op.picks.map((p) => floats[p % floats.length]))].map((n, i) => [n, perturbed(mirror.get(n)!, op.seed + i, 0.3)] as const));
            // strict: the whole state dict with the subset changed; not strict: the subset alone.
            const dict = op.strict ? new Map([...mirror, ...subset]) : subset;
            module.loadStateDict(dict, { strict: op.strict });
            for (const [n, t] of subset) mirror.set(n, t);
          } else {
            const { outputs, update } = await module.run(inputs);
            expect(update?.decision ?? 'none').not.toBe('recompile');
            expect(outputBytes(outputs)).toEqual(await freshOnnx(onnx, build, mirror, dir.path, inputs));
          }
        }
        expect(outputBytes((await module.run(inputs)).outputs)).toEqual(await freshOnnx(onnx, build, mirror, dir.path, inputs));
      }),
      { numRuns: runs(8) },
    );
  });

  // A small builder network whose hidden width follows the state dict: x[2,4] -> fc1 -> relu -> fc2 -> y[2,3].
  const network = (state: StateDict): NetworkDefinition => {
    const w = (n: string) => {
      const t = state.get(n)!;
      return { dtype: 'float32' as const, shape: t.shape, data: t.data as Float32Array };
    };
    return {
      inputs: [{ name: 'x', dtype: 'float32', shape: [2, 4] }],
      layers: [
        { kind: 'fullyConnected', name: 'fc1', input: 'x', output: 'h', outFeatures: state.get('fc1.weight')!.shape[0], kernel: w('fc1.weight'), bias: w('fc1.bias') },
        { kind: 'unary', name: 'act', input: 'h', output: 'a', op: 'relu' },
        { kind: 'fullyConnected', name: 'fc2', input: 'a', output: 'y', outFeatures: 3, kernel: w('fc2.weight'), bias: w('fc2.bias') },
      ],
      outputs: [{ tensor: 'y', name: 'y' }],
    };
  };
  const tensorOf = (shape: number[], seed: number): Tensor => {
    const next = random(seed);
    return { dtype: 'float32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => next() * 2 - 1) };
  };
  const stateOf = (hidden: number, seed: number): Mirror => new Map([
    ['fc1.weight', tensorOf([hidden, 4], seed)], ['fc1.bias', tensorOf([hidden], seed + 1)],
    ['fc2.weight', tensorOf([3, hidden], seed + 2)], ['fc2.bias', tensorOf([3], seed + 3)],
  ]);
  const freshNetwork = (state: Mirror, x: Float32Array): Buffer => {
    const built = compileNetwork(network(state), memoryStore([...state].map(([n, t]) => [n, { shape: t.shape, data: t.data as Float32Array }] as const)));
    if (built._tag === 'Left') throw new Error(JSON.stringify(built.left));
    using model = built.right;
    return outputBytes(model.stages[0].kind === 'engine' ? { y: { dtype: 'float32', shape: [2, 3], data: model.stages[0].context.run({ x }).y } } : {});
  };

  const networkOp = fc.oneof(
    fc.record({ kind: fc.constant('set' as const), pick: fc.integer({ min: 0, max: 3 }), seed: fc.nat() }),
    fc.record({ kind: fc.constant('resize' as const), hidden: fc.integer({ min: 1, max: 6 }), seed: fc.nat() }),
    fc.record({ kind: fc.constant('load' as const), hidden: fc.integer({ min: 1, max: 6 }), seed: fc.nat() }),
    fc.record({ kind: fc.constant('run' as const) }),
  );

  it('a builder network: value changes refit, shape changes recompile, and outputs equal a fresh build', async () => {
    const x = Float32Array.from({ length: 8 }, (_, i) => Math.sin(i + 1));
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 6 }), fc.array(networkOp, { minLength: 1, maxLength: 7 }), async (hidden0, ops) => {
        let mirror = stateOf(hidden0, 1);
        const decisions: UpdateDecision[] = [];
        await using module = await MutableModule.fromNetwork(network, mirror, { onUpdate: (r) => decisions.push(r.decision) });
        let compiledHidden = hidden0;
        let changed = false;
        const check = async () => {
          const { outputs, update } = await module.run({ x });
          const hidden = mirror.get('fc1.weight')!.shape[0];
          // The decision: recompile exactly when the shapes differ from the compiled ones.
          expect(update?.decision).toBe(!changed ? undefined : hidden !== compiledHidden ? 'recompile' : 'refit');
          compiledHidden = hidden;
          changed = false;
          expect(outputBytes(outputs)).toEqual(freshNetwork(mirror, x));
        };
        for (const op of ops) {
          if (op.kind === 'set') {
            const n = [...mirror.keys()][op.pick];
            const t = tensorOf([...mirror.get(n)!.shape], op.seed);
            mirror.set(n, t);
            module.set(n, t);
          } else if (op.kind === 'resize') {
            // Every tensor of the hidden width changes shape at once, one set at a time.
            const next = stateOf(op.hidden, op.seed);
            for (const [n, t] of next) module.set(n, t);
            mirror = next;
          } else if (op.kind === 'load') {
            mirror = stateOf(op.hidden, op.seed);
            module.loadStateDict(mirror);
          } else {
            await check();
            continue;
          }
          changed = true;
        }
        await check();
        expect(decisions.length).toBe(decisions.filter((d) => d !== 'none').length);
      }),
      { numRuns: runs(15) },
    );
  });
});
