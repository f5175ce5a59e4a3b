#!/usr/bin/env bash
# Benchmark: builds and installs the extension (release), then runs bench/src/main.rs,
# which starts its own cluster and receiver and prints a table of figures.
# BENCH_SECONDS (default 10) sets the length of each pgbench run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/tests/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
(cd "$repo" && cargo pgrx install --release --pg-config /usr/bin/pg_config ${SUDO:+--sudo} >/dev/null)
export SUPABASE_AUTH_FIXTURES="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
exec cargo run --quiet --release --manifest-path "$repo/bench/Cargo.toml"
