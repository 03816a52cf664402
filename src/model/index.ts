export * from './format.js';
export * from './model.js';
export * from './file.js';
export { FallbackRunner, FallbackRunError, openOrtSession, readInitializer, replaceInitializers, type FallbackRunErrorDetail, type FallbackTensorDesc, type PreparedFallback, type SessionOpener } from './fallback.js';
export * from './run.js';
