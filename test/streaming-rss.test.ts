/**
 * Resident weight memory measured through the process: a fresh process loads a ~100 MB streaming engine
 * from its file (streamable weights stay in the file mapping, which is not anonymous memory), runs it at
 * a budget, and its anonymous memory grows by at most budget + window, plus what is not streamable
 * (biases), activations and a fixed slack for the runtime. At the full budget it grows by about the
 * whole model, which shows the measure sees the resident arena. Linux only (/proc/self/status).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildEngine } from '../ffi/index.js';
import type { Layer, NetworkDefinition } from '../src/network/types.js';
import { randomWeights, rng } from './support/networks.js';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const child = join(repoRoot, 'test', 'support', 'streaming-rss-child.ts');
const slack = 48 << 20; // V8 and koffi allocations, thread stacks, allocator overhead

const bigNetwork = (): NetworkDefinition => {
  const width = 2048;
  const r = rng(5);
  const layers: Layer[] = Array.from({ length: 6 }, (_, i) => ({
    kind: 'fullyConnected',
    name: `fc${i}`,
    output: `fc${i}`,
    input: i === 0 ? 'x' : `fc${i - 1}`,
    outFeatures: width,
    kernel: randomWeights(r, 'float32', [width, width], -0.02, 0.02),
    bias: randomWeights(r, 'float32', [width], -0.1, 0.1),
  }));
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [4, width] }], layers, outputs: [{ tensor: 'fc5', name: 'y' }] };
};

interface Measure {
  growth: number;
  budget: number;
  streamable: number;
  window: number;
  peak: number;
  weightBytes: number;
  scratchBytes: number;
}

describe.runIf(existsSync('/proc/self/status'))('process memory of a streaming engine loaded from its file', () => {
  let dir = '';
  let file = '';
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'streaming-rss-'));
    file = join(dir, 'big.engine');
    using engine = buildEngine(bigNetwork(), { weightStreaming: true });
    engine.save(file);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const measure = (permille: number): Measure => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', child, file, String(permille)], { cwd: repoRoot, encoding: 'utf8', env: process.env });
    if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`);
    return JSON.parse(r.stdout) as Measure;
  };

  for (const permille of [0, 250, 1000]) {
    it(`budget ${permille / 10}%: anonymous memory grows by at most budget + window (+ slack)`, () => {
      const m = measure(permille);
      const notStreamable = m.weightBytes - m.streamable;
      const bound = m.budget + m.window + notStreamable + m.scratchBytes + slack;
      expect(m.peak).toBeLessThanOrEqual(m.budget + m.window);
      expect(m.growth, JSON.stringify(m)).toBeLessThanOrEqual(bound);
      if (permille === 1000) expect(m.growth, JSON.stringify(m)).toBeGreaterThanOrEqual(m.streamable * 0.9);
    }, 60_000);
  }
});
