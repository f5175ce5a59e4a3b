-- pg_new_user_hook 0.2.0 → 0.3.0 (ALTER EXTENSION pg_new_user_hook UPDATE TO '0.3.0').
-- Queued events are kept as they are. Building the index reads the outbox while
-- new signups wait for it: with a large outbox, update at a quiet time.

-- The purge of delivered events past the retention, oldest first, through an index.
CREATE INDEX outbox_delivered ON new_user_hook.outbox (delivered_at) WHERE status = 'delivered';

-- install() reads the configuration files before it checks them, so it does not
-- warn about a setting fixed by the pg_reload_conf() just before it.
CREATE FUNCTION new_user_hook."config_problem_after_reload"() RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'config_problem_after_reload_wrapper';
-- Whoever may run install() may run it: it reveals no secret (as config_problem()).
REVOKE ALL ON FUNCTION new_user_hook.config_problem_after_reload() FROM PUBLIC; -- as a fresh install does, before the grant
GRANT EXECUTE ON FUNCTION new_user_hook.config_problem_after_reload() TO PUBLIC;

CREATE OR REPLACE FUNCTION new_user_hook.install(target text DEFAULT 'auth.users') RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    id_type regtype;
    problem text;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table "%" does not exist', target
            USING HINT = CASE WHEN target = 'auth.users'
                THEN 'auth.users is created by Supabase Auth (GoTrue) migrations: start Supabase Auth first, then install.'
                ELSE 'Pass the schema-qualified name of the users table, e.g. new_user_hook.install(''public.users'').' END;
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = rel) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '"%" is not a table', rel USING HINT = 'The hook attaches to the table users are inserted into.';
    END IF;
    SELECT atttypid::regtype INTO id_type FROM pg_attribute
     WHERE attrelid = rel AND attname = 'id' AND attnum > 0 AND NOT attisdropped;
    IF id_type IS DISTINCT FROM 'uuid'::regtype THEN
        RAISE EXCEPTION 'table % needs a column "id" of type uuid (found: %)', rel, coalesce(id_type::text, 'no such column')
            USING HINT = 'The id is sent to the backend as the user''s id.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = rel AND attname = 'email' AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'table % needs a column "email"', rel USING HINT = 'The email is sent to the backend with the id.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'new_user_hook') THEN
        RETURN format('pg_new_user_hook is already installed on %s', rel);
    END IF;
    EXECUTE format('CREATE CONSTRAINT TRIGGER new_user_hook AFTER INSERT ON %s '
                   'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION new_user_hook.capture()', rel);
    problem := new_user_hook.config_problem_after_reload();
    IF problem IS NOT NULL THEN
        RAISE WARNING 'new users of % will be queued but not delivered yet: %', rel, problem;
    END IF;
    RETURN format('pg_new_user_hook installed on %s', rel);
END
$$;

-- The status view says why no worker runs: a standby, no free background worker slot.
CREATE FUNCTION new_user_hook."missing_worker"() RETURNS TEXT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'missing_worker_wrapper';
REVOKE ALL ON FUNCTION new_user_hook.missing_worker() FROM PUBLIC; -- as a fresh install does, before the grant
GRANT EXECUTE ON FUNCTION new_user_hook.missing_worker() TO PUBLIC;

CREATE OR REPLACE VIEW new_user_hook.status AS
WITH worker AS (
    SELECT pid, datname FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_new_user_hook' LIMIT 1
), counts AS (
    SELECT count(*) FILTER (WHERE status = 'pending')                          AS pending,
           count(*) FILTER (WHERE status = 'delivered')                        AS delivered,
           count(*) FILTER (WHERE status = 'failed')                           AS failed,
           min(created_at) FILTER (WHERE status = 'pending')                   AS oldest_pending
      FROM new_user_hook.outbox
), last_error AS (
    SELECT last_error, last_attempt_at FROM new_user_hook.outbox
     WHERE last_error IS NOT NULL ORDER BY last_attempt_at DESC NULLS LAST LIMIT 1
)
SELECT w.pid                      AS worker_pid,
       w.datname                  AS worker_database,
       new_user_hook.preloaded()  AS preloaded,
       c.pending,
       new_user_hook.in_flight() AS in_flight,
       c.delivered,
       c.failed,
       now() - c.oldest_pending   AS oldest_pending_age,
       coalesce(new_user_hook.config_problem(), e.last_error) AS last_error,
       e.last_attempt_at          AS last_error_at,
       CASE
           WHEN new_user_hook.config_problem() IS NOT NULL THEN new_user_hook.config_problem()
           WHEN w.pid IS NULL THEN new_user_hook.missing_worker()
           WHEN w.datname <> current_database() THEN format(
                'the worker delivers from database %I (pg_new_user_hook.database), not this one', w.datname)
       END                        AS problem
  FROM counts c
  LEFT JOIN worker w ON true
  LEFT JOIN last_error e ON true;
