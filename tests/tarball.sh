#!/usr/bin/env bash
# Builds one major's tarball, installs it with tar (as a user would), and runs the
# demo on what was installed: a signup delivered end to end. Called by tests/run.sh
# in the environment of that major (the host for 15, the Debian 13 root for 17).
#   tests/tarball.sh MAJOR
set -euo pipefail
major=${1:?usage: tests/tarball.sh MAJOR}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "== PostgreSQL $major: the tarball, installed and run"
tarball=$(packaging/package.sh "$major" | tail -n 1)
tests/portable-library.sh "$tarball"
$SUDO tar -C / -xzf "$tarball"
DEMO_INSTALLED=1 PG_MAJOR="$major" examples/demo.sh
