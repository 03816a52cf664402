import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    maxWorkers: 2,
    // The CLI caches engines by default; tests (and the CLI processes they start) use a cache of their
    // own instead of the user's.
    env: { TRT_REFIT_CACHE: process.env.TRT_REFIT_CACHE ?? join(tmpdir(), `trt-refit-test-cache-${process.pid}`) },
  },
});
