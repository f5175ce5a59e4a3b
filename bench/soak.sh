#!/usr/bin/env bash
# Soak: an hour of mixed load on one cluster (bench/src/bin/soak.rs), printing each
# minute the worker's CPU and memory, the extension's table sizes, dead tuples, WAL per
# event and the pending count; then bench/soak-plot.py draws the CSV.
#   bench/soak.sh          PostgreSQL 15
#   bench/soak.sh 18       another major (17 runs in the Debian 13 root of tests/pg17-root.sh)
# SOAK_MINUTES (default 60), SOAK_RATE (signups/s, default 40), SOAK_CSV (default
# target/soak.csv), SOAK_PNG (default target/soak.png).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
major=${1:-15}
if [ "$major" = 17 ] && [ -z "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
  tests/setup.sh
  exec tests/pg17-root.sh run env SOAK_MINUTES="${SOAK_MINUTES:-60}" SOAK_RATE="${SOAK_RATE:-40}" \
    SOAK_CSV="${SOAK_CSV:-target/soak.csv}" SOAK_PNG="${SOAK_PNG:-target/soak.png}" bench/soak.sh 17
fi
[ -n "${PG_NEW_USER_HOOK_ROOT:-}" ] || tests/setup.sh
export SUPABASE_AUTH_FIXTURES="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
. tests/pg-major.sh "$major"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
cargo pgrx install --release --pg-config "$pg_config" ${SUDO:+--sudo} >/dev/null
csv="${SOAK_CSV:-target/soak.csv}"
SOAK_CSV="$csv" cargo run --quiet --release --manifest-path bench/Cargo.toml --bin soak
python3 -m pip install -q --disable-pip-version-check matplotlib >/dev/null 2>&1 \
  || echo "soak: matplotlib could not be installed: no plot" >&2
python3 bench/soak-plot.py "$csv" "${SOAK_PNG:-target/soak.png}" || true
