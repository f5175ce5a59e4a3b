#!/usr/bin/env bash
# The full test suite on every supported PostgreSQL major: unit tests, SQL-surface
# tests (#[pg_test]) and end-to-end suites (real clusters with the Supabase Auth
# schema, a loopback receiver), then the packaged tarballs installed and checked.
#   tests/run.sh          PostgreSQL 15 (Debian 12) and 17 (a Debian 13 root)
#   tests/run.sh 15       one major (also: PG_MAJORS="15 17")
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
majors="${*:-${PG_MAJORS:-15 17}}"
"$repo/tests/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
cd "$repo"

fixtures="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
if [ ! -f "$fixtures/load.sh" ]; then
  echo "tests: the Supabase Auth fixtures are missing at $fixtures (set SUPABASE_AUTH_FIXTURES)" >&2
  exit 1
fi
export SUPABASE_AUTH_FIXTURES=$(cd "$fixtures" && pwd)

for major in $majors; do
  case "$major" in
    15|17) ;;
    *) echo "tests: PostgreSQL $major is not supported (15 or 17)" >&2; exit 2 ;;
  esac
done

pg15_tarball=""
for major in $majors; do
  case "$major" in
    15)
      tests/suite.sh 15
      tests/tarball.sh 15
      ;;
    17)
      # The PostgreSQL 15 side of the upgrade tests runs this project's 15 tarball.
      pg15_tarball=$(packaging/package.sh 15 | tail -n 1)
      tests/pg17-root.sh run bash -c 'tar -C / -xzf "$0" && tests/suite.sh 17 && tests/tarball.sh 17' "$pg15_tarball"
      ;;
  esac
done
echo "tests: every suite passed on PostgreSQL ${majors// / and }"
