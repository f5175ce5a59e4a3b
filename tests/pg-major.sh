# Sourced by the project's scripts: selects PostgreSQL $1 (15 or 17) in the
# environment the script runs in, and initialises cargo pgrx for it.
# Sets pg_config and puts the major's bin directory first on the PATH.
pg_major=${1:?usage: . tests/pg-major.sh MAJOR}
pg_config="/usr/lib/postgresql/$pg_major/bin/pg_config"
if [ ! -x "$pg_config" ]; then
  echo "no PostgreSQL $pg_major at $pg_config (PostgreSQL 17 runs in the root of tests/pg17-root.sh)" >&2
  exit 1
fi
export PG_CONFIG="$pg_config" PATH="$HOME/.cargo/bin:/usr/lib/postgresql/$pg_major/bin:$PATH"
if ! grep -qs "^pg$pg_major = \"$pg_config\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  cargo pgrx init "--pg$pg_major" "$pg_config" >/dev/null
fi
