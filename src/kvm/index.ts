export * from "./layout";
export * from "./slots";
export * from "./mapping";
export * from "./vm";
export * from "./kvm";
export * from "./kvm_vm";
