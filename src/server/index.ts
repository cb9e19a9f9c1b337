export * from "./log";
export * from "./server";
export * from "./ledger";
export * from "./systemd";
