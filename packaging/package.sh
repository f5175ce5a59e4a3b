#!/usr/bin/env bash
# Builds an installable tarball for PostgreSQL 15 (Debian/Ubuntu layout):
#   dist/pg_new_user_hook-<version>-pg15-<arch>.tar.gz
# holding usr/lib/postgresql/15/lib/pg_new_user_hook.so and the control and SQL
# files under usr/share/postgresql/15/extension. Install with: sudo tar -C / -xzf <tarball>
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/tests/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
cd "$repo"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
cargo pgrx package --pg-config /usr/bin/pg_config >/dev/null
out="dist/pg_new_user_hook-$version-pg15-$arch.tar.gz"
mkdir -p dist
tar -C target/release/pg_new_user_hook-pg15 --owner=0 --group=0 -czf "$out" usr
tar -tzf "$out"
echo "$out"
