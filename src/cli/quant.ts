/**
 * Command-line helpers for quantized weights:
 *   --weight-format fp32|fp16|bf16|int8|fp8|int4[:GROUP]   the engine's kernel format (`compile` parses it
 *                                                          with weightFormatArgument; refit-commands.ts)
 *   --weights QUANTIZED.safetensors                        a checkpoint reloaded layer by layer into one
 *                                                          engine (reloadWeightsFile; `refit` of a .trtr
 *                                                          through the weight map is not wired yet)
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import * as E from 'fp-ts/lib/Either.js';
import type { BuildOptions, Engine } from '../../ffi/engine.js';
import { openSafetensors } from '../safetensors/index.js';
import { describeQuantIssue } from '../quant/errors.js';
import { formatWeightFormat, parseWeightFormat, weightFormatOptions, WEIGHT_FORMATS, type WeightFormat } from '../quant/format.js';
import { reloadCheckpoint, type ReloadOptions, type ReloadSummary } from '../quant/reload.js';

/** commander's argument parser for --weight-format (throws InvalidArgumentError with the reason). */
export const weightFormatArgument = (value: string): WeightFormat => {
  const parsed = parseWeightFormat(value);
  if (E.isLeft(parsed)) throw new InvalidArgumentError(describeQuantIssue(parsed.left));
  return parsed.right;
};

/** The --weight-format option (default fp32). */
export const weightFormatOption = (): Option =>
  new Option('--weight-format <format>', `weight format of GEMM and convolution kernels: ${WEIGHT_FORMATS.join(', ')} (int4 takes :32, :64 or :128, default 128)`)
    .argParser(weightFormatArgument)
    .default({ kind: 'fp32' } satisfies WeightFormat, 'fp32');

/** Adds --weight-format to a command. */
export const addWeightFormatOption = (command: Command): Command => command.addOption(weightFormatOption());

/** Build options for a parsed --weight-format (merged over `base`). */
export const buildOptionsFor = (format: WeightFormat | undefined, base: BuildOptions = {}): BuildOptions => ({ ...base, ...weightFormatOptions(format ?? { kind: 'fp32' }) });

export { formatWeightFormat };

/** `refit --weights FILE`: reloads a (quantized or full-precision) safetensors checkpoint into an engine. */
export const reloadWeightsFile = async (engine: Engine, path: string, options: ReloadOptions = {}): Promise<ReloadSummary> => {
  using file = await openSafetensors(path);
  return reloadCheckpoint(engine, file, options);
};

/** One line for a reload summary. */
export const describeReload = (s: ReloadSummary): string =>
  `${s.layers} layers reloaded: ${s.copied} quantized kernels copied, ${s.dequantized} dequantized, ${s.float} float tensors; ${s.untouched} engine weights not in the checkpoint`;
