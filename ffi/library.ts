/**
 * Loads libtrtshim through koffi and declares its C ABI (libtrtshim/include/trtshim.h).
 *
 * Functions are bound on first use, so a library built from a subset of the sources still serves the
 * calls it has. Every other module in ffi/ goes through `native()` and `check()`.
 */
import koffi, { type LibraryHandle } from 'koffi';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The ABI version this TypeScript side was written against (TRTSHIM_ABI_VERSION). */
export const EXPECTED_ABI_VERSION = 2;
export const MAX_RANK = 8;

export const Status = {
  OK: 0,
  ARGUMENT: 1,
  MEMORY: 2,
  NOT_FOUND: 3,
  STATE: 4,
  CORRUPT: 5,
  VERSION: 6,
  IO: 7,
  UNSUPPORTED: 8,
  VALIDATION: 9,
} as const;
export type StatusCode = (typeof Status)[keyof typeof Status];

const statusNames: Record<number, string> = {
  1: 'Argument',
  2: 'Memory',
  3: 'NotFound',
  4: 'State',
  5: 'Corrupt',
  6: 'Version',
  7: 'Io',
  8: 'Unsupported',
  9: 'Validation',
};

/** A failed call into libtrtshim: the status code, its name as a tag, and the library's message. */
export class NativeError extends Error {
  override readonly name = 'NativeError';
  readonly _tag = 'NativeError' as const;
  constructor(
    readonly call: string,
    readonly status: number,
    readonly kind: string,
    readonly detail: string,
  ) {
    super(`${call}: ${detail || kind}`);
  }
}

/** The library could not be found, loaded, or is of another ABI version. */
export class LibraryLoadError extends Error {
  override readonly name = 'LibraryLoadError';
  readonly _tag = 'LibraryLoadError' as const;
}

export const DType = {
  float32: 0,
  float16: 1,
  bfloat16: 2,
  int32: 3,
  int64: 4,
  int8: 5,
  uint8: 6,
  bool: 7,
  fp8_e4m3: 8,
  fp8_e5m2: 9,
  float64: 10,
} as const;
export type DTypeName = keyof typeof DType;
export const dtypeName = (code: number): DTypeName => {
  const entry = Object.entries(DType).find(([, v]) => v === code);
  if (entry === undefined) throw new NativeError('dtype', Status.ARGUMENT, 'Argument', `unknown dtype code ${code}`);
  return entry[0] as DTypeName;
};

export const Role = { kernel: 0, bias: 1, scale: 2, shift: 3, constant: 4, mean: 5, variance: 6 } as const;
export type RoleName = keyof typeof Role;
export const roleName = (code: number): RoleName => {
  const entry = Object.entries(Role).find(([, v]) => v === code);
  if (entry === undefined) throw new NativeError('role', Status.ARGUMENT, 'Argument', `unknown role code ${code}`);
  return entry[0] as RoleName;
};

// ---- koffi types ----------------------------------------------------------------------------------

const opaque = (name: string) => koffi.pointer(name, koffi.opaque());
export const types = (() => {
  const network = opaque('trtshim_network');
  const engine = opaque('trtshim_engine');
  const context = opaque('trtshim_context');
  const refitter = opaque('trtshim_refitter');
  const mapping = opaque('trtshim_mapping');
  const weights = koffi.struct('trtshim_weights', { dtype: 'int32_t', values: 'const void *', count: 'int64_t' });
  const convParams = koffi.struct('trtshim_conv_params', {
    out_channels: 'int32_t',
    kernel_h: 'int32_t',
    kernel_w: 'int32_t',
    stride_h: 'int32_t',
    stride_w: 'int32_t',
    pad_top: 'int32_t',
    pad_left: 'int32_t',
    pad_bottom: 'int32_t',
    pad_right: 'int32_t',
    dilation_h: 'int32_t',
    dilation_w: 'int32_t',
    groups: 'int32_t',
  });
  const poolParams = koffi.struct('trtshim_pool_params', {
    kernel_h: 'int32_t',
    kernel_w: 'int32_t',
    stride_h: 'int32_t',
    stride_w: 'int32_t',
    pad_top: 'int32_t',
    pad_left: 'int32_t',
    pad_bottom: 'int32_t',
    pad_right: 'int32_t',
    count_include_pad: 'int32_t',
  });
  const buildConfig = koffi.struct('trtshim_build_config', {
    weight_precision: 'int32_t',
    refittable: 'int32_t',
    strip_weights: 'int32_t',
    weight_streaming: 'int32_t',
    tactic_search: 'int32_t',
    num_threads: 'int32_t',
    // (quantization section) trtshim_weight_format values and the int4 group size
    gemm_weight_format: 'int32_t',
    conv_weight_format: 'int32_t',
    int4_group_size: 'int32_t',
  });
  const engineInfo = koffi.struct('trtshim_engine_info', {
    num_io: 'int32_t',
    num_inputs: 'int32_t',
    num_layers: 'int32_t',
    num_kernels: 'int32_t',
    num_weights: 'int32_t',
    refittable: 'int32_t',
    has_weights: 'int32_t',
    weight_precision: 'int32_t',
    weight_bytes: 'uint64_t',
    scratch_bytes: 'uint64_t',
  });
  return { network, engine, context, refitter, mapping, weights, convParams, poolParams, buildConfig, engineInfo };
})();

