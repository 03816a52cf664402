/**
 * Child process of test/quant-reload-rss.test.ts and bench/quant-reload.ts: builds an FC stack engine of
 * LAYERS layers of WIDTH x WIDTH in FORMAT (fp32, int8, fp8, int4), reloads CHECKPOINT into it layer by
 * layer, and prints as JSON the peak growth of its anonymous memory (RssAnon, sampled every ~0.2 ms by a
 * worker thread) over the reload, the reload's time, and its summary.
 * Usage: node --expose-gc --import tsx quant-reload-child.ts CHECKPOINT LAYERS WIDTH FORMAT
 */
import { readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { buildEngine, type BuildOptions } from '../../ffi/engine.js';
import { openSafetensors } from '../../src/safetensors/index.js';
import { reloadCheckpoint } from '../../src/quant/reload.js';
import { fcStack } from './fc-stack.js';

const rssAnon = (): number => Number(/RssAnon:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;

const formatOptions: Record<string, BuildOptions> = {
  fp32: {},
  int8: { weightFormat: 'int8' },
  fp8: { weightFormat: 'fp8_e4m3' },
  int4: { weightFormat: 'int4', int4GroupSize: 128 },
};

const main = async () => {
  const [checkpoint, layersText, widthText, format] = process.argv.slice(2);
  const gc = (globalThis as { gc?: () => void }).gc ?? (() => undefined);
  const engine = buildEngine(fcStack(Number(layersText), Number(widthText), 0.001), { ...formatOptions[format], numThreads: 1 });
  using file = await openSafetensors(checkpoint);
  engine.info(); // bind what the reload calls before measuring
  gc();
  // cells: [0] peak RssAnon seen, [1] stop flag, [2] samples taken (the handshake: no sleeps).
  const peak = new SharedArrayBuffer(24);
  const cells = new Float64Array(peak);
  // The sampler allocates nothing per sample (one buffer, pread of /proc/self/status, digits parsed by
  // hand), so its own garbage does not show up as growth.
  const sampler = new Worker(
    `const { workerData } = require('node:worker_threads'); const fs = require('node:fs');
     const cells = new Float64Array(workerData); const buf = Buffer.alloc(8192); const fd = fs.openSync('/proc/self/status', 'r');
     const key = Buffer.from('RssAnon:');
     while (cells[1] === 0) {
       const n = fs.readSync(fd, buf, 0, buf.length, 0);
       const at = buf.indexOf(key);
       if (at < 0 || at >= n) continue;
       let v = 0; for (let i = at + key.length; i < n; i++) { const c = buf[i]; if (c >= 48 && c <= 57) v = v * 10 + (c - 48); else if (v > 0) break; }
       v *= 1024; if (v > cells[0]) cells[0] = v;
       cells[2] += 1;
     }`,
    { eval: true, workerData: peak },
  );
  const tick = () => new Promise((r) => setImmediate(r));
  while (cells[2] === 0) await tick(); // the sampler runs: it has taken a sample
  const before = Math.max(rssAnon(), cells[0]);
  cells[0] = before;
  const t0 = process.hrtime.bigint();
  const summary = reloadCheckpoint(engine, file);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  // Two more complete samples after the reload returned, so what it left behind is seen too.
  const taken = cells[2];
  while (cells[2] < taken + 2) await tick();
  cells[1] = 1;
  await sampler.terminate();
  process.stdout.write(JSON.stringify({ peakGrowth: cells[0] - before, seconds, summary, weightBytes: engine.info().weightBytes }));
  engine[Symbol.dispose]();
};
await main();
