// A stock Debian cloud kernel boots on dist/vmemd (serve --kernel, its ELF vmlinux) and
// judges the memory map: it must echo the command line it was given and print as its
// BIOS-e820 map exactly GetState's RAM with the legacy hole and the low MMIO pool reserved.
// On this machine's software-nested KVM that takes 20-45 s (the kernel's ring 0 runs in
// KVM's instruction emulator); one test, so the suite stays within CI's time.
import { describe, expect, test } from "bun:test";
import * as sys from "../src/sys";
import { memfd } from "./helpers";
import { expectedE820, testKernel } from "./linux_kernel";
import { VmemdProcess } from "./server_harness";

const LIMIT_MS = 150_000;

/** Waits until the kernel has printed more than `printed` characters (it is still running). */
async function untilMore(s: VmemdProcess, printed: number, deadline: number): Promise<void> {
  while (s.stdout.length <= printed) {
    if (s.proc.exitCode !== null || Date.now() > deadline) throw new Error(`the kernel printed nothing more after a region was registered:\n${s.stdout.slice(-2000)}\n${s.stderr}`);
    await Bun.sleep(250);
  }
}

describe("a real Linux kernel", () => {
  test(
    "boots from its ELF vmlinux, echoes its command line and prints the e820 map GetState describes",
    async () => {
      const kernel = testKernel();
      const cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 vmemd.test=e820";
      // The serial console goes to vmemd's stdout, which the harness collects.
      const s = await VmemdProcess.start(["--memory", "256M", "--kernel", kernel.vmlinux, "--cmdline", cmdline]);
      try {
        const c = s.connect();
        const ram = c.getState().ram.map(([g, n]) => [Number(g), Number(n)] as [number, number]);
        c.close();
        const want = expectedE820(ram);
        const deadline = Date.now() + LIMIT_MS;
        let text = "";
        for (;;) {
          text = s.stdout;
          const lines = text.split(/\r?\n/).map((l) => l.replace(/^\[[ 0-9.]+\] /, ""));
          const e820 = lines.filter((l) => l.startsWith("BIOS-e820:"));
          if (e820.length >= want.length && lines.some((l) => l.startsWith("printk: bootconsole"))) {
            expect(lines).toContain(`Command line: ${cmdline}`);
            expect(e820).toEqual(want);
            // The memory plane keeps working while the kernel runs: a device registers memory
            // in the low MMIO pool the kernel was told is reserved, and the kernel goes on.
            const dev = s.connect();
            const fd = memfd(2 * 2 ** 20);
            const r = dev.registerMemory({ SharedMemory: { descriptor: fd, size: 2 * 2 ** 20 } }, { GuestPhysicalAddress: 0xd000_0000 });
            expect(r.region_id).toBe(0xd000_0000);
            const printed = s.stdout.length;
            await untilMore(s, printed, deadline);
            expect(dev.getState().ram).toEqual(ram.map(([g, n]) => [g, n]));
            dev.unregisterMemory(0xd000_0000);
            dev.close();
            sys.close(fd);
            return;
          }
          if (s.proc.exitCode !== null) throw new Error(`vmemd exited (${s.proc.exitCode}) before the kernel printed its memory map:\n${text}\n${s.stderr}`);
          if (Date.now() > deadline) throw new Error(`the kernel did not print its memory map within ${LIMIT_MS / 1000} s; its serial output:\n${text}\nvmemd:\n${s.stderr}`);
          await Bun.sleep(250);
        }
      } finally {
        await s.stop();
      }
    },
    LIMIT_MS + 60_000,
  );
});
