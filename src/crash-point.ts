/**
 * Crash points: a test hook for the crash-consistency tests. Code that writes files atomically marks its
 * steps with `crashPoint('name')`; when the environment variable TRT_REFIT_CRASH_AT is `name` (or
 * `name#N`: the N-th time that point is reached, counting from 1), the process kills itself with SIGKILL
 * there, as a power cut or `kill -9` would stop it. Without the variable a crash point does nothing but
 * read it. A test starts a child process with the variable set, so the crash lands at a chosen step
 * instead of after a wall-clock delay.
 *
 * Points: safetensors.opened, safetensors.tensor (after each tensor's bytes), safetensors.synced (before
 * the rename), safetensors.renamed (after the rename, before the directory sync); cache.put.blob (after
 * each blob), cache.put.staged (every file written and synced, before the rename), cache.put.renamed.
 */
export const CRASH_ENV = 'TRT_REFIT_CRASH_AT';

const reached = new Map<string, number>();

export const crashPoint = (name: string): void => {
  const at = process.env[CRASH_ENV];
  if (at === undefined || at === '') return;
  const [point, nth] = at.split('#');
  if (point !== name) return;
  const count = (reached.get(name) ?? 0) + 1;
  reached.set(name, count);
  if (count === (nth === undefined ? 1 : Number(nth))) process.kill(process.pid, 'SIGKILL');
};
