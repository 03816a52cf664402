export * from './compile.js';
export * from './cached.js';
export * from './network.js';
