-- pg_new_user_hook 0.5.0 -> 0.6.0: the user's lifecycle. Events of a kind
-- (created, updated, deleted: pg_new_user_hook.events), an update's old record,
-- and the order of a user's events; install() attaches the update and delete
-- triggers too, and this script adds them where the hook is installed.

ALTER TABLE new_user_hook.outbox
    ADD COLUMN kind text NOT NULL DEFAULT 'created',
    ADD COLUMN old_record json,
    -- Existing events are each the first of their user.
    ADD COLUMN seq bigint NOT NULL DEFAULT 0;
ALTER TABLE new_user_hook.outbox
    ALTER COLUMN seq SET DEFAULT (pg_catalog.pg_current_wal_insert_lsn() - '0/0')::bigint;
CREATE INDEX outbox_user ON new_user_hook.outbox USING hash (user_id);
COMMENT ON TABLE new_user_hook.outbox IS
    'Events of users (created, updated, deleted), delivered by the pg_new_user_hook worker. Read new_user_hook.deliveries instead.';

CREATE OR REPLACE VIEW new_user_hook.deliveries AS
SELECT id,
       user_id,
       source,
       status,
       attempts,
       CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at,
       last_status_code,
       last_error,
       last_attempt_at,
       created_at,
       delivered_at,
       kind AS event_type
  FROM new_user_hook.outbox;

-- The columns whose change can make an event (src/capture.rs): install() lists
-- them in the update trigger (UPDATE OF …), so other updates (sign-ins) queue nothing.
CREATE FUNCTION new_user_hook.watched_columns(target regclass) RETURNS text[]
STRICT STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'watched_columns_wrapper';

REVOKE ALL ON FUNCTION new_user_hook.watched_columns(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION new_user_hook.watched_columns(regclass) TO PUBLIC;

CREATE OR REPLACE FUNCTION new_user_hook.backfill(user_ids uuid[], target text DEFAULT 'auth.users') RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    event_source text;
    n bigint;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table "%" does not exist', target
            USING HINT = 'Pass the schema-qualified name of the users table, as given to new_user_hook.install().';
    END IF;
    SELECT format('%I.%I', ns.nspname, c.relname) INTO event_source
      FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace WHERE c.oid = rel;
    EXECUTE format($q$
        INSERT INTO new_user_hook.outbox (id, user_id, source, record)
        SELECT encode(set_byte(set_byte(h, 6, (get_byte(h, 6) & 15) | 128), 8, (get_byte(h, 8) & 63) | 128), 'hex')::uuid,
               u.id, $2, u.record
          FROM (SELECT t.id, new_user_hook.snapshot($3, t.ctid) AS record FROM %s AS t WHERE t.id = ANY ($1)) AS u,
               -- A name-based UUID (version 8): the first 16 bytes of a SHA-256.
               LATERAL (SELECT substring(sha256(convert_to('pg_new_user_hook backfill ' || $2 || ' ' || u.id, 'UTF8'))
                                         FROM 1 FOR 16) AS h) AS digest
         WHERE u.record IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox o
                            WHERE o.user_id = u.id AND o.source = $2 AND o.kind = 'created')
        ON CONFLICT (id) DO NOTHING$q$, rel)
      USING user_ids, event_source, rel;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM new_user_hook.wake_on_commit();
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION new_user_hook.install(target text DEFAULT 'auth.users') RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    id_type regtype;
    watched text;
    added int := 0;
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
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'new_user_hook') THEN
        EXECUTE format('CREATE CONSTRAINT TRIGGER new_user_hook AFTER INSERT ON %s '
                       'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION new_user_hook.capture()', rel);
        added := added + 1;
    END IF;
    -- Only for an UPDATE that sets a column an event can carry: a sign-in (which
    -- sets last_sign_in_at and updated_at) queues nothing. A column list, not a
    -- WHEN: PostgreSQL parses a trigger's WHEN anew for every statement.
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'new_user_hook_updated') THEN
        SELECT string_agg(format('%I', c), ', ') INTO watched
          FROM unnest(new_user_hook.watched_columns(rel)) AS c;
        EXECUTE format('CREATE CONSTRAINT TRIGGER new_user_hook_updated AFTER UPDATE OF %s ON %s '
                       'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION new_user_hook.capture()',
                       watched, rel);
        added := added + 1;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'new_user_hook_deleted') THEN
        EXECUTE format('CREATE CONSTRAINT TRIGGER new_user_hook_deleted AFTER DELETE ON %s '
                       'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION new_user_hook.capture()', rel);
        added := added + 1;
    END IF;
    IF added = 0 THEN
        RETURN format('pg_new_user_hook is already installed on %s', rel);
    END IF;
    problem := new_user_hook.config_problem_after_reload();
    IF problem IS NOT NULL THEN
        RAISE WARNING 'new users of % will be queued but not delivered yet: %', rel, problem;
    END IF;
    RETURN format('pg_new_user_hook installed on %s', rel);
END
$$;

CREATE OR REPLACE FUNCTION new_user_hook.uninstall(target text DEFAULT 'auth.users') RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    name text;
BEGIN
    IF rel IS NULL OR NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'new_user_hook') THEN
        RETURN format('pg_new_user_hook is not installed on %s', target);
    END IF;
    FOREACH name IN ARRAY ARRAY['new_user_hook', 'new_user_hook_updated', 'new_user_hook_deleted'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', name, rel);
    END LOOP;
    RETURN format('pg_new_user_hook removed from %s', rel);
END
$$;

-- Where the hook is installed, the update and delete triggers join the insert one.
DO $$
DECLARE
    rel regclass;
BEGIN
    FOR rel IN SELECT t.tgrelid::regclass FROM pg_catalog.pg_trigger t
                WHERE t.tgname = 'new_user_hook' AND t.tgfoid = 'new_user_hook.capture()'::regprocedure LOOP
        PERFORM new_user_hook.install(rel::text);
    END LOOP;
END
$$;
