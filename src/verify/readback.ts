/**
 * Read-back verification of a built or loaded engine: every weight's digest as the engine's kernels hold it
 * (Engine.weightDigests, computed by libtrtshim from the packed buffers) must equal the digest of the
 * network-level value it was built or refitted with, as the TypeScript reference says that engine holds it
 * (expectedHeldDigests: rounding to the precision, quantizing for quantized kernels). Compile and cache hits
 * run it before they report success; the effect runs the same comparison for the weights a refit staged.
 */
import type { Engine } from '../../ffi/engine.js';
import type { NetworkDefinition } from '../network/types.js';
import { expectedHeldDigests, type HeldForm } from './expected.js';

export interface ReadbackMismatch {
  readonly weight: string;
  readonly expected: string;
  /** The engine's digest, or why it could not report one. */
  readonly found: string;
}

/** The weights whose read-back differs from the network's values (empty when all match). An engine that
 *  cannot report at all gives one entry naming the reason. */
export const engineReadback = (engine: Engine, network: NetworkDefinition): ReadbackMismatch[] => {
  let held: ReadonlyMap<string, string>;
  try {
    held = engine.weightDigests();
  } catch (e) {
    return [{ weight: '(all)', expected: '', found: `the engine cannot be read back: ${e instanceof Error ? e.message : String(e)}` }];
  }
  const expected = expectedHeldDigests(network, engine.info().weightPrecision as HeldForm['precision'], engine.kernelFormats());
  const out: ReadbackMismatch[] = [];
  for (const [key, digest] of expected) {
    const found = held.get(key);
    if (found !== digest) out.push({ weight: key.replace('\u0000', ' '), expected: digest, found: found ?? 'no such weight in the engine' });
  }
  return out;
};
