#!/usr/bin/env node
// The trt-refit command: runs the compiled CLI (dist/, built by `npm install`).
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const entry = join(root, 'dist', 'src', 'cli', 'main.js');
if (!existsSync(entry)) {
  console.error('trt-refit: the compiled CLI is missing (dist/src/cli/main.js): run `npm install` or `npm run build` in ' + root);
  process.exit(1);
}
const { main } = await import(pathToFileURL(entry).href);
process.exitCode = await main(process.argv.slice(2));
