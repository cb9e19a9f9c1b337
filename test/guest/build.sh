#!/bin/sh
# Builds the test guests as flat binaries linked at 0x100000 (entry = first byte):
#   guest.bin      mailbox-driven memory test guest (guest.S, ABI in README.md)
#   triple.bin     prints "triple\n", then triple-faults (KVM_EXIT_SHUTDOWN)
#   spin_mmio.bin  prints "spin\n", then reads MMIO at 0xE0000000 forever
# Needs gcc (as a preprocessing assembler driver), ld and objcopy.
set -eu
cd "$(dirname "$0")"
CC=${CC:-gcc}
LD=${LD:-ld}
OBJCOPY=${OBJCOPY:-objcopy}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in guest triple spin_mmio; do
  "$CC" -c -nostdlib -ffreestanding -o "$tmp/$name.o" "$name.S"
  "$LD" -nostdlib -static -n --build-id=none -T guest.ld -o "$tmp/$name.elf" "$tmp/$name.o"
  "$OBJCOPY" -O binary "$tmp/$name.elf" "$name.bin"
  chmod 644 "$name.bin"
  size=$(wc -c < "$name.bin")
  if [ "$size" -gt 1048576 ]; then echo "$name.bin too big: $size" >&2; exit 1; fi
  echo "$name.bin: $size bytes"
done
