#!/usr/bin/env bash
# One major's benchmark, in the environment this runs in (see bench/run.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. tests/pg-major.sh "${1:?usage: bench/run-one.sh MAJOR}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
cargo pgrx install --release --pg-config "$pg_config" ${SUDO:+--sudo} >/dev/null
exec cargo run --quiet --release --manifest-path bench/Cargo.toml
