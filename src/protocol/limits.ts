// The wire's packet limit (docs/protocol.md, "Transport"), in a module of its own: serve's
// option defaults need it before the socket is ready, without loading the wire description.

/** The largest packet body either side sends or accepts. */
export const MAX_PACKET = 65536;
