// Builds libtrtshim from source with make. Runs as the package's own install script, so a fresh
// `npm install` leaves a working native library; nothing is downloaded.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const native = join(root, 'libtrtshim');
const jobs = String(Math.max(1, (await import('node:os')).availableParallelism?.() ?? 1));
const args = ['-C', native, '-j', jobs];
if (process.argv.includes('--force')) spawnSync('make', ['-C', native, 'clean'], { stdio: 'inherit' });
const result = spawnSync('make', args, { stdio: 'inherit' });
if (result.error) {
  console.error(`trt-refit: could not run make to build libtrtshim: ${result.error.message}`);
  process.exit(1);
}
if (result.status !== 0 || !existsSync(join(native, 'build', 'libtrtshim.so'))) {
  console.error('trt-refit: building libtrtshim failed (see the compiler output above)');
  process.exit(result.status || 1);
}
