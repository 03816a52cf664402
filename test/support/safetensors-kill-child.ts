/** Child process for the kill test: writes `target` (64 tensors of 512 KiB, produced lazily and yielding
 *  to the event loop between them) and says "writing" on stdout when it starts. */
import { writeSafetensors } from '../../src/safetensors/writer.js';

export const killTestTensors = (count = 64, bytes = 512 * 1024) =>
  Array.from({ length: count }, (_, i) => ({
    name: `t${String(i).padStart(3, '0')}`,
    dtype: 'U8' as const,
    shape: [bytes],
    data: async () => {
      await new Promise((resolve) => setImmediate(resolve));
      return new Uint8Array(bytes).fill((i * 7 + 1) & 0xff);
    },
  }));

const target = process.argv[2];
if (target !== undefined) {
  process.stdout.write('writing\n');
  await writeSafetensors(target, killTestTensors(), { writer: 'child' });
  process.stdout.write('done\n');
}
