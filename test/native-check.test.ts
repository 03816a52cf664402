import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';

// The C-level tests of libtrtshim (libtrtshim/test/*.c: engine, layers, gemm, quantization, streaming,
// transforms), built into their own folder and run by `make check`, so `npm test` runs them too.
const root = join(dirname(fileURLToPath(import.meta.url)), '..');

it('libtrtshim C tests pass (make check)', () => {
  const result = spawnSync('make', ['-C', join(root, 'libtrtshim'), 'BUILD=build/check', '-j2', 'check'], { encoding: 'utf8' });
  const output = `${result.stdout}\n${result.stderr}`;
  expect(result.error).toBeUndefined();
  expect(result.status, output.slice(-4000)).toBe(0);
  // Every test program ran and reported ok.
  const ran = output.match(/^== .*$/gm) ?? [];
  expect(ran.length).toBeGreaterThanOrEqual(6);
}, 300_000);
