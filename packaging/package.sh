#!/usr/bin/env bash
# Builds an installable tarball for one PostgreSQL major (Debian/Ubuntu layout):
#   packaging/package.sh [15|17]   →  dist/pg_new_user_hook-<version>-pg<major>-<arch>.tar.gz
# holding usr/lib/postgresql/<major>/lib/pg_new_user_hook.so and the control and SQL
# files under usr/share/postgresql/<major>/extension. Install with: sudo tar -C / -xzf <tarball>
# PostgreSQL 17 is built in the Debian 13 root of tests/pg17-root.sh (Debian 12 has no 17).
set -euo pipefail
major=${1:-15}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ -z "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
  tests/setup.sh
  if [ "$major" = 17 ]; then
    exec tests/pg17-root.sh run packaging/package.sh 17
  fi
fi
. tests/pg-major.sh "$major"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
cargo pgrx package --pg-config "$pg_config" >/dev/null
staged="${CARGO_TARGET_DIR:-target}/release/pg_new_user_hook-pg$major"
out="dist/pg_new_user_hook-$version-pg$major-$arch.tar.gz"
mkdir -p dist
tar -C "$staged" --owner=0 --group=0 -czf "$out" usr
tar -tzf "$out"
echo "$out"
