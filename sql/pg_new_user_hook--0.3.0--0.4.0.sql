-- pg_new_user_hook 0.3.0 → 0.4.0 (ALTER EXTENSION pg_new_user_hook UPDATE TO '0.4.0').
-- Queued events are kept. The outbox is rewritten once (its record column becomes
-- json): with a large outbox, update at a quiet time.

-- What each signup's insert into the outbox no longer pays for: parsing the record
-- into jsonb (the trigger hands over JSON text it wrote itself), a CHECK constraint
-- compiled afresh at every insert (only this extension writes status), and an index
-- kept only so that the status view's last error needed no scan.
ALTER TABLE new_user_hook.outbox
    DROP CONSTRAINT outbox_status_check,
    ALTER COLUMN record TYPE json USING record::json;
DROP INDEX new_user_hook.outbox_last_error;

-- capture() moves from PL/pgSQL into the library, and skips users inserted with
-- pg_new_user_hook.capture off.
CREATE OR REPLACE FUNCTION new_user_hook.capture() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'capture_wrapper';

-- The record of a row, as capture() takes it; used by backfill().
CREATE FUNCTION new_user_hook.snapshot(target regclass, row_id tid) RETURNS json
STRICT STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'snapshot_wrapper';

-- Announces existing users once.
CREATE FUNCTION new_user_hook.backfill(user_ids uuid[], target text DEFAULT 'auth.users') RETURNS bigint
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
           AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox o WHERE o.user_id = u.id AND o.source = $2)
        ON CONFLICT (id) DO NOTHING$q$, rel)
      USING user_ids, event_source, rel;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM new_user_hook.wake_on_commit();
    END IF;
    RETURN n;
END
$$;

-- As a fresh install: nothing for PUBLIC.
REVOKE ALL ON FUNCTION new_user_hook.snapshot(regclass, tid), new_user_hook.backfill(uuid[], text) FROM PUBLIC;
