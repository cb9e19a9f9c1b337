export * from "./error";
export * from "./interval_map";
export * from "./number_map";
export * from "./allocator";
export * from "./region_state";
export * from "./executor";
