export * from "./log";
export * from "./server";
