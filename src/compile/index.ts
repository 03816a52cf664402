export * from './compile.js';
export * from './network.js';
