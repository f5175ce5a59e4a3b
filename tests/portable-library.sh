#!/usr/bin/env bash
# Fails unless the library in a tarball loads wherever PostgreSQL runs: no glibc
# symbol version above the floor (2.31: Debian 11, Ubuntu 20.04, RHEL 9 and every
# newer system), and no shared library beyond glibc's and libgcc_s.
#   tests/portable-library.sh TARBALL
set -euo pipefail
tarball=${1:?usage: tests/portable-library.sh TARBALL}
floor=2.31
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xzf "$tarball"
so=$(find "$work" -name 'pg_new_user_hook.so' | head -n 1)
[ -n "$so" ] || { echo "portable-library: no pg_new_user_hook.so in $tarball" >&2; exit 1; }
newest=$(objdump -T "$so" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
if [ "$(printf '%s\n%s\n' "$newest" "$floor" | sort -V | tail -n 1)" != "$floor" ]; then
  echo "portable-library: $(basename "$tarball") needs glibc $newest, above the floor $floor:" >&2
  objdump -T "$so" | grep -E "GLIBC_($(printf '%s' "$newest" | sed 's/\./\\./g'))" >&2
  exit 1
fi
allowed='^(libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libgcc_s\.so\.1|ld-linux-x86-64\.so\.2)$'
extra=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | grep -Ev "$allowed" || true)
if [ -n "$extra" ]; then
  echo "portable-library: $(basename "$tarball") needs shared libraries beyond glibc and libgcc_s: $extra" >&2
  exit 1
fi
echo "portable-library: $(basename "$tarball") needs glibc $newest at most (floor $floor) and only: $(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
