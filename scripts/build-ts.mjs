// Compiles the TypeScript sources to dist/ when they are present (a checkout, not a published package),
// so that the `trt-refit` command runs from a fresh `npm install`.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
if (!existsSync(join(root, 'tsconfig.build.json')) || !existsSync(join(root, 'src'))) process.exit(0);
let tsc;
try {
  tsc = createRequire(join(root, 'package.json')).resolve('typescript/bin/tsc');
} catch {
  console.error('trt-refit: typescript is not installed; skipping the build of dist/ (the published package ships it)');
  process.exit(0);
}
const result = spawnSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json')], { stdio: 'inherit' });
process.exit(result.status ?? 1);
