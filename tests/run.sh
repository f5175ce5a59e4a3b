#!/usr/bin/env bash
# The full test suite: unit tests, SQL-surface tests (#[pg_test]) and end-to-end
# tests (real clusters with the Supabase Auth schema, a loopback receiver).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/tests/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
cd "$repo"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# cargo pgrx test runs its cluster as "postgres" (PostgreSQL refuses root) in a
# data directory that user owns; it installs the extension with sudo.
pgdata=/var/tmp/pg_new_user_hook-pgrx-tests
$SUDO rm -rf "$pgdata"
$SUDO install -d -o postgres -g postgres "$pgdata"

fixtures="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
if [ ! -f "$fixtures/load.sh" ]; then
  echo "tests: the Supabase Auth fixtures are missing at $fixtures (set SUPABASE_AUTH_FIXTURES)" >&2
  exit 1
fi
export SUPABASE_AUTH_FIXTURES="$fixtures"

# Unit and #[pg_test] tests run first (and install the extension), then the
# end-to-end suites in tests/: e2e.rs, faults.rs, security.rs.
summary="$repo/target/tmp/faults-summary.tsv"
rm -f "$summary"
cargo pgrx test pg15 --runas postgres --pgdata "$pgdata"

if [ -f "$summary" ]; then
  echo
  echo "Fault-injection summary (tests/faults.rs)"
  sort "$summary" | awk -F'\t' 'BEGIN {
      printf "%-32s %9s %9s %10s %5s %14s %15s %8s\n", "scenario", "committed", "delivered", "duplicates", "lost", "failed signups", "slowest signup", "drained"
    } { printf "%-32s %9s %9s %10s %5s %14s %15s %8s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
fi
