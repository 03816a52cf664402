/**
 * Opening files on behalf of an input (ONNX external data, checkpoint shards, adapter files) so that they
 * stay inside the folder of the file that names them: the file is opened first (non-blocking, so a FIFO
 * cannot block the open), then the opened descriptor is checked: it must be a regular file (no FIFO,
 * device, socket or directory), and its real path (the /proc/self/fd link of the open descriptor, or
 * fs.realpath where /proc is missing) must lie inside one of the allowed real directories. Lexical
 * checks alone (no `..`, not absolute) do not see symbolic links; this does.
 */
import { closeSync, constants, fstatSync, openSync, readlinkSync, readSync, realpathSync, type Stats } from 'node:fs';
import { dirname, isAbsolute, normalize, resolve, sep } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';

/** What a descriptor refers to, in words, for a file that is not a regular file. */
export const fileKind = (s: Stats): string =>
  s.isFile() ? 'a regular file'
  : s.isDirectory() ? 'a directory'
  : s.isFIFO() ? 'a FIFO (named pipe)'
  : s.isCharacterDevice() ? 'a character device'
  : s.isBlockDevice() ? 'a block device'
  : s.isSocket() ? 'a socket'
  : 'not a regular file';

/** A name given inside an input file, as a path relative to that file's folder: refused when it is empty,
 *  absolute, a URL or leaves the folder lexically. Right: the normalized relative path. */
export const relativeInside = (name: string): E.Either<string, string> => {
  if (name === '') return E.left('the name is empty');
  if (name.includes('\0')) return E.left('the name holds a NUL character');
  if (/^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.test(name)) return E.left(`'${name}' is a URL, not a relative path`);
  const normalized = normalize(name);
  if (isAbsolute(name) || isAbsolute(normalized)) return E.left(`'${name}' is an absolute path`);
  if (normalized === '..' || normalized.startsWith(`..${sep}`)) return E.left(`'${name}' leaves the folder`);
  return E.right(normalized);
};

/** The real directories a file named from `directory` may lie in: the folder's real path and, when the
 *  naming file is itself a link (a Hugging Face cache snapshot), the real folder of the naming file. */
export const allowedRoots = (directory: string, namingFile?: string): string[] => {
  const roots = new Set<string>();
  try {
    roots.add(realpathSync(directory));
  } catch {
    // an unreadable folder: nothing is inside it
  }
  if (namingFile !== undefined) {
    try {
      roots.add(dirname(realpathSync(namingFile)));
    } catch {
      // likewise
    }
  }
  const blobs = huggingFaceBlobs(directory);
  if (blobs !== undefined) roots.add(blobs);
  return [...roots];
};

/**
 * A folder inside a Hugging Face hub cache snapshot (`<cache>/models--org--name/snapshots/<revision>/...`)
 * holds links into the repository's own `blobs/` folder: that folder (and only that one) is inside too.
 */
export const huggingFaceBlobs = (directory: string): string | undefined => {
  const parts = resolve(directory).split(sep);
  for (let i = parts.length - 2; i >= 1; i--) {
    if (parts[i] !== 'snapshots' || !/^(models|datasets|spaces)--./.test(parts[i - 1])) continue;
    try {
      return realpathSync([...parts.slice(0, i), 'blobs'].join(sep) || sep);
    } catch {
      return undefined;
    }
  }
  return undefined;
};

const inside = (real: string, root: string): boolean => real === root || real.startsWith(root.endsWith(sep) ? root : `${root}${sep}`);

/** The real path of an open descriptor. */
const realPathOf = (fd: number, path: string): string => {
  try {
    const link = readlinkSync(`/proc/self/fd/${fd}`);
    if (link.startsWith('/') && !link.endsWith(' (deleted)')) return link;
  } catch {
    // no /proc: fall back on the path (the descriptor's identity is checked against it below)
  }
  return realpathSync(path);
};

/** How a reason starts when the file could not be opened at all (missing, no permission), as opposed to
 *  opened and refused. */
export const OPEN_FAILED = 'cannot open it: ';

