// One load-test client (run as its own process by test/hardening.test.ts): N mixed
// requests, pipelined, against its own guest range. Prints a JSON summary.
import * as sys from "../src/sys";
import { encodeRequest, VmemClient, type Packet } from "../src/client";

const [socket, idText, nText] = process.argv.slice(2);
const id = Number(idText);
const n = Number(nText);
const base = 0x40_0000_0000 + id * 0x1_0000_0000; // each client owns 4 GiB of guest space
const fd = sys.memfdCreate(`load-${id}`);
sys.ftruncate(fd, 4096);
const [p1, p2] = sys.pipe();
const client = VmemClient.connect(socket);

const packets: Packet[] = [];
const expectOk: boolean[] = [];
for (let i = 0; packets.length < n; i++) {
  const g = base + (i % 512) * 4096;
  const reg = { RegisterMemory: { source: { SharedMemory: { descriptor: fd, size: 4096 } }, dest: { GuestPhysicalAddress: g }, prot: { read: true, write: true }, cache: "CacheCoherent" as const } };
  packets.push(encodeRequest(reg), encodeRequest({ UnregisterMemory: g }));
  expectOk.push(true, true);
  switch (i % 4) {
    case 0:
      packets.push(encodeRequest({ BalloonTargetReached: { size: i } }));
      expectOk.push(true);
      break;
    case 1:
      packets.push(encodeRequest({ ...reg, RegisterMemory: { ...reg.RegisterMemory, source: { SharedMemory: { descriptor: p1, size: 4096 } } } }));
      expectOk.push(false);
      break;
    case 2:
      packets.push(encodeRequest("GetState"));
      expectOk.push(true);
      break;
    case 3:
      packets.push(encodeRequest({ DynamicallyReclaimMemoryRanges: { ranges: [[0, 4096]] } }));
      expectOk.push(true);
      break;
  }
}
packets.length = n;
expectOk.length = n;
// A pair cut in half by the count: the last packet is a RegisterMemory without its
// UnregisterMemory. Make it a GetState so every client leaves exactly what it says.
if ((n - 1) % 3 === 0) packets[n - 1] = encodeRequest("GetState");
const responses = client.pipeline(packets, 32);
let ok = 0;
let err = 0;
let wrong = 0;
responses.forEach((r, i) => {
  const isErr = typeof r === "object" && "Err" in r;
  if (isErr) err++;
  else ok++;
  if (isErr === expectOk[i]) wrong++;
});
// Leave 5 regions registered, for the final state check.
for (let k = 0; k < 5; k++) client.registerMemory({ SharedMemory: { descriptor: fd, size: 4096 } }, { GuestPhysicalAddress: base + 0x8000_0000 + k * 4096 });
client.close();
process.stdout.write(JSON.stringify({ id, sent: n, answered: responses.length, ok, err, wrong }) + "\n");
