#!/usr/bin/env bash
# PostgreSQL 17 for Debian 12: a Debian 13 ("trixie") root built with debootstrap,
# where the extension is built and tested with the host's Rust toolchain.
#
#   tests/pg17-root.sh create        build the root once (cached; a second run re-uses it)
#   tests/pg17-root.sh run CMD...    run CMD inside the root, in this checkout, as root
#
# Inside, the checkout and the Supabase Auth fixtures sit at the same paths as on the
# host; the host's rustup and cargo directories are mounted read-only, with a writable
# CARGO_HOME of the root's own. Everything mounted is unmounted when CMD ends.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
repo=$(cd "$(dirname "$0")/.." && pwd)
root="${PG17_ROOT:-/var/tmp/pg_new_user_hook-pg17-root}"
# The root: PostgreSQL 17 and its headers and what bindgen needs, by debootstrap;
# then, through apt inside (debootstrap does not resolve alternatives), a C linker
# and what the suites use: sudo for cargo pgrx test --runas, python3-venv and
# openssl for the security tests, Node.js and npm for the NestJS example,
# postgres_exporter and promtool (package prometheus) for the monitoring tests.
base_packages=postgresql-17,postgresql-server-dev-17,libclang-dev,clang,ca-certificates,python3
extra_packages=(gcc libc6-dev make python3-venv openssl sudo curl procps nodejs npm prometheus-postgres-exporter prometheus
  postgresql-17-pgaudit postgresql-17-cron postgresql-17-plpgsql-check)
# Bump when the packages change: an older root gets the missing packages.
stamp_version=3

mounted_in() { grep -q " $1" /proc/mounts; }

mounts=()
unmount_all() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    $SUDO umount "${mounts[$i]}" 2>/dev/null || $SUDO umount -l "${mounts[$i]}" || true
  done
  mounts=()
}
trap unmount_all EXIT
# Interrupted or terminated, still unmount (the EXIT trap runs on exit).
trap 'exit 130' INT TERM
bind() { # bind SRC DST [ro]: SRC of the host at DST inside the root
  $SUDO mkdir -p "$root$2"
  $SUDO mount --bind "$1" "$root$2"
  mounts+=("$root$2")
  if [ "${3:-}" = ro ]; then $SUDO mount -o remount,bind,ro "$root$2"; fi
}

mirror() {
  # The Debian mirror apt already uses here (deb822 or one-line sources).
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
  [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v security | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

create() {
  local stamp
  stamp=$(cat "$root/.pg_new_user_hook-root" 2>/dev/null || true)
  if [ "$stamp" = "$stamp_version" ]; then
    return 0
  fi
  if [ -n "$stamp" ] && ! mounted_in "$root/"; then
    # A root of an earlier stamp: only packages were added since, install them.
    echo "pg17-root: adding packages to $root"
    bind /proc /proc
    bind /dev /dev
    $SUDO cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    local log=/tmp/pg_new_user_hook-pg17-root.log
    if $SUDO chroot "$root" apt-get update -qq >"$log" 2>&1 &&
      $SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${extra_packages[@]}" >>"$log" 2>&1; then
      $SUDO chroot "$root" apt-get clean
      unmount_all
      echo "$stamp_version" | $SUDO tee "$root/.pg_new_user_hook-root" >/dev/null
      return 0
    fi
    tail -n 30 "$log" >&2
    unmount_all
    echo "pg17-root: adding packages failed; building the root anew" >&2
  fi
  if mounted_in "$root/"; then
    echo "pg17-root: $root has file systems mounted in it; unmount them before it is rebuilt" >&2
    exit 1
  fi
  command -v debootstrap >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  echo "pg17-root: building a Debian 13 root with PostgreSQL 17 in $root (a few minutes, once)"
  $SUDO rm -rf "$root"
  $SUDO mkdir -p "$root/usr/sbin"
  # No service starts inside the root while packages install (the host's port 5432 stays free).
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$root/usr/sbin/policy-rc.d" >/dev/null
  $SUDO chmod 755 "$root/usr/sbin/policy-rc.d"
  local log=/tmp/pg_new_user_hook-pg17-root.log
  $SUDO debootstrap --variant=minbase --include="$base_packages" trixie "$root" "$(mirror)" >"$log" 2>&1 || {
    tail -n 30 "$log" >&2
    exit 1
  }
  bind /proc /proc
  bind /dev /dev
  $SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${extra_packages[@]}" >>"$log" 2>&1 || {
    tail -n 30 "$log" >&2
    exit 1
  }
  $SUDO chroot "$root" apt-get clean
  unmount_all
  echo "$stamp_version" | $SUDO tee "$root/.pg_new_user_hook-root" >/dev/null
}

# PostgreSQL 15 from Debian 12, unpacked into the root beside 17 (binaries only, no
# service): the old major of the upgrade tests (pg_upgrade and pg_dumpall, 15 -> 17).
# Debian 13 lacks two of its libraries (ICU 72, OpenLDAP 2.5); they come along.
old_major() {
  [ -x "$root/usr/lib/postgresql/15/bin/postgres" ] && return 0
  echo "pg17-root: adding PostgreSQL 15 (Debian 12) to the root for the upgrade tests"
  local debs
  debs=$(mktemp -d)
  chmod 777 "$debs"
  (cd "$debs" && apt-get download -qq postgresql-15 postgresql-client-15 libicu72 libldap-2.5-0 2>/dev/null) || {
    $SUDO apt-get update -qq
    (cd "$debs" && apt-get download -qq postgresql-15 postgresql-client-15 libicu72 libldap-2.5-0)
  }
  local deb
  for deb in "$debs"/*.deb; do $SUDO dpkg-deb -x "$deb" "$root"; done
  rm -rf "$debs"
  if $SUDO chroot "$root" ldd /usr/lib/postgresql/15/bin/postgres | grep -q 'not found'; then
    $SUDO chroot "$root" ldd /usr/lib/postgresql/15/bin/postgres | grep 'not found' >&2
    echo "pg17-root: PostgreSQL 15 cannot run in the root (libraries above are missing)" >&2
    exit 1
  fi
}

run() {
  create
  old_major
  local fixtures="${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}"
  fixtures=$(cd "$fixtures" 2>/dev/null && pwd || echo "$fixtures")
  local rustup_home="${RUSTUP_HOME:-$HOME/.rustup}" cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  bind /proc /proc
  bind /dev /dev
  bind "$rustup_home" /opt/host-rustup ro
  bind "$cargo_home" /opt/host-cargo ro
  bind "$repo" "$repo"
  [ -d "$fixtures" ] && bind "$fixtures" "$fixtures" ro
  $SUDO cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  $SUDO cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
  # Build output of its own (another libc and libclang than the host's), one per
  # checkout: a directory shared by two checkouts can pass one's stale build off as
  # the other's (cargo compares file times, and a clone's files may be older).
  $SUDO chroot "$root" env -i \
    HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" CI="${CI:-}" \
    RUSTUP_HOME=/opt/host-rustup CARGO_HOME=/root/cargo-home \
    CARGO_TARGET_DIR="/root/target$repo" \
    PATH=/root/cargo-home/bin:/opt/host-cargo/bin:/usr/lib/postgresql/17/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SUPABASE_AUTH_FIXTURES="$fixtures" PG_CONFIG=/usr/lib/postgresql/17/bin/pg_config \
    PG_MAJOR=17 PG_NEW_USER_HOOK_ROOT=1 \
    bash -c 'cd "$0" && exec "$@"' "$repo" "$@"
}

case "${1:-}" in
  create) create ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 create | run CMD..." >&2; exit 2 ;;
esac
