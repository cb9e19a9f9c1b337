// The building blocks of the wire description (messages.ts): each shape says what a value
// is (an integer and its range, a struct and its fields in order, a serde-style enum), and
// carries its TypeScript type as a phantom. The codecs (codec.ts over msgpack.ts and
// json.ts) walk these shapes; nothing else in vmemd writes a message's shape down.

/** u64 on the wire: a number when it fits in 2^53, a bigint above (exact in both encodings). */
export type U64 = number | bigint;

export type Shape<T = unknown> =
  | UintShape<T>
  | IntShape<T>
  | BoolShape<T>
  | StrShape<T>
  | FdShape<T>
  | UuidShape<T>
  | NullableShape<T>
  | StructShape<T>
  | EnumShape<T>
  | TupleShape<T>
  | ArrayShape<T>
  | ErrChainShape<T>;

/** The TypeScript type a shape decodes to. */
export type TypeOf<S> = S extends { readonly __type?: infer T } ? T : never;

interface Base<T> {
  /** Phantom: never set, only read by TypeOf. */
  readonly __type?: T;
}

export interface UintShape<T> extends Base<T> {
  readonly kind: "uint";
  /** The largest value; above 2^53 - 1 a value may decode as a bigint. */
  readonly max: bigint;
  /** max as a number when it is exact (up to 2^53 - 1), else MAX_SAFE_INTEGER. */
  readonly numberMax: number;
  readonly name: string;
}
export interface IntShape<T> extends Base<T> {
  readonly kind: "int";
  readonly min: number;
  readonly max: number;
  readonly name: string;
}
export interface BoolShape<T> extends Base<T> {
  readonly kind: "bool";
}
export interface StrShape<T> extends Base<T> {
  readonly kind: "str";
}
/** A descriptor: on the wire its index in the packet's SCM_RIGHTS, in memory the descriptor. */
export interface FdShape<T> extends Base<T> {
  readonly kind: "fd";
}
/** 16 bytes: MessagePack bin 16, or an array of 16 u8 (serde's [u8; 16], JSON's only form). */
export interface UuidShape<T> extends Base<T> {
  readonly kind: "uuid";
}
export interface NullableShape<T> extends Base<T> {
  readonly kind: "nullable";
  readonly of: Shape;
}
export interface Field {
  readonly name: string;
  readonly shape: Shape;
  /** The name's UTF-8 bytes (compared in place with a packet's keys). */
  readonly bytes: Uint8Array;
}
export interface StructShape<T> extends Base<T> {
  readonly kind: "struct";
  readonly fields: readonly Field[];
}
export interface Variant {
  readonly name: string;
  /** null for a unit variant (a bare string on the wire). */
  readonly shape: Shape | null;
  readonly bytes: Uint8Array;
}
/** A serde externally tagged enum: a unit variant is its name, any other {name: payload}. */
export interface EnumShape<T> extends Base<T> {
  readonly kind: "enum";
  readonly name: string;
  readonly variants: readonly Variant[];
  readonly byName: ReadonlyMap<string, number>;
}
export interface TupleShape<T> extends Base<T> {
  readonly kind: "tuple";
  readonly items: readonly Shape[];
}
export interface ArrayShape<T> extends Base<T> {
  readonly kind: "array";
  readonly of: Shape;
  readonly min: number;
  readonly max: number;
}
/**
 * The payload of an Err response, which the two encodings write differently: MessagePack
 * {"errno": i32|nil, "chain": [str]}, JSON crosvm's bare chain with the errno at the end of
 * its root cause, "… (os error N)".
 */
export interface ErrChainShape<T> extends Base<T> {
  readonly kind: "errchain";
}

const utf8 = new TextEncoder();
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function uintOf<T>(name: string, max: bigint): UintShape<T> {
  return { kind: "uint", max, numberMax: max < MAX_SAFE ? Number(max) : Number.MAX_SAFE_INTEGER, name };
}

