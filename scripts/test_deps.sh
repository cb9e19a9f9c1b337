#!/usr/bin/env bash
# The system tools the tests drive, installed from Debian's packages where missing (bun run
# test runs this first). It never fails the run itself: a test whose tool is still missing
# fails loudly, naming it.
set -uo pipefail

# command -> Debian package
declare -A NEED=(
  [systemd-socket-activate]=systemd
  [systemd-analyze]=systemd
  [unshare]=util-linux
  [mount]=mount
  [chroot]=coreutils
  [ldd]=libc-bin
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "test_deps: missing packages ($pkgs) and no root apt-get to install them; the tests that need them will fail" >&2
  exit 0
fi
echo "test_deps: installing $pkgs" >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs; } >&2; then
  echo "test_deps: could not install $pkgs; the tests that need them will fail" >&2
fi
exit 0
