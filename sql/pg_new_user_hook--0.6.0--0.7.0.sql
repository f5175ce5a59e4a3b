-- pg_new_user_hook 0.6.0 -> 0.7.0: a cheaper signup. The trigger appends each event
-- to new_user_hook.captured (no index), and the worker takes them into the outbox in
-- batches; the views and functions that show or count the queue read both.

-- Events as a committing transaction writes them (src/capture.rs), until the worker
-- takes them into the outbox (src/outbox.rs, take_captured: everything it sees, in
-- one statement, before it claims). Narrow and without an index, constraint or
-- default: a signup appends one heap row and nothing else, and the outbox's indexes
-- are maintained by the worker, in batches. Logged: a committed event survives a
-- crash here as in the outbox. Shown in new_user_hook.deliveries as pending.
CREATE TABLE new_user_hook.captured (
    id         uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    source     text        NOT NULL,
    kind       text        NOT NULL,
    record     json        NOT NULL,
    old_record json,
    seq        bigint      NOT NULL,
    created_at timestamptz NOT NULL
);
COMMENT ON TABLE new_user_hook.captured IS
    'Events of users just committed, moved into new_user_hook.outbox by the pg_new_user_hook worker. Read new_user_hook.deliveries instead.';
SELECT pg_catalog.pg_extension_config_dump('new_user_hook.captured', '');

REVOKE ALL ON new_user_hook.captured FROM PUBLIC;

CREATE OR REPLACE FUNCTION new_user_hook.queue_gauges(
    OUT pending bigint, OUT failed bigint, OUT oldest_pending timestamptz, OUT captured bigint)
STABLE SECURITY DEFINER LANGUAGE sql SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT q.pending + k.pending, (SELECT count(*) FROM new_user_hook.outbox WHERE status = 'failed'),
           LEAST(q.oldest_pending, k.oldest_pending), c.first_attempts - c.requeued + q.never_attempted + k.pending
      FROM (SELECT count(*) AS pending, count(*) FILTER (WHERE attempts = 0) AS never_attempted,
                   min(created_at) AS oldest_pending
              FROM new_user_hook.outbox WHERE status = 'pending') AS q,
           -- Not taken into the outbox yet: pending, never attempted.
           (SELECT count(*) AS pending, min(created_at) AS oldest_pending FROM new_user_hook.captured) AS k,
           new_user_hook.counters AS c;
END;

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
           AND NOT EXISTS (SELECT 1 FROM new_user_hook.captured k
                            WHERE k.user_id = u.id AND k.source = $2 AND k.kind = 'created')
        ON CONFLICT (id) DO NOTHING$q$, rel)
      USING user_ids, event_source, rel;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM new_user_hook.wake_on_commit();
    END IF;
    RETURN n;
END
$$;

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
  FROM new_user_hook.outbox
UNION ALL
-- Committed and not yet taken into the outbox by the worker: pending, due now.
SELECT id, user_id, source, 'pending', 0, created_at, NULL, NULL, NULL, created_at, NULL, kind
  FROM new_user_hook.captured;

CREATE OR REPLACE FUNCTION new_user_hook.redeliver(event_id uuid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_user_hook.captured WHERE id = event_id) THEN
        RETURN false; -- pending: not taken into the outbox yet
    END IF;
    IF NOT EXISTS (SELECT 1 FROM new_user_hook.outbox WHERE id = event_id) THEN
        RAISE EXCEPTION 'no event with id %', event_id
            USING HINT = 'Event ids are in new_user_hook.deliveries (column id); delivered events are deleted after pg_new_user_hook.retention.';
    END IF;
    UPDATE new_user_hook.outbox
       SET status = 'pending', attempts = 0, next_attempt_at = now(), delivered_at = NULL
     WHERE id = event_id AND status <> 'pending';
    IF NOT FOUND THEN
        RETURN false; -- already pending
    END IF;
    -- Queued again, not captured again (captured_total in the metrics).
    UPDATE new_user_hook.counters SET requeued = requeued + 1;
    PERFORM new_user_hook.wake_on_commit();
    RETURN true;
END
$$;
