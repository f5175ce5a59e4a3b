#!/usr/bin/env bash
# Soak: an hour of mixed load on one cluster (bench/src/bin/soak.rs), printing each
# minute the worker's CPU and memory, the extension's table sizes, dead tuples, WAL per
# event and the pending count; then bench/soak-plot.py draws the CSV.
#   bench/soak.sh          PostgreSQL 15
#   bench/soak.sh 18       another major (17 runs in the Debian 13 root of tests/pg17-root.sh)
# SOAK_MINUTES (default 60), SOAK_RATE (signups/s, default 40), SOAK_CSV (default
# target/soak.csv), SOAK_PNG (default target/soak.png). Exits non-zero if a user signed
# up was never delivered or an event was given up on.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
major=${1:-15}
csv="${SOAK_CSV:-target/soak.csv}"
png="${SOAK_PNG:-target/soak.png}"
status=0
if [ -n "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
  # Inside the root: the soak only; the host draws the plot.
  . tests/pg-major.sh "$major"
  cargo pgrx install --release --pg-config "$pg_config" >/dev/null
  exec env SOAK_CSV="$csv" cargo run --quiet --release --manifest-path bench/Cargo.toml --bin soak
fi
tests/setup.sh
export SUPABASE_AUTH_FIXTURES="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
if [ "$major" = 17 ]; then
  tests/pg17-root.sh run env SOAK_MINUTES="${SOAK_MINUTES:-60}" SOAK_RATE="${SOAK_RATE:-40}" \
    SOAK_MINUTE_SECONDS="${SOAK_MINUTE_SECONDS:-60}" SOAK_CSV="$csv" bench/soak.sh 17 || status=$?
else
  . tests/pg-major.sh "$major"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  cargo pgrx install --release --pg-config "$pg_config" ${SUDO:+--sudo} >/dev/null
  SOAK_CSV="$csv" cargo run --quiet --release --manifest-path bench/Cargo.toml --bin soak || status=$?
fi
# matplotlib from PyPI into target/ (Debian's python refuses a system-wide pip install).
plot_libs=target/soak-python
if [ ! -d "$plot_libs/matplotlib" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$plot_libs" matplotlib >/dev/null 2>&1 \
    || echo "soak: matplotlib could not be installed from PyPI: no plot" >&2
fi
PYTHONPATH="$plot_libs" python3 bench/soak-plot.py "$csv" "$png" || true
exit "$status"
