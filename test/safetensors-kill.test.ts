/** A writer killed at a random moment leaves the previous file intact under the target name (or, killed
 *  after the rename, the complete new one), never a half-written file. */
import { spawn } from 'node:child_process';
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc } from '@fast-check/vitest';
import { openSafetensors } from '../src/safetensors/reader.js';
import { writeSafetensors } from '../src/safetensors/writer.js';
import { killTestTensors } from './support/safetensors-kill-child.js';
import { repoRoot, temporaryDirectory } from './support/safetensors.js';

const child = join(repoRoot, 'test', 'support', 'safetensors-kill-child.ts');

/** Runs the child writer; kills it `delayMs` after it says it started (never, if undefined). */
const runChild = (target: string, delayMs?: number): Promise<{ killed: boolean; ms: number }> =>
  new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, ['--import', 'tsx', child, target], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'inherit'] });
    let started = 0;
    proc.stdout.on('data', (chunk: Buffer) => {
      if (started === 0 && chunk.toString().includes('writing')) {
        started = performance.now();
        if (delayMs !== undefined) setTimeout(() => proc.kill('SIGKILL'), delayMs);
      }
    });
    proc.on('error', reject);
    proc.on('exit', (code, signal) => resolve({ killed: signal === 'SIGKILL', ms: performance.now() - started }));
  });

describe('a writer killed mid-write', () => {
  it('leaves the previous file, or the complete new one, under the target name', async () => {
    using dir = temporaryDirectory();
    const target = join(dir.path, 'model.safetensors');
    await writeSafetensors(target, [{ name: 'previous', dtype: 'U8', shape: [3], data: new Uint8Array([1, 2, 3]) }]);
    const previous = readFileSync(target);

    // A full run tells how long writing takes here; kills are spread over that time.
    const full = await runChild(join(dir.path, 'calibration.safetensors'));
    expect(full.killed).toBe(false);
    const complete = readFileSync(join(dir.path, 'calibration.safetensors'));
    rmSync(join(dir.path, 'calibration.safetensors'));

    // One kill at half time for certain, the others at random moments up to a little past the end.
    const delays = [Math.round(full.ms / 2), ...fc.sample(fc.integer({ min: 0, max: Math.max(1, Math.ceil(full.ms * 1.2)) }), { numRuns: 5 })];
    let leftTemporary = 0;
    for (const delay of delays) {
      const run = await runChild(target, delay);
      const now = readFileSync(target);
      const isPrevious = now.equals(previous);
      expect(isPrevious || now.equals(complete)).toBe(true);
      if (!run.killed) expect(now.equals(complete)).toBe(true);
      // Whatever is there opens strictly.
      using file = await openSafetensors(target);
      expect(file.tensors.size).toBe(isPrevious ? 1 : 64);
      const temporaries = readdirSync(dir.path).filter((f) => f.includes('.tmp-'));
      leftTemporary += temporaries.length;
      for (const f of temporaries) rmSync(join(dir.path, f));
      if (!isPrevious) {
        await writeSafetensors(target, [{ name: 'previous', dtype: 'U8', shape: [3], data: new Uint8Array([1, 2, 3]) }]);
      }
    }
    // At least one kill landed mid-write (a temporary was left behind), so the interesting case ran.
    expect(leftTemporary).toBeGreaterThan(0);
    expect(killTestTensors().length).toBe(64);
  });
});
