/**
 * The machine parts of the cache key, read at the edge: the CPU model and the instruction-set features
 * kernels choose by (from /proc/cpuinfo), and the native backend's name, version and ABI version.
 */
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { abiVersion, libraryVersion } from '../../ffi/library.js';
import type { BackendInfo, DeviceInfo } from './key.js';

/** Flags that change which kernels a backend can pick (or how fast they are). */
export const KERNEL_FEATURES: readonly string[] = [
  'sse4_2', 'avx', 'avx2', 'fma', 'f16c',
  'avx512f', 'avx512bw', 'avx512dq', 'avx512vl', 'avx512_bf16', 'avx512_fp16', 'avx512_vnni', 'avx_vnni',
  'amx_tile', 'amx_bf16', 'amx_int8', 'amx_fp16',
  'asimd', 'sve', 'sve2', 'bf16', 'i8mm', // aarch64
];

/** Model and kernel-relevant flags from a /proc/cpuinfo text (the first processor's). */
export const parseCpuInfo = (text: string): DeviceInfo => {
  let model = '';
  let flags: string[] = [];
  for (const line of text.split('\n')) {
    const at = line.indexOf(':');
    if (at < 0) continue;
    const k = line.slice(0, at).trim();
    const v = line.slice(at + 1).trim();
    if (model === '' && (k === 'model name' || k === 'Model' || k === 'CPU part')) model = v;
    if (flags.length === 0 && (k === 'flags' || k === 'Features')) flags = v.split(/\s+/);
  }
  const wanted = new Set(KERNEL_FEATURES);
  return { kind: 'cpu', model, features: [...new Set(flags.filter((f) => wanted.has(f)))].sort() };
};

let cachedDevice: DeviceInfo | undefined;

/** This machine's CPU (read once per process). */
export const currentDevice = (): DeviceInfo => {
  if (cachedDevice !== undefined) return cachedDevice;
  let info: DeviceInfo;
  try {
    info = parseCpuInfo(readFileSync('/proc/cpuinfo', 'utf8'));
  } catch {
    info = { kind: 'cpu', model: '', features: [] };
  }
  if (info.model === '') info = { ...info, model: cpus()[0]?.model ?? 'unknown' };
  cachedDevice = { ...info, model: `${info.model} (${process.arch})` };
  return cachedDevice;
};

/** The loaded libtrtshim: its `ref` backend, version and ABI version. */
export const nativeBackend = (): BackendInfo => ({ name: 'libtrtshim-ref', version: libraryVersion(), abi: abiVersion() });
