#!/usr/bin/env bash
# A minimal root filesystem for vmemd: the binary, exactly the shared objects it loads (as
# ldd lists them, with the dynamic loader) at the paths it loads them from, and empty mount
# points for /proc, /dev and the socket's directory, /run/vmemd. Nothing else: no shell, no
# /etc. contrib/Containerfile copies it into a scratch image.
#
# usage: scripts/rootfs.sh [OUT [BINARY]]      (defaults: dist/rootfs, dist/vmemd)
set -euo pipefail
out=${1:-dist/rootfs}
bin=${2:-dist/vmemd}

[ -x "$bin" ] || { echo "rootfs: $bin is missing; run bun run build first" >&2; exit 1; }
if ldd "$bin" | grep -q 'not found'; then
  echo "rootfs: $bin needs libraries this system lacks:" >&2
  ldd "$bin" | grep 'not found' >&2
  exit 1
fi
# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)";
# linux-vdso.so.1 is the kernel's, with no file.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[ -n "$libs" ] || { echo "rootfs: ldd listed no shared objects for $bin" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/usr/bin" "$out/proc" "$out/dev" "$out/run/vmemd"
cp "$bin" "$out/usr/bin/vmemd"
chmod 0755 "$out/usr/bin/vmemd"
for lib in $libs; do
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib" # the file itself, where the loader and ldd name a symlink
done
echo "rootfs: $out: $(du -sh "$out" | cut -f1) ($(echo $libs | wc -w) shared objects)" >&2