export const u8 = uintOf<number>("u8", 0xffn);
export const u16 = uintOf<number>("u16", 0xffffn);
export const u32 = uintOf<number>("u32", 0xffff_ffffn);
export const u64 = uintOf<U64>("u64", 2n ** 64n - 1n);
/** usize on x86_64 (crosvm's lengths and counts). */
export const usize = uintOf<U64>("usize", 2n ** 64n - 1n);
export const i32: IntShape<number> = { kind: "int", min: -(2 ** 31), max: 2 ** 31 - 1, name: "i32" };
export const bool: BoolShape<boolean> = { kind: "bool" };
export const str: StrShape<string> = { kind: "str" };
export const fd: FdShape<number> = { kind: "fd" };
export const uuid: UuidShape<Uint8Array> = { kind: "uuid" };
export const errChain: ErrChainShape<{ errno: number | null; chain: string[] }> = { kind: "errchain" };

export function nullable<S extends Shape>(of: S): NullableShape<TypeOf<S> | null> {
  return { kind: "nullable", of };
}

export function struct<F extends Record<string, Shape>>(fields: F): StructShape<{ [K in keyof F]: TypeOf<F[K]> }> {
  return {
    kind: "struct",
    fields: Object.entries(fields).map(([name, shape]) => ({ name, shape, bytes: utf8.encode(name) })),
  };
}

type EnumType<V extends Record<string, Shape | null>> = {
  [K in keyof V & string]: V[K] extends Shape ? { [P in K]: TypeOf<V[K]> } : K;
}[keyof V & string];

export function enumOf<V extends Record<string, Shape | null>>(name: string, variants: V): EnumShape<EnumType<V>> {
  const list = Object.entries(variants).map(([n, shape]) => ({ name: n, shape, bytes: utf8.encode(n) }));
  return { kind: "enum", name, variants: list, byName: new Map(list.map((v, i) => [v.name, i])) };
}

type TupleType<I extends readonly Shape[]> = { -readonly [K in keyof I]: TypeOf<I[K]> };

export function tuple<I extends readonly Shape[]>(...items: I): TupleShape<TupleType<I>> {
  return { kind: "tuple", items };
}

export function array<S extends Shape>(of: S, opts: { min?: number; max?: number } = {}): ArrayShape<TypeOf<S>[]> {
  return { kind: "array", of, min: opts.min ?? 0, max: opts.max ?? Number.MAX_SAFE_INTEGER };
}

/**
 * The most bytes `shape` can take in either encoding (Infinity for unbounded strings and
 * arrays): paged listings use it to put as many entries in a packet as surely fit.
 */
export function maxEncodedSize(shape: Shape): number {
  switch (shape.kind) {
    case "uint":
      return Math.max(9, shape.max.toString().length);
    case "int":
      return 11; // "-2147483648"; MessagePack int 32 takes 5
    case "bool":
      return 5; // "false"
    case "fd":
      return 10; // a u32 index in JSON
    case "uuid":
      return 2 + 16 * 4; // [255,255,…]
    case "nullable":
      return Math.max(4, maxEncodedSize(shape.of));
    case "struct": {
      // JSON: braces, and per field "name": plus a comma; MessagePack's headers are smaller.
      let n = 2;
      for (const f of shape.fields) n += f.bytes.length + 4 + maxEncodedSize(f.shape);
      return n;
    }
    case "enum": {
      let n = 0;
      for (const v of shape.variants) n = Math.max(n, v.bytes.length + 5 + (v.shape === null ? 0 : maxEncodedSize(v.shape)));
      return n;
    }
    case "tuple": {
      let n = 2;
      for (const s of shape.items) n += 1 + maxEncodedSize(s);
      return n;
    }
    case "array":
      return shape.max === Number.MAX_SAFE_INTEGER ? Infinity : 5 + shape.max * (1 + maxEncodedSize(shape.of));
    case "str":
    case "errchain":
      return Infinity;
  }
}
