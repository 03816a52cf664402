export * from './capabilities.js';
export * from './effect.js';
export * from './files.js';
export { fusedGroupsOf, engineFusedGroups } from './groups.js';
