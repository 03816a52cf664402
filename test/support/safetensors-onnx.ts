/** Reads the initializers of an ONNX file with protobufjs's wire reader (only the fields a check needs:
 *  ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto dims = 1, data_type = 2, float_data = 4,
 *  name = 8, raw_data = 9). An independent oracle for checkpoint values: the exporter embedded them. */
import protobuf from 'protobufjs';

export interface Initializer {
  readonly name: string;
  readonly dims: number[];
  readonly dataType: number;
  /** Little-endian element bytes (raw_data, or float_data re-encoded). */
  readonly bytes: Uint8Array;
}

const fields = (buffer: Uint8Array, visit: (field: number, reader: protobuf.Reader, wire: number) => boolean): void => {
  const reader = protobuf.Reader.create(buffer);
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (!visit(tag >>> 3, reader, tag & 7)) reader.skipType(tag & 7);
  }
};

const tensor = (bytes: Uint8Array): Initializer => {
  let name = '';
  let dataType = 0;
  const dims: number[] = [];
  let raw: Uint8Array | undefined;
  const floats: number[] = [];
  fields(bytes, (field, r, wire) => {
    if (field === 1) {
      if (wire === 2) {
        const end = r.uint32() + r.pos;
        while (r.pos < end) dims.push(Number(r.int64()));
      } else dims.push(Number(r.int64()));
    } else if (field === 2) dataType = r.int32();
    else if (field === 8) name = r.string();
    else if (field === 9) raw = r.bytes();
    else if (field === 4) {
      if (wire === 2) {
        const end = r.uint32() + r.pos;
        while (r.pos < end) floats.push(r.float());
      } else floats.push(r.float());
    } else return false;
    return true;
  });
  // Copied: protobufjs gives Buffer views into the whole file.
  return { name, dims, dataType, bytes: raw !== undefined ? new Uint8Array(raw) : new Uint8Array(new Float32Array(floats).buffer) };
};

export const onnxInitializers = (model: Uint8Array): Initializer[] => {
  const out: Initializer[] = [];
  fields(model, (field, r) => {
    if (field !== 7) return false;
    fields(r.bytes(), (gField, g) => {
      if (gField !== 5) return false;
      out.push(tensor(g.bytes()));
      return true;
    });
    return true;
  });
  return out;
};