export interface ConfinedFile {
  readonly fd: number;
  readonly path: string;
  readonly realPath: string;
  readonly stats: Stats;
}

/**
 * Opens `path` read-only and checks it: a regular file whose real path lies inside one of `roots`
 * (no check when roots is undefined). Left: the reason, in words (the caller names the file). The caller
 * closes the descriptor of a Right.
 */
export const openConfined = (path: string, roots: readonly string[] | undefined): E.Either<string, ConfinedFile> => {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | (constants.O_NOCTTY ?? 0));
  } catch (e) {
    return E.left(`${OPEN_FAILED}${(e as Error).message}`);
  }
  try {
    const stats = fstatSync(fd);
    if (!stats.isFile()) throw new Refusal(`it is ${fileKind(stats)}, not a regular file`);
    if (roots !== undefined) {
      const real = realPathOf(fd, path);
      if (!roots.some((r) => inside(real, r))) {
        throw new Refusal(`it resolves to '${real}', outside the folder ${roots.map((r) => `'${r}'`).join(' / ')} (through a symbolic link)`);
      }
      return E.right({ fd, path, realPath: real, stats });
    }
    return E.right({ fd, path, realPath: path, stats });
  } catch (e) {
    closeSync(fd);
    return E.left(e instanceof Refusal ? e.reason : `cannot inspect it: ${(e as Error).message}`);
  }
};

class Refusal {
  constructor(readonly reason: string) {}
}

/** Checks `path` as openConfined does and closes it again; Right: its stats. */
export const checkConfined = (path: string, roots: readonly string[] | undefined): E.Either<string, Stats> => {
  const opened = openConfined(path, roots);
  if (E.isLeft(opened)) return opened;
  closeSync(opened.right.fd);
  return E.right(opened.right.stats);
};

const readRange = (fd: number, size: number, offset: number, length: number): E.Either<string, Uint8Array> => {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    return E.left(`range offset ${offset} length ${length} lies outside the file of ${size} bytes`);
  }
  try {
    const bytes = new Uint8Array(length);
    for (let done = 0; done < length; ) {
      const n = readSync(fd, bytes, done, Math.min(length - done, 1 << 30), offset + done);
      if (n === 0) return E.left(`the file ends at ${offset + done}; ${length - done} more bytes were expected`);
      done += n;
    }
    return E.right(bytes);
  } catch (e) {
    return E.left(`cannot read it: ${(e as Error).message}`);
  }
};

/**
 * Reads bytes [offset, offset + length) of a confined file, after checking the range against the file's
 * size: only that range is read. Left: the reason.
 */
export const readConfinedRange = (path: string, roots: readonly string[] | undefined, offset: number, length: number): E.Either<string, Uint8Array> => {
  const opened = openConfined(path, roots);
  if (E.isLeft(opened)) return opened;
  try {
    return readRange(opened.right.fd, opened.right.stats.size, offset, length);
  } finally {
    closeSync(opened.right.fd);
  }
};

/** Reads a whole confined file, refusing one over `maxBytes`. */
export const readConfinedFile = (path: string, roots: readonly string[] | undefined, maxBytes = 2 ** 31 - 1): E.Either<string, Uint8Array> => {
  const opened = openConfined(path, roots);
  if (E.isLeft(opened)) return opened;
  const { fd, stats } = opened.right;
  try {
    if (stats.size > maxBytes) return E.left(`it has ${stats.size} bytes; more than ${maxBytes} is refused`);
    return readRange(fd, stats.size, 0, stats.size);
  } finally {
    closeSync(fd);
  }
};

/** Reads a whole confined file as UTF-8 text (JSON configs and indexes), refusing one over `maxBytes`. */
export const readConfinedText = (path: string, roots: readonly string[] | undefined, maxBytes = 1 << 28): E.Either<string, string> => {
  const bytes = readConfinedFile(path, roots, maxBytes);
  return E.isLeft(bytes) ? bytes : E.right(new TextDecoder('utf-8').decode(bytes.right));
};
