/**
 * Claim: refitting an engine is much faster than building it, and runs near host memory bandwidth.
 *
 * Two networks: a transformer encoder (12 layers, hidden 768, sequence 128, q/k/v, 12-head attention,
 * MLP 768 -> 3072 -> 768 with gelu, layer norms) and a ResNet-18-shaped convolutional network (conv + batch
 * norm + relu, residual adds, pooling, classifier). For each: a full build with tacticSearch on, against a
 * refit that applies every weight (alternating two weight sets, so every weight really changes), and the
 * refit's throughput (bytes supplied per second) against host memcpy bandwidth measured in the same run.
 */
import { buildEngine } from '../ffi/index.js';
import { networkWeights, type Layer, type NetworkDefinition, type Weights } from '../src/network/types.js';
import { bestOf, hostMemcpyBandwidth, writeResult, type Figure } from './lib.js';

/** Seeded uniform values in [lo, hi) (xorshift; fast enough for ~100M values). */
const filler = (seed: number) => {
  let s = seed >>> 0 || 1;
  return (n: number, lo: number, hi: number): Float32Array => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      out[i] = lo + ((s >>> 0) / 4294967296) * (hi - lo);
    }
    return out;
  };
};

/** A layer without its name and output (distributed over the union). */
type LayerBody = Layer extends infer L ? (L extends Layer ? Omit<L, 'name' | 'output'> : never) : never;

class Net {
  readonly layers: Layer[] = [];
  #n = 0;
  constructor(private readonly fill: ReturnType<typeof filler>) {}
  w(shape: number[], lo: number, hi: number): Weights {
    return { dtype: 'float32', shape, data: this.fill(shape.reduce((a, b) => a * b, 1), lo, hi) };
  }
  add(layer: LayerBody, prefix: string): string {
    const name = `${prefix}_${this.#n++}`;
    this.layers.push({ ...layer, name, output: name } as Layer);
    return name;
  }
  fc(x: string, inF: number, outF: number, p: string) {
    const r = 1 / Math.sqrt(inF);
    return this.add({ kind: 'fullyConnected', input: x, outFeatures: outF, kernel: this.w([outF, inF], -r, r), bias: this.w([outF], -0.1, 0.1) }, p);
  }
  ln(x: string, width: number, p: string) {
    return this.add({ kind: 'layerNorm', input: x, axis: -1, epsilon: 1e-5, scale: this.w([width], 0.9, 1.1), shift: this.w([width], -0.1, 0.1) }, p);
  }
  conv(x: string, inC: number, outC: number, k: number, stride: number, p: string) {
    const r = 1 / Math.sqrt(inC * k * k);
    const pad = (k - 1) >> 1;
    return this.add(
      {
        kind: 'convolution',
        input: x,
        params: { outChannels: outC, kernel: [k, k], stride: [stride, stride], padding: [pad, pad, pad, pad], dilation: [1, 1], groups: 1 },
        kernel: this.w([outC, inC, k, k], -r, r),
      },
      p,
    );
  }
  bn(x: string, c: number, p: string) {
    return this.add({ kind: 'batchNorm', input: x, epsilon: 1e-5, scale: this.w([c], 0.5, 1.5), shift: this.w([c], -0.1, 0.1), mean: this.w([c], -0.1, 0.1), variance: this.w([c], 0.5, 1.5) }, p);
  }
  relu(x: string, p: string) {
    return this.add({ kind: 'unary', input: x, op: 'relu' }, p);
  }
}

export const transformer = (seed: number, layers = 12, hidden = 768, seq = 128, heads = 12): NetworkDefinition => {
  const n = new Net(filler(seed));
  const hd = hidden / heads;
  let x = 'x';
  for (let l = 0; l < layers; l++) {
    const p = `l${l}`;
    const h = n.ln(x, hidden, `${p}_ln1`);
    const split = (t: string) => n.add({ kind: 'transpose', input: n.add({ kind: 'reshape', input: t, shape: [1, seq, heads, hd] }, `${p}_split`), perm: [0, 2, 1, 3] }, `${p}_heads`);
    const q = split(n.fc(h, hidden, hidden, `${p}_q`));
    const k = split(n.fc(h, hidden, hidden, `${p}_k`));
    const v = split(n.fc(h, hidden, hidden, `${p}_v`));
    const scores = n.add({ kind: 'matrixMultiply', a: q, transposeA: false, b: k, transposeB: true }, `${p}_scores`);
    const scaled = n.add({ kind: 'elementwise', a: scores, b: n.add({ kind: 'constant', weights: { dtype: 'float32', shape: [1], data: Float32Array.of(1 / Math.sqrt(hd)) } }, `${p}_scale`), op: 'mul' }, `${p}_scaled`);
    const probs = n.add({ kind: 'softmax', input: scaled, axis: -1 }, `${p}_softmax`);
    const ctx = n.add({ kind: 'matrixMultiply', a: probs, transposeA: false, b: v, transposeB: false }, `${p}_ctx`);
    const merged = n.add({ kind: 'reshape', input: n.add({ kind: 'transpose', input: ctx, perm: [0, 2, 1, 3] }, `${p}_unheads`), shape: [1, seq, hidden] }, `${p}_merge`);
    const attn = n.add({ kind: 'elementwise', a: x, b: n.fc(merged, hidden, hidden, `${p}_o`), op: 'add' }, `${p}_res1`);
    const h2 = n.ln(attn, hidden, `${p}_ln2`);
    const up = n.add({ kind: 'unary', input: n.fc(h2, hidden, 4 * hidden, `${p}_up`), op: 'gelu_erf' }, `${p}_gelu`);
    x = n.add({ kind: 'elementwise', a: attn, b: n.fc(up, 4 * hidden, hidden, `${p}_down`), op: 'add' }, `${p}_res2`);
  }
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [1, seq, hidden] }], layers: n.layers, outputs: [{ tensor: x, name: 'y' }] };
};

