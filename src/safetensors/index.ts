export * from './dtypes.js';
export * from './errors.js';
export { parseHeader, headerLengthOf, MAX_HEADER_LENGTH, METADATA_KEY, type Header, type HeaderOptions, type TensorInfo } from './header.js';
export { toFloat32, fromFloat32, convertibleToFloat32 } from './convert.js';
export { openSafetensors, openSafetensorsTE, readHeader, SafetensorsFile, type OpenOptions } from './reader.js';
export {
  writeSafetensors,
  writeSafetensorsTE,
  planLayout,
  serializeHeader,
  type TensorToWrite,
  type PlannedTensor,
  type WriteSummary,
} from './writer.js';