// (streaming section) the struct of trtshim_engine_weight_streaming_stats, registered by name for the prototypes.
export const weightStreamingStatsType = koffi.struct('trtshim_weight_streaming_stats', {
  streamable_bytes: 'uint64_t',
  budget_bytes: 'uint64_t',
  resident_bytes: 'uint64_t',
  streamed_bytes: 'uint64_t',
  window_bytes: 'uint64_t',
  allocated_bytes: 'uint64_t',
  peak_bytes: 'uint64_t',
  copied_bytes: 'uint64_t',
  runs: 'uint64_t',
});

/** C prototypes of the ABI, in koffi's declaration syntax. Enums are passed as int32_t. */
const prototypes = {
  trtshim_abi_version: 'int32_t trtshim_abi_version()',
  trtshim_version: 'const char *trtshim_version()',
  trtshim_last_error: 'const char *trtshim_last_error()',
  trtshim_dtype_size: 'int64_t trtshim_dtype_size(int32_t dtype)',

  trtshim_network_create: 'int32_t trtshim_network_create(_Out_ trtshim_network **out)',
  trtshim_network_destroy: 'void trtshim_network_destroy(trtshim_network *network)',
  trtshim_network_add_input:
    'int32_t trtshim_network_add_input(trtshim_network *network, const char *name, int32_t dtype, int32_t rank, const int64_t *dims, _Out_ int32_t *out)',
  trtshim_network_mark_output: 'int32_t trtshim_network_mark_output(trtshim_network *network, int32_t tensor, const char *name)',
  trtshim_network_add_fully_connected:
    'int32_t trtshim_network_add_fully_connected(trtshim_network *network, const char *name, int32_t input, int64_t out_features, const trtshim_weights *kernel, const trtshim_weights *bias, _Out_ int32_t *out)',
  trtshim_network_add_matrix_multiply:
    'int32_t trtshim_network_add_matrix_multiply(trtshim_network *network, const char *name, int32_t a, int32_t transpose_a, int32_t b, int32_t transpose_b, _Out_ int32_t *out)',
  trtshim_network_add_convolution:
    'int32_t trtshim_network_add_convolution(trtshim_network *network, const char *name, int32_t input, const trtshim_conv_params *params, const trtshim_weights *kernel, const trtshim_weights *bias, _Out_ int32_t *out)',
  trtshim_network_add_elementwise:
    'int32_t trtshim_network_add_elementwise(trtshim_network *network, const char *name, int32_t a, int32_t b, int32_t op, _Out_ int32_t *out)',
  trtshim_network_add_unary:
    'int32_t trtshim_network_add_unary(trtshim_network *network, const char *name, int32_t input, int32_t op, _Out_ int32_t *out)',
  trtshim_network_add_softmax:
    'int32_t trtshim_network_add_softmax(trtshim_network *network, const char *name, int32_t input, int32_t axis, _Out_ int32_t *out)',
  trtshim_network_add_layer_norm:
    'int32_t trtshim_network_add_layer_norm(trtshim_network *network, const char *name, int32_t input, int32_t axis, float epsilon, const trtshim_weights *scale, const trtshim_weights *shift, _Out_ int32_t *out)',
  trtshim_network_add_rms_norm:
    'int32_t trtshim_network_add_rms_norm(trtshim_network *network, const char *name, int32_t input, float epsilon, const trtshim_weights *scale, _Out_ int32_t *out)',
  trtshim_network_add_batch_norm:
    'int32_t trtshim_network_add_batch_norm(trtshim_network *network, const char *name, int32_t input, float epsilon, const trtshim_weights *scale, const trtshim_weights *shift, const trtshim_weights *mean, const trtshim_weights *variance, _Out_ int32_t *out)',
  trtshim_network_add_reduce:
    'int32_t trtshim_network_add_reduce(trtshim_network *network, const char *name, int32_t input, int32_t op, uint32_t axes_mask, int32_t keep_dims, _Out_ int32_t *out)',
  trtshim_network_add_pooling:
    'int32_t trtshim_network_add_pooling(trtshim_network *network, const char *name, int32_t input, int32_t op, const trtshim_pool_params *params, _Out_ int32_t *out)',
  trtshim_network_add_reshape:
    'int32_t trtshim_network_add_reshape(trtshim_network *network, const char *name, int32_t input, int32_t rank, const int64_t *dims, _Out_ int32_t *out)',
  trtshim_network_add_transpose:
    'int32_t trtshim_network_add_transpose(trtshim_network *network, const char *name, int32_t input, const int32_t *perm, _Out_ int32_t *out)',
  trtshim_network_add_concatenation:
    'int32_t trtshim_network_add_concatenation(trtshim_network *network, const char *name, int32_t count, const int32_t *inputs, int32_t axis, _Out_ int32_t *out)',
  trtshim_network_add_slice:
    'int32_t trtshim_network_add_slice(trtshim_network *network, const char *name, int32_t input, const int64_t *start, const int64_t *size, const int64_t *stride, _Out_ int32_t *out)',
  trtshim_network_add_gather:
    'int32_t trtshim_network_add_gather(trtshim_network *network, const char *name, int32_t data, int32_t indices, int32_t axis, _Out_ int32_t *out)',
  trtshim_network_add_constant:
    'int32_t trtshim_network_add_constant(trtshim_network *network, const char *name, int32_t rank, const int64_t *dims, const trtshim_weights *weights, _Out_ int32_t *out)',
  trtshim_network_tensor_shape:
    'int32_t trtshim_network_tensor_shape(const trtshim_network *network, int32_t tensor, _Out_ int32_t *dtype, _Out_ int32_t *rank, _Out_ int64_t *dims)',

  trtshim_build_config_default: 'void trtshim_build_config_default(_Out_ trtshim_build_config *config)',
  trtshim_build: 'int32_t trtshim_build(const trtshim_network *network, const trtshim_build_config *config, _Out_ trtshim_engine **out)',

  trtshim_engine_destroy: 'void trtshim_engine_destroy(trtshim_engine *engine)',
  trtshim_engine_serialized_size:
    'int32_t trtshim_engine_serialized_size(const trtshim_engine *engine, int32_t include_weights, _Out_ uint64_t *size)',
  trtshim_engine_serialize:
    'int32_t trtshim_engine_serialize(const trtshim_engine *engine, int32_t include_weights, void *buffer, uint64_t capacity, _Out_ uint64_t *written)',
  trtshim_engine_deserialize: 'int32_t trtshim_engine_deserialize(const void *data, uint64_t size, _Out_ trtshim_engine **out)',
  trtshim_engine_save: 'int32_t trtshim_engine_save(const trtshim_engine *engine, const char *path, int32_t include_weights)',
  trtshim_engine_load: 'int32_t trtshim_engine_load(const char *path, _Out_ trtshim_engine **out)',
  trtshim_engine_get_info: 'int32_t trtshim_engine_get_info(const trtshim_engine *engine, _Out_ trtshim_engine_info *info)',
  trtshim_engine_io:
    'int32_t trtshim_engine_io(const trtshim_engine *engine, int32_t index, _Out_ const char **name, _Out_ int32_t *is_input, _Out_ int32_t *dtype, _Out_ int32_t *rank, _Out_ int64_t *dims)',
  trtshim_engine_weight:
    'int32_t trtshim_engine_weight(const trtshim_engine *engine, int32_t index, _Out_ const char **name, _Out_ int32_t *role, _Out_ int32_t *dtype, _Out_ int32_t *rank, _Out_ int64_t *dims, _Out_ uint64_t *bytes)',
  trtshim_engine_describe:
    'int32_t trtshim_engine_describe(const trtshim_engine *engine, _Out_ uint8_t *buffer, uint64_t capacity, _Out_ uint64_t *length)',

  trtshim_context_create: 'int32_t trtshim_context_create(trtshim_engine *engine, _Out_ trtshim_context **out)',
  trtshim_context_destroy: 'void trtshim_context_destroy(trtshim_context *context)',
  trtshim_context_set_tensor: 'int32_t trtshim_context_set_tensor(trtshim_context *context, const char *name, void *data, uint64_t bytes)',
  trtshim_context_execute: 'int32_t trtshim_context_execute(trtshim_context *context)',

  trtshim_refitter_create: 'int32_t trtshim_refitter_create(trtshim_engine *engine, _Out_ trtshim_refitter **out)',
  trtshim_refitter_destroy: 'void trtshim_refitter_destroy(trtshim_refitter *refitter)',
  trtshim_refitter_set_weights:
    'int32_t trtshim_refitter_set_weights(trtshim_refitter *refitter, const char *name, int32_t role, const trtshim_weights *weights)',
  trtshim_refitter_set_check_finite: 'int32_t trtshim_refitter_set_check_finite(trtshim_refitter *refitter, int32_t check)',
  trtshim_refitter_missing_count: 'int32_t trtshim_refitter_missing_count(trtshim_refitter *refitter, _Out_ int32_t *count)',
  trtshim_refitter_missing:
    'int32_t trtshim_refitter_missing(trtshim_refitter *refitter, int32_t index, _Out_ const char **name, _Out_ int32_t *role)',
  trtshim_refitter_apply: 'int32_t trtshim_refitter_apply(trtshim_refitter *refitter)',
  trtshim_refitter_validate: 'int32_t trtshim_refitter_validate(trtshim_refitter *refitter)',

  trtshim_mapping_open: 'int32_t trtshim_mapping_open(const char *path, _Out_ trtshim_mapping **out)',
  trtshim_mapping_close: 'void trtshim_mapping_close(trtshim_mapping *mapping)',
  trtshim_mapping_data: 'int32_t trtshim_mapping_data(const trtshim_mapping *mapping, _Out_ void **data, _Out_ uint64_t *size)',
  trtshim_convert_to_f32: 'int32_t trtshim_convert_to_f32(int32_t src_dtype, const void *src, float *dst, uint64_t count)',
  trtshim_convert_from_f32: 'int32_t trtshim_convert_from_f32(const float *src, int32_t dst_dtype, void *dst, uint64_t count)',

  // (streaming section)
  trtshim_engine_streamable_weights_size: 'int32_t trtshim_engine_streamable_weights_size(const trtshim_engine *engine, _Out_ uint64_t *bytes)',
  trtshim_engine_weight_streaming_budget: 'int32_t trtshim_engine_weight_streaming_budget(const trtshim_engine *engine, _Out_ uint64_t *bytes)',
  trtshim_engine_set_weight_streaming_budget: 'int32_t trtshim_engine_set_weight_streaming_budget(trtshim_engine *engine, uint64_t bytes)',
  trtshim_engine_weight_streaming_automatic_budget:
    'int32_t trtshim_engine_weight_streaming_automatic_budget(const trtshim_engine *engine, _Out_ uint64_t *bytes)',
  trtshim_engine_weight_streaming_scratch_size: 'int32_t trtshim_engine_weight_streaming_scratch_size(const trtshim_engine *engine, _Out_ uint64_t *bytes)',
  trtshim_engine_weight_streaming_stats:
    'int32_t trtshim_engine_weight_streaming_stats(const trtshim_engine *engine, _Out_ trtshim_weight_streaming_stats *stats)',

  // (quantization section)
  trtshim_engine_weight_format:
    'int32_t trtshim_engine_weight_format(const trtshim_engine *engine, int32_t index, _Out_ int32_t *format, _Out_ int32_t *group_size)',
  trtshim_refitter_set_quantized_weights:
    'int32_t trtshim_refitter_set_quantized_weights(trtshim_refitter *refitter, const char *name, int32_t role, int32_t group_size, const trtshim_weights *values, const trtshim_weights *scales, const trtshim_weights *zero_points)',

  // (transforms section)
  trtshim_transform_permute:
    'int32_t trtshim_transform_permute(const float *src, int32_t rank, const int64_t *dims, const int32_t *perm, float *dst, int32_t num_threads)',
  trtshim_transform_cast_round:
    'int32_t trtshim_transform_cast_round(const float *src, int32_t to, float *dst, uint64_t count, int32_t num_threads)',
  trtshim_transform_bn_fold_weight:
    'int32_t trtshim_transform_bn_fold_weight(const float *weight, int64_t channels, int64_t inner, const float *gamma, const float *variance, double epsilon, float *dst, int32_t num_threads)',
  trtshim_transform_bn_fold_bias:
    'int32_t trtshim_transform_bn_fold_bias(const float *bias, const float *gamma, const float *beta, const float *mean, const float *variance, int64_t channels, double epsilon, float *dst)',
  trtshim_transform_lora_add:
    'int32_t trtshim_transform_lora_add(float *weight, int64_t out_features, int64_t in_features, int32_t fan_in_fan_out, const float *up, const float *down, int64_t rank, double scale, int32_t num_threads)',

  // (digest section)
  trtshim_digest: 'int32_t trtshim_digest(const void *data, uint64_t size, int32_t dtype, int32_t num_threads, uint64_t *digest, uint64_t *nonfinite)',
  trtshim_mapping_identity: 'int32_t trtshim_mapping_identity(const trtshim_mapping *mapping, uint64_t *identity)',
  trtshim_mapping_advise: 'int32_t trtshim_mapping_advise(const trtshim_mapping *mapping, uint64_t offset, uint64_t length, int32_t advice)',

  // (readback section)
  trtshim_engine_weight_digests: 'int32_t trtshim_engine_weight_digests(const trtshim_engine *engine, uint64_t *digests, int32_t num_threads)',
  trtshim_engine_weight_digests_selected: 'int32_t trtshim_engine_weight_digests_selected(const trtshim_engine *engine, const uint8_t *select, uint64_t *digests, int32_t num_threads)',
  trtshim_engine_weight_held:
    'int32_t trtshim_engine_weight_held(const trtshim_engine *engine, int32_t index, _Out_ int32_t *packed, _Out_ int32_t *transposed, _Out_ int64_t *channels, _Out_ int64_t *depth)',
} as const;

