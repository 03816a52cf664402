/** The native engine API: building, running, serializing and refitting engines through libtrtshim. */
export {
  buildEngine,
  buildConfig,
  Engine,
  ExecutionContext,
  Refitter,
  readEngineFile,
  isStateError,
  type BuildOptions,
  type EngineInfo,
  type EngineWeight,
  type HostTensor,
  type IoDesc,
  type WeightPrecision,
  type WeightUpdate,
} from './engine.js';
export { lowerNetwork, NativeNetwork, NetworkLoweringError, nativeWeights } from './network.js';
export {
  abiVersion,
  DType,
  dtypeName,
  EXPECTED_ABI_VERSION,
  LibraryLoadError,
  libraryPath,
  libraryVersion,
  NativeError,
  Role,
  roleName,
  Status,
  type DTypeName,
  type RoleName,
  type StatusCode,
} from './library.js';
