/** Child process for the cache's multi-process tests.
 *   compile ROOT MODEL   compiles a fixture with the cache, runs it, prints {cache, output sha256}
 *   insert ROOT          inserts a large entry (64 blobs), saying "writing" when it starts */
import { createHash } from 'node:crypto';
import { CacheStore, type Blob } from '../../src/cache/store.js';
import type { CacheKey } from '../../src/cache/key.js';

export const killTestKey: CacheKey = {
  digest: createHash('sha256').update('kill-test').digest('hex'),
  parts: { format: 1, segments: [], wiring: '', build: {}, backend: { name: 'test', version: '1', abi: 1 }, device: { kind: 'cpu', model: 'test', features: [] } },
  names: [],
};
export const killTestBlobs = (): Blob[] =>
  Array.from({ length: 64 }, (_, i) => ({ name: `blob-${String(i).padStart(2, '0')}`, data: new Uint8Array(256 * 1024).fill((i * 13 + 5) & 0xff) }));

const [mode, root, model] = process.argv.slice(2);
if (mode === 'insert' && root !== undefined) {
  const store = new CacheStore({ root });
  const blobs = killTestBlobs();
  process.stdout.write('writing\n');
  const r = await store.put(killTestKey, blobs);
  process.stdout.write(`${JSON.stringify(r)}\n`);
} else if (mode === 'compile' && root !== undefined && model !== undefined) {
  // Loaded here only: the insert mode starts faster without the compiler.
  const { compileModelWithCache } = await import('../../src/cache/model.js');
  const { fixtureAnalyzed, fixtureInputs } = await import('./cache-fixtures.js');
  const store = new CacheStore({ root });
  const analyzed = fixtureAnalyzed(model);
  const result = await compileModelWithCache(analyzed, store);
  using compiled = result.value;
  const outputs = await compiled.model.run(await fixtureInputs(model));
  const h = createHash('sha256');
  for (const name of Object.keys(outputs).sort()) h.update(new Uint8Array(outputs[name].data.buffer, outputs[name].data.byteOffset, outputs[name].data.byteLength));
  process.stdout.write(`${JSON.stringify({ cache: result.cache, output: h.digest('hex') })}\n`);
}
