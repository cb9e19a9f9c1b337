export * from "./codec";
export * as schema from "./schema";