/** ResNet-18's shape: stem, four stages of two basic blocks (64..512 channels), classifier. */
export const resnet = (seed: number, size = 224): NetworkDefinition => {
  const n = new Net(filler(seed));
  let x = n.relu(n.bn(n.conv('x', 3, 64, 7, 2, 'stem'), 64, 'stem_bn'), 'stem_relu');
  x = n.add({ kind: 'pooling', input: x, op: 'max', params: { kernel: [3, 3], stride: [2, 2], padding: [1, 1, 1, 1], countIncludePad: false } }, 'stem_pool');
  let c = 64;
  for (const [stage, outC] of [64, 128, 256, 512].entries()) {
    for (let b = 0; b < 2; b++) {
      const stride = stage > 0 && b === 0 ? 2 : 1;
      const p = `s${stage}b${b}`;
      const y = n.bn(n.conv(n.relu(n.bn(n.conv(x, c, outC, 3, stride, `${p}_c1`), outC, `${p}_bn1`), `${p}_r1`), outC, outC, 3, 1, `${p}_c2`), outC, `${p}_bn2`);
      const shortcut = stride !== 1 || c !== outC ? n.bn(n.conv(x, c, outC, 1, stride, `${p}_down`), outC, `${p}_downbn`) : x;
      x = n.relu(n.add({ kind: 'elementwise', a: y, b: shortcut, op: 'add' }, `${p}_add`), `${p}_out`);
      c = outC;
    }
  }
  x = n.add({ kind: 'pooling', input: x, op: 'global_average' }, 'gap');
  x = n.fc(n.add({ kind: 'reshape', input: x, shape: [1, 512] }, 'flatten'), 512, 1000, 'fc');
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [1, 3, size, size] }], layers: n.layers, outputs: [{ tensor: x, name: 'y' }] };
};

export const updatesOf = (net: NetworkDefinition) => networkWeights(net).map(({ layer, role, weights }) => ({ layer, role, weights }));
export const weightBytes = (net: NetworkDefinition) => networkWeights(net).reduce((s, w) => s + w.weights.data.byteLength, 0);

const measure = async (label: string, a: NetworkDefinition, b: NetworkDefinition, figures: Record<string, Figure>, ratios: Record<string, number>, memcpy: number) => {
  let start = process.hrtime.bigint();
  const engine = buildEngine(a, { tacticSearch: true });
  const buildSeconds = Number(process.hrtime.bigint() - start) / 1e9;
  const updates = [updatesOf(b), updatesOf(a)];
  let turn = 0;
  // Alternate B and A so every weight changes on every timed refit.
  const refitSeconds = await bestOf(3, () => engine.refit(updates[turn++ % 2]));
  const bytes = weightBytes(a);
  const gbps = bytes / refitSeconds / 1e9;
  start = process.hrtime.bigint();
  engine[Symbol.dispose]();
  figures[`${label}_weights`] = { value: bytes / 1e6, unit: 'MB' };
  figures[`${label}_build`] = { value: buildSeconds, unit: 's' };
  figures[`${label}_refit`] = { value: refitSeconds, unit: 's' };
  figures[`${label}_refit_throughput`] = { value: gbps, unit: 'GB/s' };
  ratios[`${label}_build_over_refit`] = buildSeconds / refitSeconds;
  ratios[`${label}_refit_GBps_over_memcpy_GBps`] = gbps / (memcpy / 1e9);
};

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  const memcpy = await hostMemcpyBandwidth();
  figures.host_memcpy = { value: memcpy / 1e9, unit: 'GB/s' };
  await measure('transformer', transformer(1), transformer(2), figures, ratios, memcpy);
  await measure('resnet', resnet(1), resnet(2), figures, ratios, memcpy);
  writeResult('engine-build-vs-refit', figures, ratios);
};