export type NativeFunctionName = keyof typeof prototypes;
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type NativeFunction = ((...args: any[]) => any) & { async: (...args: any[]) => void };

/** Where the library is looked for: $TRTSHIM_LIB, then the build folder of this package. */
export const libraryPath = (): string => {
  const fromEnv = process.env.TRTSHIM_LIB;
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  // This file lives in ffi/ (sources) or dist/ffi/ (compiled): look upwards for libtrtshim/.
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    const candidate = join(dir, 'libtrtshim', 'build', 'libtrtshim.so');
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  return join(dirname(fileURLToPath(import.meta.url)), '..', 'libtrtshim', 'build', 'libtrtshim.so');
};

interface Loaded {
  readonly handle: LibraryHandle;
  readonly bound: Map<string, NativeFunction>;
  readonly path: string;
}
let loaded: Loaded | undefined;

const load = (): Loaded => {
  if (loaded !== undefined) return loaded;
  const path = libraryPath();
  if (!existsSync(path)) {
    throw new LibraryLoadError(
      `libtrtshim not found at ${path}: run \`npm install\` (or \`npm run build:native\`) to build it, or set TRTSHIM_LIB`,
    );
  }
  let handle: LibraryHandle;
  try {
    handle = koffi.load(path);
  } catch (e) {
    throw new LibraryLoadError(`cannot load libtrtshim from ${path}: ${(e as Error).message}`);
  }
  const candidate: Loaded = { handle, bound: new Map(), path };
  const abi = bind(candidate, 'trtshim_abi_version')() as number;
  if (abi !== EXPECTED_ABI_VERSION) {
    throw new LibraryLoadError(
      `libtrtshim at ${path} has ABI version ${abi}, this trt-refit needs ${EXPECTED_ABI_VERSION}: rebuild it with \`npm run build:native\``,
    );
  }
  loaded = candidate;
  return loaded;
};

