#!/usr/bin/env bash
# What one signup INSERT costs the backend, in CPU instructions (valgrind's callgrind,
# stable on a noisy machine, unlike TPS): no trigger / the bare one-row trigger (the
# floor of any transactional outbox) / pg_new_user_hook's capture. Runs a single-user
# backend under callgrind for N and 3N single-row INSERTs into auth.users (each its
# own transaction, as GoTrue's admin insert) and prints the difference per INSERT, so
# start-up and setup cancel out. Then the same for GoTrue's sign-in UPDATE (it stamps
# last_sign_in_at) with no trigger and with the hook capturing every event type
# (pg_new_user_hook.events = created,updated,deleted): a sign-in must queue nothing
# and cost what it costs without the hook. Needs valgrind and the Supabase Auth fixtures.
#   bench/capture-cost.sh [N]        (default 500; uses the installed extension)
#   PROFILE=1 ...                    also keep callgrind's files for callgrind_annotate
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-500}
pg_config=${PG_CONFIG:-pg_config}
bindir=$("$pg_config" --bindir)
fixtures=${SUPABASE_AUTH_FIXTURES:-$repo/../shared/fixtures/supabase-auth}
command -v valgrind >/dev/null || { echo "capture-cost: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
[ -f "$fixtures/load.sh" ] || { echo "capture-cost: no Supabase Auth fixtures at $fixtures (set SUPABASE_AUTH_FIXTURES)" >&2; exit 2; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

work=$(mktemp -d /tmp/pg_new_user_hook-capture-cost.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" -ne 0 ] || chown postgres:postgres "$work"
trap 'as_pg "$bindir/pg_ctl" -D "$work/data" -m immediate -w stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
as_pg "$bindir/initdb" -D "$work/data" -U supabase_admin --auth=trust -E UTF8 --locale=C -N >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_new_user_hook'
listen_addresses = ''
unix_socket_directories = '$work'
port = 54399
CONF
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/server.log" -w start >/dev/null
export PGHOST=$work PGPORT=54399 PGDATABASE=postgres
as_pg env PATH="$bindir:$PATH" PGOPTIONS="-c client_min_messages=warning" SUPERUSER=supabase_admin sh "$fixtures/load.sh" >/dev/null
as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -U supabase_admin <<'SQL'
CREATE EXTENSION pg_new_user_hook;
CREATE TABLE public.bare_outbox (id bigserial PRIMARY KEY, user_id uuid NOT NULL, created_at timestamptz DEFAULT now());
CREATE FUNCTION public.bare_capture() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.bare_outbox (user_id) VALUES (NEW.id); RETURN NULL; END $$;
SQL
# The users who sign in (before the hook is attached, so they are not queued).
as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -U supabase_admin -c "
  INSERT INTO auth.users (instance_id, id, aud, role, email, raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous)
  SELECT '00000000-0000-0000-0000-000000000000', md5('signin' || g)::uuid, 'authenticated', 'authenticated',
         'signin-' || g || '@example.com', '{\"provider\":\"email\",\"providers\":[\"email\"]}', '{}', now(), now(), false
    FROM generate_series(1, $((3 * n))) g"
as_pg "$bindir/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null

inserts() { # COUNT: single-row GoTrue-shaped INSERTs, one statement (and transaction) per line
  for i in $(seq "$1"); do
    echo "INSERT INTO auth.users (instance_id, id, aud, role, email, raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous) VALUES ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated', 'authenticated', 'u$i-' || gen_random_uuid() || '@example.com', '{\"provider\":\"email\",\"providers\":[\"email\"]}', '{}', now(), now(), false);"
  done
}
sign_ins() { # COUNT: GoTrue's sign-in UPDATE of as many users, one transaction each
  for i in $(seq "$1"); do
    echo "UPDATE auth.users SET last_sign_in_at = now(), updated_at = now() WHERE id = md5('signin$i')::uuid;"
  done
}
single_user() { # SETUP_SQL COUNT OUT [STATEMENTS [POSTGRES OPTION...]] (single-user mode: a line is a statement)
  local statements=${4:-inserts}
  { echo "$1"; "$statements" "$2"; } |
    as_pg valgrind --tool=callgrind --callgrind-out-file="$3" \
      "$bindir/postgres" --single -D "$work/data" "${@:5}" postgres >/dev/null 2>"$3.log"
  grep -m1 -o 'Collected : [0-9]*' "$3.log" | grep -o '[0-9]*'
}
declare -A setup=(
  [none]="SELECT new_user_hook.uninstall(); DROP TRIGGER IF EXISTS bare ON auth.users;"
  [bare]="SELECT new_user_hook.uninstall(); CREATE TRIGGER bare AFTER INSERT ON auth.users FOR EACH ROW EXECUTE FUNCTION public.bare_capture();"
  [hook]="DROP TRIGGER IF EXISTS bare ON auth.users; SELECT new_user_hook.install();"
)
printf '%-6s %16s %14s\n' variant "instr./INSERT" "vs floor"
declare -A per
for v in none bare hook; do
  sql=${setup[$v]}
  short=$(single_user "$sql" "$n" "$work/cg.$v.short")
  long=$(single_user "$sql" "$((3 * n))" "$work/cg.$v.long")
  per[$v]=$(( (long - short) / (2 * n) ))
done
for v in none bare hook; do
  extra=""
  [ "$v" = none ] || extra=$(awk -v a="${per[$v]}" -v b="${per[none]}" -v f="${per[bare]}" 'BEGIN { printf "+%d over none (%.2fx the floor'"'"'s)", a - b, (a - b) / (f - b) }')
  [ "$v" = bare ] && extra="+$((per[bare] - per[none])) over none (the floor)"
  printf '%-6s %16d   %s\n' "$v" "${per[$v]}" "$extra"
done
echo
printf '%-6s %16s %14s\n' variant "instr./sign-in" "throughput"
declare -A signin
for v in none hook; do
  sql=${setup[$v]}
  short=$(single_user "$sql" "$n" "$work/cg.signin.$v.short" sign_ins -c pg_new_user_hook.events=created,updated,deleted)
  long=$(single_user "$sql" "$((3 * n))" "$work/cg.signin.$v.long" sign_ins -c pg_new_user_hook.events=created,updated,deleted)
  signin[$v]=$(( (long - short) / (2 * n) ))
done
printf '%-6s %16d\n' none "${signin[none]}"
printf '%-6s %16d   %s\n' hook "${signin[hook]}" "$(awk -v a="${signin[hook]}" -v b="${signin[none]}" 'BEGIN { printf "%.3f of no trigger (events = created,updated,deleted)", b / a }')"
# A variant that failed would look cheap: check that the hook queued an event per INSERT
# (and none for the sign-ins).
as_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/server.log" -w start >/dev/null
queued=$(as_pg "$bindir/psql" -X -A -t -U supabase_admin -c "SELECT count(*) FROM new_user_hook.deliveries")
as_pg "$bindir/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null
if [ "$queued" -ne $((4 * n)) ]; then
  echo "capture-cost: the hook queued $queued events for $((4 * n)) inserts: its figure is not valid" >&2
  exit 1
fi
if [ -n "${PROFILE:-}" ]; then
  mkdir -p "$repo/target/capture-cost"
  cp "$work"/cg.* "$repo/target/capture-cost/"
  echo "callgrind files in target/capture-cost/ (callgrind_annotate target/capture-cost/cg.hook.long)"
fi
