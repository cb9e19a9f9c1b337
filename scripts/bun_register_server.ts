// bun_register_server: what Bun itself pays to serve vmemd's RegisterMemory +
// UnregisterMemory, for a reference row of the benchmark (not a target).
//
//   bun scripts/bun_register_server.ts SOCKET_PATH
//
// The twin of scripts/c/kvm_register_server.c, written with vmemd's own src/sys: the same
// VM, the same epoll loop (level triggered, each ready client read until EAGAIN with
// recvmmsg, one packet a read until a second one comes, answers sent with sendmmsg) and
// the same system calls per request:
//   - a packet carrying a descriptor is a RegisterMemory: F_ADD_SEALS (F_SEAL_SHRINK; a
//     failure is ignored), fstat, mmap of st_size bytes MAP_SHARED read-write,
//     KVM_SET_USER_MEMORY_REGION in the client's slot, close of the descriptor;
//   - a packet without one is an UnregisterMemory: the same ioctl with memory_size 0, munmap.
// Either is answered with the MessagePack string "Ok". One live region per client; no
// MessagePack is parsed and nothing is checked. Between this row and the C server's lies
// the runtime (JIT code and a bigger process to switch back into after every sleep);
// between this row and vmemd's lies vmemd's own logic.
//
// Prints {"ready":true} once listening. SIGTERM ends it (the default action).
import { unlinkSync } from "node:fs";
import * as sys from "../src/sys";
import { Kvm } from "../src/kvm";

const path = process.argv[2];
if (path === undefined || process.argv.length !== 3) {
  process.stderr.write("usage: bun scripts/bun_register_server.ts SOCKET_PATH\n");
  process.exit(2);
}

const GUEST_BASE = 0x40_0000_0000;
const GUEST_STRIDE = 0x1_0000_0000;
const OK = new Uint8Array([0xa2, 0x4f, 0x6b]);
const PROT_RW = sys.PROT_READ | sys.PROT_WRITE;

interface Client {
  slot: number;
  addr: number; // the live region's mapping, or 0
  size: number;
}

const kvm = new Kvm();
const vmFd = kvm.createVmFd();
const regionBuf = new DataView(new ArrayBuffer(32));
function setRegion(c: Client, size: number, addr: number): void {
  sys.encodeMemoryRegion(regionBuf, c.slot, 0, GUEST_BASE + GUEST_STRIDE * c.slot, size, addr);
  sys.ioctl(vmFd, sys.KVM_SET_USER_MEMORY_REGION, regionBuf, "KVM_SET_USER_MEMORY_REGION");
}

try {
  unlinkSync(path);
} catch {}
const listener = sys.listenSeqpacket(path);
const epoll = new sys.Epoll(16);
epoll.add(listener, sys.EPOLLIN);
const rx = new sys.BatchReceiver(32, 4096);
const tx = new sys.BatchSender(32, 32 * OK.byteLength);
const clients = new Map<number, Client>();
let nextSlot = 1;

function drop(fd: number, c: Client): void {
  if (c.addr !== 0) {
    setRegion(c, 0, 0);
    sys.munmap(c.addr, c.size);
  }
  epoll.remove(fd);
  sys.close(fd);
  clients.delete(fd);
}

function serve(fd: number, c: Client): void {
  // As vmemd reads: one packet at a time until a second one comes in this wake-up.
  for (let reads = 0; ; reads++) {
    const n = rx.recv(fd, reads < 2 ? 1 : rx.capacity);
    if (n === -1) return;
    for (let i = 0; i < n; i++) {
      const fds = rx.fds(i);
      if (rx.length(i) === 0 && fds.length === 0) return drop(fd, c); // end of stream
      if (fds.length > 0) {
        const memfd = fds[0]!;
        for (let j = 1; j < fds.length; j++) sys.close(fds[j]!);
        try {
          sys.fcntl(memfd, sys.F_ADD_SEALS, sys.F_SEAL_SHRINK);
        } catch {}
        const size = sys.fstat(memfd).size;
        // A refusal (a region already live, an empty file) is still "Ok", as in the C server.
        if (c.addr === 0 && size > 0) {
          const addr = sys.mmap(0, size, PROT_RW, sys.MAP_SHARED, memfd, 0);
          setRegion(c, size, addr);
          c.addr = addr;
          c.size = size;
        }
        sys.close(memfd);
      } else if (c.addr !== 0) {
        setRegion(c, 0, 0);
        sys.munmap(c.addr, c.size);
        c.addr = 0;
      }
      tx.add(OK);
    }
    tx.send(fd);
    tx.clear();
  }
}

process.stdout.write('{"ready":true}\n');
for (;;) {
  const n = epoll.wait(-1);
  for (let i = 0; i < n; i++) {
    const fd = epoll.readyFd(i);
    if (fd === listener) {
      const conn = sys.accept(listener);
      if (conn === -1) continue;
      epoll.add(conn, sys.EPOLLIN);
      clients.set(conn, { slot: nextSlot++, addr: 0, size: 0 });
    } else {
      const c = clients.get(fd);
      if (c === undefined) continue;
      try {
        serve(fd, c);
      } catch {
        drop(fd, c); // a peer that went away mid-answer, say
      }
    }
  }
}
