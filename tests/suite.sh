#!/usr/bin/env bash
# Every suite on one PostgreSQL major, in the environment this runs in (Debian 12
# for 15 and 18; the Debian 13 root of tests/pg17-root.sh for 17). Called by tests/run.sh.
#   tests/suite.sh MAJOR [TESTNAME]   TESTNAME: only the tests whose names contain it
set -euo pipefail
major=${1:?usage: tests/suite.sh MAJOR [TESTNAME]}
only=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. tests/pg-major.sh "$major"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# cargo pgrx test runs its cluster as "postgres" (PostgreSQL refuses root) in a
# data directory that user owns; it installs the extension with sudo.
pgdata="/var/tmp/pg_new_user_hook-pgrx-tests-$major"
$SUDO rm -rf "$pgdata"
$SUDO install -d -o postgres -g postgres "$pgdata"

# The upgrade suite installs earlier releases and updates them in place: their
# install scripts go where cargo pgrx test puts the current one.
$SUDO install -m 644 sql/releases/pg_new_user_hook--*.sql "$("$pg_config" --sharedir)/extension/"

# The upgrade tests into 18 start from an older PostgreSQL 15 with the 15 tarball (the
# 17 suite's start from Debian 12's 15, unpacked into the root by tests/pg17-root.sh).
if [ "$major" = 18 ] && [ -z "${UPGRADE_FROM_BINDIR:-}" ]; then
  UPGRADE_FROM_BINDIR=$(tests/old-major.sh | tail -n 1)
  export UPGRADE_FROM_BINDIR
fi

summary="${CARGO_TARGET_DIR:-$repo/target}/tmp/faults-summary.tsv"
rm -f "$summary"
if [ -n "$only" ]; then
  echo "== PostgreSQL $major: the tests named *$only*"
  # cargo pgrx test installs the library when a #[pg_test] runs first: a filter that
  # picks integration tests only would test the library installed last, not this code.
  cargo pgrx install --pg-config "$pg_config" ${SUDO:+--sudo} >/dev/null
else
  echo "== PostgreSQL $major: unit, #[pg_test], e2e, faults, security, upgrade, NestJS and worker suites"
fi
cargo pgrx test "pg$major" $only --runas postgres --pgdata "$pgdata"

if [ -f "$summary" ]; then
  echo
  echo "Fault-injection summary (tests/faults.rs), PostgreSQL $major"
  sort "$summary" | awk -F'\t' 'BEGIN {
      printf "%-32s %9s %9s %10s %5s %14s %15s %8s\n", "scenario", "committed", "delivered", "duplicates", "lost", "failed signups", "slowest signup", "drained"
    } { printf "%-32s %9s %9s %10s %5s %14s %15s %8s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
fi
