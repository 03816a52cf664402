/**
 * Child process of test/streaming-rss.test.ts: loads a streaming engine file (its weights stay in the
 * mapped file), sets the budget to PERMILLE of its streamable bytes, runs twice, and prints as JSON how
 * much its anonymous memory (RssAnon) grew from just before the load, with the engine's own figures.
 * Usage: streaming-rss-child.ts ENGINE_FILE PERMILLE
 */
import { readFileSync } from 'node:fs';
import { Engine } from '../../ffi/engine.js';

const rssAnon = (): number => {
  const m = /RssAnon:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  if (m === null) throw new Error('no RssAnon in /proc/self/status');
  return Number(m[1]) * 1024;
};

const [path, permilleText] = process.argv.slice(2);
const permille = Number(permilleText);
// Everything the run needs on the JavaScript side is made before the first measurement.
const probe = Engine.load(path);
const io = probe.io();
probe[Symbol.dispose]();
const buffers = io.map((d) => ({ name: d.name, data: new Float32Array(d.shape.reduce((a, b) => a * b, 1)).fill(0.25) }));
const before = rssAnon();
const engine = Engine.load(path);
const streamable = engine.streamableWeightBytes();
const budget = Math.floor((streamable * permille) / 1000);
engine.setWeightStreamingBudget(budget);
const context = engine.createContext();
for (const b of buffers) context.setTensor(b.name, b.data);
context.execute();
context.execute();
const after = rssAnon();
const stats = engine.weightStreamingStats();
const info = engine.info();
process.stdout.write(
  JSON.stringify({ growth: after - before, budget, streamable, window: stats.windowBytes, peak: stats.peakBytes, weightBytes: info.weightBytes, scratchBytes: info.scratchBytes }),
);
context[Symbol.dispose]();
engine[Symbol.dispose]();
