/** Runs the CLI from source (`node --import tsx src/cli/entry.ts ...`); bin/trt-refit.js runs dist/. */
import { main } from './main.js';

process.exitCode = await main(process.argv.slice(2));
