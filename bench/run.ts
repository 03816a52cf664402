/**
 * `npm run bench` runs every benchmark; `npm run bench -- NAME [NAME...]` runs the named ones. Each
 * benchmark is bench/NAME.ts exporting `run(): Promise<void>`, and writes bench/results/NAME.json.
 */
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const available = readdirSync(here)
  .filter((f) => f.endsWith('.ts') && f !== 'run.ts' && f !== 'lib.ts')
  .map((f) => f.slice(0, -3))
  .sort();
const requested = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const unknown = requested.filter((r) => !available.includes(r));
if (unknown.length > 0) {
  console.error(`unknown benchmark ${unknown.join(', ')}; available: ${available.join(', ')}`);
  process.exit(2);
}
for (const name of requested.length > 0 ? requested : available) {
  const module = (await import(pathToFileURL(join(here, `${name}.ts`)).href)) as { run: () => Promise<void> };
  await module.run();
}
