/** A writer killed mid-write leaves the previous file intact under the target name (or, killed after the
 *  rename, the complete new one), never a half-written file. The child writer kills itself at a chosen
 *  step (src/crash-point.ts, TRT_REFIT_CRASH_AT): every step of the atomic write is hit on purpose, with no
 *  wall-clock delays to calibrate. */
import { spawn } from 'node:child_process';
import { readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openSafetensors } from '../src/safetensors/reader.js';
import { writeSafetensors } from '../src/safetensors/writer.js';
import { CRASH_ENV } from '../src/crash-point.js';
import { killTestTensors } from './support/safetensors-kill-child.js';
import { repoRoot, temporaryDirectory } from './support/safetensors.js';

const child = join(repoRoot, 'test', 'support', 'safetensors-kill-child.ts');

/** Runs the child writer to its end, or to its crash at `crashAt`. */
const runChild = (target: string, crashAt?: string): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string }> =>
  new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, ['--import', 'tsx', child, target], { cwd: repoRoot, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, [CRASH_ENV]: crashAt ?? '' } });
    let stdout = '';
    proc.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    proc.on('error', reject);
    proc.on('exit', (code, signal) => resolve({ code, signal, stdout }));
  });

const previousTensor = [{ name: 'previous', dtype: 'U8' as const, shape: [3], data: new Uint8Array([1, 2, 3]) }];
const tensors = killTestTensors();
const tensorBytes = 512 * 1024;

describe('a writer killed mid-write', () => {
  it('leaves the previous file, or the complete new one, under the target name, at every step of the write', async () => {
    using dir = temporaryDirectory();
    const target = join(dir.path, 'model.safetensors');
    const temporaries = () => readdirSync(dir.path).filter((f) => f.includes('.tmp-'));

    // The complete file, written by a child that is not stopped.
    const full = await runChild(join(dir.path, 'complete.safetensors'));
    expect(full).toMatchObject({ code: 0, signal: null });
    expect(full.stdout).toContain('done');
    const complete = readFileSync(join(dir.path, 'complete.safetensors'));
    rmSync(join(dir.path, 'complete.safetensors'));
    expect(temporaries()).toEqual([]);
    const headerBytes = 8 + Number(complete.readBigUInt64LE(0));
    expect(complete.length).toBe(headerBytes + tensors.length * tensorBytes);

    // Each crash point, and how much of the temporary file must be there when the process dies.
    const cases: { at: string; renamed: boolean; written?: number }[] = [
      { at: 'safetensors.opened', renamed: false, written: headerBytes },
      { at: 'safetensors.tensor#1', renamed: false, written: headerBytes + tensorBytes },
      { at: 'safetensors.tensor#33', renamed: false, written: headerBytes + 33 * tensorBytes },
      { at: `safetensors.tensor#${tensors.length}`, renamed: false, written: complete.length },
      { at: 'safetensors.synced', renamed: false, written: complete.length },
      { at: 'safetensors.renamed', renamed: true },
    ];
    for (const c of cases) {
      await writeSafetensors(target, previousTensor);
      const previous = readFileSync(target);
      const run = await runChild(target, c.at);
      expect(run.signal, c.at).toBe('SIGKILL');
      expect(run.stdout).not.toContain('done');
      const now = readFileSync(target);
      expect(now.equals(c.renamed ? complete : previous), c.at).toBe(true);
      // Whatever is there opens strictly.
      using file = await openSafetensors(target);
      expect(file.tensors.size).toBe(c.renamed ? tensors.length : 1);
      // Before the rename the killed writer's temporary is left beside the target, as far as it got.
      const left = temporaries();
      expect(left.length, c.at).toBe(c.renamed ? 0 : 1);
      if (c.written !== undefined) {
        expect(statSync(join(dir.path, left[0])).size, c.at).toBe(c.written);
        // Its bytes are the complete file's, as far as they go.
        expect(readFileSync(join(dir.path, left[0])).equals(complete.subarray(0, c.written)), c.at).toBe(true);
      }
      for (const f of left) rmSync(join(dir.path, f));
    }
  });
});