const bind = (lib: Loaded, name: NativeFunctionName): NativeFunction => {
  let fn = lib.bound.get(name);
  if (fn === undefined) {
    try {
      fn = lib.handle.func(prototypes[name]) as NativeFunction;
    } catch (e) {
      throw new LibraryLoadError(`libtrtshim at ${lib.path} lacks ${name}: ${(e as Error).message}`);
    }
    lib.bound.set(name, fn);
  }
  return fn;
};

/** The bound native function `name` (loading the library on first use). */
export const native = (name: NativeFunctionName): NativeFunction => bind(load(), name);

/** The library's last error message. */
export const lastError = (): string => String(native('trtshim_last_error')() ?? '');

/** Throws a NativeError for a non-zero status, with the library's message. */
export const check = (call: string, status: number): void => {
  if (status !== Status.OK) {
    throw new NativeError(call, status, statusNames[status] ?? `Status${status}`, lastError());
  }
};

/** Calls a status-returning native function and throws on failure. */
export const call = (name: NativeFunctionName, ...args: unknown[]): void => {
  check(name, native(name)(...args) as number);
};

export const abiVersion = (): number => native('trtshim_abi_version')() as number;
export const libraryVersion = (): string => native('trtshim_version')() as string;

/** An ArrayBuffer over native memory (no copy). The memory must outlive every view of it. */
export const viewOf = (pointer: unknown, bytes: number): ArrayBuffer => koffi.view(pointer, bytes);

export { koffi };
