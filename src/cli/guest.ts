// `vmemd serve --guest FILE [--serial PATH]`: loads the guest, runs its one vCPU in a
// Worker, and ties it to the server's main-thread epoll loop (docs/boot.md).
import { openSync, readFileSync, statSync } from "node:fs";
import type { KvmVm } from "../kvm";
import { checkBootImage } from "../kvm/boot";
import type { LinuxImage } from "../kvm/linux";
import { Vcpu, type CpuidBit, type VcpuMessage, type VcpuOptions } from "../kvm/vcpu";
import type { VcpuSummary } from "../protocol";
import type { Logger, Server } from "../server";
import * as sys from "../sys";

export interface GuestHandle {
  summary(): VcpuSummary;
  /** Stops the vCPU (even inside KVM_RUN) and releases it. Call after the server loop has returned. */
  stop(): Promise<void>;
}

/** Writes all of `bytes` to `fd`; false when the descriptor is gone (EPIPE, EBADF...). */
function writeAll(fd: number, bytes: Uint8Array): boolean {
  let done = 0;
  while (done < bytes.byteLength) {
    try {
      done += sys.write(fd, bytes.subarray(done));
    } catch (e) {
      if (e instanceof sys.SysError && (e.errno === sys.Errno.EAGAIN || e.errno === sys.Errno.EINTR)) {
        Bun.sleepSync(1); // a non-blocking stdout that is full: wait a little, never spin
        continue;
      }
      return false;
    }
  }
  return true;
}

/**
 * vmemd's exit status for the byte a guest wrote to port 0xF4: 3 + value, capped at 125,
 * so it is never 0, 1 or 2 (vmemd's own: stopped, failed, usage) nor in the range shells
 * report for commands not run (126, 127) or killed by a signal (128 and up).
 */
export function guestExitStatus(value: number): number {
  return 3 + Math.min(value, 122);
}

/** What runs: a boot-contract image (--guest), or a Linux kernel (--kernel, --initrd, --cmdline). */
export type GuestBoot = { guestPath: string } | { kernelPath: string; initrdPath?: string; cmdline: string };

/** A file's bytes; a missing or unreadable one is one clear error naming its flag. */
function readInput(path: string, flag: string): Uint8Array {
  try {
    statSync(path);
    return readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "";
    const errno = code in sys.Errno ? sys.Errno[code as sys.ErrnoName] : sys.Errno.EIO;
    throw new sys.SysError(`${flag} ${path}`, errno);
  }
}

export function attachGuest(vm: KvmVm, server: Server, opts: GuestBoot & { serialPath?: string; log: Logger; cpuidClear?: readonly CpuidBit[] }): GuestHandle {
  const { log } = opts;
  const name = "guestPath" in opts ? opts.guestPath : opts.kernelPath;
  let image: Uint8Array;
  let linux: LinuxImage | null = null;
  if ("guestPath" in opts) {
    image = readInput(opts.guestPath, "--guest");
    checkBootImage(image.byteLength, vm.ramSize, `--guest ${opts.guestPath}`);
  } else {
    image = readInput(opts.kernelPath, "--kernel");
    linux = { kernel: image, initrd: opts.initrdPath === undefined ? null : readInput(opts.initrdPath, "--initrd"), cmdline: opts.cmdline };
  }

  const serialFd = opts.serialPath === undefined ? 1 : openSync(opts.serialPath, "w", 0o644);
  let serialBroken = false;
  const onSerial = (bytes: Uint8Array): void => {
    if (serialBroken) return;
    if (!writeAll(serialFd, bytes)) {
      serialBroken = true;
      log.warn("guest serial output cannot be written; dropping it from now on", { serial: opts.serialPath ?? "stdout" });
    }
  };
  const onMessage = (m: VcpuMessage): void => log.log(m.level, m.msg, m.fields ?? {});

  let vcpu: Vcpu;
  try {
    const vcpuOpts: VcpuOptions = {
      cpuidClear: opts.cpuidClear ?? [],
      onSerial,
      onMessage,
      onState: (state: string) => {
        if (state === "running") {
          log.info("vcpu running", { guest: name, boot_ms: Math.round(performance.now() - vcpu.startedAt) });
        }
      },
      onExitRequest: (value: number) => server.stop(`guest requested exit (value ${value})`, guestExitStatus(value)),
    };
    vcpu = linux === null ? Vcpu.start(vm, image, vcpuOpts) : Vcpu.startLinux(vm, linux, vcpuOpts);
  } catch (e) {
    if (opts.serialPath !== undefined) sys.close(serialFd);
    throw e;
  }
  server.watch(vcpu.eventFd, () => vcpu.service());
  log.info(linux === null ? "guest loaded" : "kernel loaded", { guest: name, bytes: image.byteLength, serial: opts.serialPath ?? "stdout" });

  let stopped: Promise<void> | null = null;
  return {
    summary: () => vcpu.summary(),
    stop: () =>
      (stopped ??= (async () => {
        await vcpu.stop();
        const s = vcpu.summary();
        log.info("vcpu stopped", { state: s.state, exits: s.exits, mmio_reads: s.mmio_reads, mmio_writes: s.mmio_writes });
        if (opts.serialPath !== undefined) {
          try {
            sys.close(serialFd);
          } catch {}
        }
      })()),
  };
}
