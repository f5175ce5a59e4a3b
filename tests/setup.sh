#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian 12 (PostgreSQL 17
# comes in the Debian 13 root of tests/pg17-root.sh), as root or as a
# sudo user. Idempotent: a second run installs nothing.
#   tests/setup.sh              everything
#   tests/setup.sh --packages   Debian's packages only (tests/run.sh builds the Debian 13
#                               root beside the cargo installs, and apt allows one at a time)
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# python3-venv and openssl: the security tests' reference signature verifier and test CA.
# debootstrap: the Debian 13 root of PostgreSQL 17 (tests/pg17-root.sh).
packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo python3 python3-venv python3-pip openssl curl ca-certificates build-essential debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js and npm: the NestJS example's end-to-end test (any Node.js >= 18 will do).
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
# The monitoring tests: the real postgres_exporter, and promtool (package prometheus)
# to check the alert rules; the Supabase-like test: libraries Supabase preloads
# (pgaudit, pg_cron) and plpgsql_check. Without their recommends (no node exporter,
# no services).
monitoring=()
for p in prometheus-postgres-exporter prometheus postgresql-15-pgaudit postgresql-15-cron postgresql-15-plpgsql-check; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || monitoring+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#monitoring[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} ${monitoring[*]}"
  $SUDO apt-get update -qq
  [ ${#missing[@]} -eq 0 ] ||
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  [ ${#monitoring[@]} -eq 0 ] ||
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${monitoring[@]}" >/dev/null
fi

[ "${1:-}" != --packages ] || exit 0

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# cargo-pgrx must be exactly the pgrx version in Cargo.toml.
if ! cargo pgrx --version 2>/dev/null | grep -qx "cargo-pgrx 0.18.1"; then
  echo "setup: installing cargo-pgrx 0.18.1 (takes a few minutes)"
  cargo install cargo-pgrx --version 0.18.1 --locked
fi
# `cargo pgrx init` for a major is done by tests/pg-major.sh, which every script sources.
# The tarballs link against glibc 2.31 through zig (packaging/package.sh, which brings
# zig itself from PyPI): cargo-zigbuild's `zig cc` is the linker.
if ! cargo-zigbuild --version 2>/dev/null | grep -qx "cargo-zigbuild 0.24.1"; then
  echo "setup: installing cargo-zigbuild 0.24.1"
  cargo install cargo-zigbuild --version 0.24.1 --locked
fi
