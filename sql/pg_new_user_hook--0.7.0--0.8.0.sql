-- pg_new_user_hook 0.7.0 -> 0.8.0: delivery that no publication, typo or SQL call
-- can stop. Events are appended to a log the worker reads between snapshots and
-- empties by rotation (the capture table, whose rows it deleted one by one, goes);
-- the outbox is never truncated by VACUUM; install() refuses
-- partitioned tables and backfill() anything but a table; redeliver() and
-- redeliver_failed() run as their owner, so EXECUTE is all an operator needs; the
-- metrics say whether there is a problem, and the status names failures that repeat
-- without the breaker and events given up on. The trigger function's code changed
-- (events written at commit), not its definition.

-- Locked first, in the order a reader of the deliveries view takes them (the view,
-- the outbox, the capture table), so that the update waits for readers instead of
-- deadlocking with one.
LOCK TABLE new_user_hook.deliveries IN ACCESS EXCLUSIVE MODE;
ALTER TABLE new_user_hook.outbox SET (vacuum_truncate = false);
-- A user's earlier pending event is found from the event backwards (a claim's cost no
-- longer grows with the square of one user's backlog). Builds over the whole outbox.
DROP INDEX new_user_hook.outbox_user;
CREATE INDEX outbox_user ON new_user_hook.outbox (user_id, seq);
-- The log: events as committing transactions write them (src/capture/), read by the
-- worker in commit order (src/store/log.rs) and sent from there, never changed or
-- deleted one by one. Two segments: signups append to one (shared memory says
-- which); once every event of the other has been resolved and is older than
-- pg_new_user_hook.retention, the worker empties it (TRUNCATE) and points signups
-- to it (src/store/maintenance.rs, rotate_log). A signup appends one heap row and one
-- entry of the index on xid, and nothing else; no row is updated or deleted, so
-- there is nothing to vacuum. Logged: a committed event survives a crash.
-- xid is the writing transaction's id: the worker reads the events of the
-- transactions that committed between two snapshots (new_user_hook.positions), so an
-- event whose transaction started early and committed late is read, once.
CREATE TABLE new_user_hook.log_0 (
    id         uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    source     text        NOT NULL,
    kind       text        NOT NULL,
    record     json        NOT NULL,
    old_record json,
    seq        bigint      NOT NULL,
    created_at timestamptz NOT NULL,
    xid        xid8        NOT NULL
);
CREATE INDEX log_0_xid ON new_user_hook.log_0 (xid);
CREATE TABLE new_user_hook.log_1 (LIKE new_user_hook.log_0);
CREATE INDEX log_1_xid ON new_user_hook.log_1 (xid);
COMMENT ON TABLE new_user_hook.log_0 IS
    'Events of users as committed (one of the log''s two segments), read by the pg_new_user_hook worker. Read new_user_hook.deliveries instead.';
COMMENT ON TABLE new_user_hook.log_1 IS
    'Events of users as committed (one of the log''s two segments), read by the pg_new_user_hook worker. Read new_user_hook.deliveries instead.';
-- Never truncated by VACUUM: that lock would hold signups up. A replica identity
-- for the worker's rare UPDATE (re-stamping an event restored without the trigger
-- below) under a publication; it costs WAL only for such an update.
ALTER TABLE new_user_hook.log_0 SET (vacuum_truncate = false);
ALTER TABLE new_user_hook.log_1 SET (vacuum_truncate = false);
ALTER TABLE new_user_hook.log_0 REPLICA IDENTITY FULL;
ALTER TABLE new_user_hook.log_1 REPLICA IDENTITY FULL;

-- Where the worker is in the log: every event whose transaction the snapshot sees is
-- resolved (delivered, or in the outbox: a retry, a dead letter, held behind an
-- earlier event of its user). NULL: nothing resolved yet (a new installation, or a
-- restored one). window_number counts the windows the worker has read the log in:
-- done rows of this window and later list events delivered beyond the snapshot.
-- One row per endpoint.
CREATE TABLE new_user_hook.positions (
    endpoint      text        PRIMARY KEY DEFAULT 'default',
    snapshot      pg_snapshot,
    window_number bigint      NOT NULL DEFAULT 0,
    moved_at      timestamptz
);
INSERT INTO new_user_hook.positions DEFAULT VALUES;
COMMENT ON TABLE new_user_hook.positions IS
    'How far the pg_new_user_hook worker has resolved the events of new_user_hook.log_0 and log_1.';

-- Events delivered from the log: one row per batch of outcomes recorded, window and
-- segment, inserted by the worker and never updated or deleted one by one. done_0
-- lists events of log_0 and is emptied with it, done_1 likewise: a delivered event
-- costs its id and code in an array, not a row of its own.
CREATE TABLE new_user_hook.done_0 (
    window_number bigint      NOT NULL,
    ids           uuid[]      NOT NULL,
    codes         int[]       NOT NULL,
    at            timestamptz NOT NULL
);
-- A worker that starts again skips the events its open windows delivered.
CREATE INDEX done_0_window ON new_user_hook.done_0 (window_number);
CREATE TABLE new_user_hook.done_1 (LIKE new_user_hook.done_0);
CREATE INDEX done_1_window ON new_user_hook.done_1 (window_number);
ALTER TABLE new_user_hook.done_0 SET (vacuum_truncate = false);
ALTER TABLE new_user_hook.done_1 SET (vacuum_truncate = false);
COMMENT ON TABLE new_user_hook.done_0 IS
    'Events of new_user_hook.log_0 delivered by the pg_new_user_hook worker. Read new_user_hook.deliveries instead.';
COMMENT ON TABLE new_user_hook.done_1 IS
    'Events of new_user_hook.log_1 delivered by the pg_new_user_hook worker. Read new_user_hook.deliveries instead.';

-- Events written by SQL (a restore's COPY, an INSERT) get the writing transaction's
-- id: a restored event carries an id of this cluster, so it is read once, in order.
-- The capture writes its own rows directly, without this trigger.
CREATE FUNCTION new_user_hook.stamp_xid() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.xid := pg_current_xact_id();
    RETURN NEW;
END
$$;
CREATE TRIGGER stamp_xid BEFORE INSERT ON new_user_hook.log_0 FOR EACH ROW EXECUTE FUNCTION new_user_hook.stamp_xid();
CREATE TRIGGER stamp_xid BEFORE INSERT ON new_user_hook.log_1 FOR EACH ROW EXECUTE FUNCTION new_user_hook.stamp_xid();
-- Also under session_replication_role = replica (a data-only restore, logical
-- replication's apply worker).
ALTER TABLE new_user_hook.log_0 ENABLE ALWAYS TRIGGER stamp_xid;
ALTER TABLE new_user_hook.log_1 ENABLE ALWAYS TRIGGER stamp_xid;

-- The events of the log not resolved yet (pending, and not in the outbox): their
-- transactions committed after the position's snapshot was taken (all of them if
-- there is no position), and no done row of an open window lists them. Through the
-- index on xid, in ranges the planner keeps on the index however large the log: the
-- transactions from the position's xmax to the current one's, those running at the
-- position, and events stamped beyond the current xmax (restored without their
-- transaction id: the worker stamps them again); disjoint whatever the position holds.
-- One range with an OR would be read by a scan of the whole log.
CREATE VIEW new_user_hook.unread AS
WITH p AS (SELECT snapshot, window_number FROM new_user_hook.positions WHERE endpoint = 'default'),
done AS (SELECT u.id FROM new_user_hook.done_0 AS d, unnest(d.ids) AS u(id)
          WHERE d.window_number >= coalesce((SELECT window_number FROM p), 0)
         UNION ALL
         SELECT u.id FROM new_user_hook.done_1 AS d, unnest(d.ids) AS u(id)
          WHERE d.window_number >= coalesce((SELECT window_number FROM p), 0)),
b AS (SELECT coalesce((SELECT pg_catalog.pg_snapshot_xmax(snapshot) FROM p), '0') AS lo)
SELECT l.id, l.user_id, l.source, l.kind, l.record, l.old_record, l.seq, l.created_at
  FROM (SELECT * FROM new_user_hook.log_0 WHERE xid >= (SELECT lo FROM b) AND xid < pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
        UNION ALL SELECT * FROM new_user_hook.log_0 WHERE xid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip(snapshot) FROM p)) AND xid < pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
        UNION ALL SELECT * FROM new_user_hook.log_0 WHERE xid >= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
        UNION ALL SELECT * FROM new_user_hook.log_1 WHERE xid >= (SELECT lo FROM b) AND xid < pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
        UNION ALL SELECT * FROM new_user_hook.log_1 WHERE xid = ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip(snapshot) FROM p)) AND xid < pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())
        UNION ALL SELECT * FROM new_user_hook.log_1 WHERE xid >= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())) AS l
 WHERE NOT coalesce(pg_catalog.pg_visible_in_snapshot(l.xid, (SELECT snapshot FROM p)), false)
   AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox AS o WHERE o.id = l.id)
   AND NOT EXISTS (SELECT 1 FROM done WHERE done.id = l.id);

-- Events not resolved are data: pg_dump keeps them, and only them (the resolved ones
-- are in the outbox, or were delivered): the rows of unread, spelled out over tables
-- (pg_dump reads no view: restrict_nonsystem_relation_kind). The position and the
-- done rows are not dumped: a restored database reads what its log holds from the start.
SELECT pg_catalog.pg_extension_config_dump('new_user_hook.log_0',
    'WHERE NOT coalesce(pg_catalog.pg_visible_in_snapshot(xid, (SELECT snapshot FROM new_user_hook.positions WHERE endpoint = ''default'')), false)
       AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox AS o WHERE o.id = log_0.id)
       AND NOT EXISTS (SELECT 1 FROM (SELECT pg_catalog.unnest(ids) FROM new_user_hook.done_0
                                       WHERE window_number >= coalesce((SELECT window_number FROM new_user_hook.positions WHERE endpoint = ''default''), 0)
                                      UNION ALL
                                      SELECT pg_catalog.unnest(ids) FROM new_user_hook.done_1
                                       WHERE window_number >= coalesce((SELECT window_number FROM new_user_hook.positions WHERE endpoint = ''default''), 0)) AS d(id)
                        WHERE d.id = log_0.id)');
SELECT pg_catalog.pg_extension_config_dump('new_user_hook.log_1',
    'WHERE NOT coalesce(pg_catalog.pg_visible_in_snapshot(xid, (SELECT snapshot FROM new_user_hook.positions WHERE endpoint = ''default'')), false)
       AND NOT EXISTS (SELECT 1 FROM new_user_hook.outbox AS o WHERE o.id = log_1.id)
       AND NOT EXISTS (SELECT 1 FROM (SELECT pg_catalog.unnest(ids) FROM new_user_hook.done_0
                                       WHERE window_number >= coalesce((SELECT window_number FROM new_user_hook.positions WHERE endpoint = ''default''), 0)
                                      UNION ALL
                                      SELECT pg_catalog.unnest(ids) FROM new_user_hook.done_1
                                       WHERE window_number >= coalesce((SELECT window_number FROM new_user_hook.positions WHERE endpoint = ''default''), 0)) AS d(id)
                        WHERE d.id = log_1.id)');

-- The events captured and not yet taken into the outbox go into the log, stamped
-- with this transaction's id: the worker reads them first. The capture table is
-- locked since the start (with the deliveries view): signups wait for this update,
-- none adds to it once it is copied, and those that waited write into the outbox.
INSERT INTO new_user_hook.log_0 (id, user_id, source, kind, record, old_record, seq, created_at)
SELECT id, user_id, source, kind, record, old_record, seq, created_at FROM new_user_hook.captured;

CREATE OR REPLACE FUNCTION new_user_hook.queue_gauges(
    OUT pending bigint, OUT failed bigint, OUT oldest_pending timestamptz, OUT captured bigint)
STABLE SECURITY DEFINER LANGUAGE sql SET search_path = pg_catalog, pg_temp
-- Planned on the indexes: PostgreSQL 18 keeps a SQL function's plan for the session,
-- and one made while the log was small would read all of it once it has grown. No
-- JIT: up to PostgreSQL 17 the counters' scan (no index) then adds 10^10 to the cost,
-- and the count would be compiled at every call (a second).
SET enable_seqscan = off SET jit = off
BEGIN ATOMIC
    SELECT q.pending + k.pending, (SELECT count(*) FROM new_user_hook.outbox WHERE status = 'failed'),
           LEAST(q.oldest_pending, k.oldest_pending), c.first_attempts - c.requeued + q.never_attempted + k.pending
      FROM (SELECT count(*) AS pending, count(*) FILTER (WHERE attempts = 0) AS never_attempted,
                   min(created_at) AS oldest_pending
              FROM new_user_hook.outbox WHERE status = 'pending') AS q,
           -- In the log and not resolved yet: pending, never attempted.
           (SELECT count(*) AS pending, min(created_at) AS oldest_pending FROM new_user_hook.unread) AS k,
           new_user_hook.counters AS c;
END;

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
-- In the log and not in the outbox: delivered if a done row lists it (one attempt),
-- else pending, due now.
SELECT l.id, l.user_id, l.source,
       CASE WHEN d.id IS NULL THEN 'pending' ELSE 'delivered' END,
       CASE WHEN d.id IS NULL THEN 0 ELSE 1 END,
       CASE WHEN d.id IS NULL THEN l.created_at END,
       d.code, NULL, d.at, l.created_at, d.at, l.kind
  FROM (SELECT id, user_id, source, kind, created_at FROM new_user_hook.log_0
        UNION ALL
        SELECT id, user_id, source, kind, created_at FROM new_user_hook.log_1) AS l
  LEFT JOIN (SELECT u.id, u.code, d.at FROM new_user_hook.done_0 AS d, unnest(d.ids, d.codes) AS u(id, code)
             UNION ALL
             SELECT u.id, u.code, d.at FROM new_user_hook.done_1 AS d, unnest(d.ids, d.codes) AS u(id, code)) AS d
    ON d.id = l.id
 WHERE NOT EXISTS (SELECT 1 FROM new_user_hook.outbox AS o WHERE o.id = l.id);

ALTER EXTENSION pg_new_user_hook DROP TABLE new_user_hook.captured;
DROP TABLE new_user_hook.captured;

CREATE OR REPLACE FUNCTION new_user_hook.install(target text DEFAULT 'auth.users') RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    id_type regtype;
    watched text;
    added int := 0;
    problem text;
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'new_user_hook.install() needs the name of a users table, not NULL'
            USING HINT = 'Call new_user_hook.install() for auth.users, or pass the schema-qualified name of another table.';
    END IF;
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table "%" does not exist', target
            USING HINT = CASE WHEN target = 'auth.users'
                THEN 'auth.users is created by Supabase Auth (GoTrue) migrations: start Supabase Auth first, then install.'
                ELSE 'Pass the schema-qualified name of the users table, e.g. new_user_hook.install(''public.users'').' END;
    END IF;
    -- A partitioned table's triggers fire on its partitions: events would name the
    -- partition a user is stored in (since 0.8.0: refused).
    IF (SELECT relkind FROM pg_class WHERE oid = rel) = 'p' THEN
        RAISE EXCEPTION '% is a partitioned table: pg_new_user_hook attaches to a plain table', rel
            USING HINT = 'Install it on the (unpartitioned) table users are inserted into.';
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = rel) <> 'r' THEN
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
    -- PostgreSQL 18's virtual generated columns are computed when a query reads them;
    -- the stored row an event is made from holds no value for them.
    SELECT string_agg(format('"%s"', attname), ', ' ORDER BY attnum) INTO problem FROM pg_attribute
     WHERE attrelid = rel AND attname IN ('id', 'email', 'deleted_at') AND attnum > 0 AND NOT attisdropped
       AND attgenerated = 'v';
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'table %: % is a virtual generated column, whose value the hook cannot read from a changed row', rel,
            CASE WHEN problem LIKE '%,%' THEN 'each of ' || problem ELSE 'column ' || problem END
            USING HINT = 'Make it a stored generated column (GENERATED ALWAYS AS (...) STORED) or a plain column.';
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

CREATE OR REPLACE FUNCTION new_user_hook.backfill(user_ids uuid[], target text DEFAULT 'auth.users') RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := to_regclass(target);
    event_source text;
    n bigint;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table "%" does not exist', coalesce(target, 'NULL')
            USING HINT = 'Pass the schema-qualified name of the users table, as given to new_user_hook.install().';
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = rel) <> 'r' THEN
        RAISE EXCEPTION '"%" is not a table: backfill() reads the users of the table the hook is installed on', rel
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
           AND NOT EXISTS (SELECT 1 FROM (SELECT user_id, source, kind FROM new_user_hook.log_0
                                          UNION ALL
                                          SELECT user_id, source, kind FROM new_user_hook.log_1) AS k
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

-- SECURITY DEFINER: EXECUTE on it is all an operator needs.
CREATE OR REPLACE FUNCTION new_user_hook.redeliver(event_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF event_id IS NULL THEN
        RAISE EXCEPTION 'redeliver() takes the id of an event, not NULL'
            USING HINT = 'Event ids are in new_user_hook.deliveries (column id); new_user_hook.redeliver_failed() sends every dead-lettered event again.';
    END IF;
    IF EXISTS (SELECT 1 FROM new_user_hook.unread WHERE id = event_id) THEN
        RETURN false; -- pending: not sent from the log yet
    END IF;
    IF NOT EXISTS (SELECT 1 FROM new_user_hook.outbox WHERE id = event_id) THEN
        -- Delivered from the log: into the outbox, to be sent again from there.
        INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq, created_at, next_attempt_at)
        SELECT l.id, l.user_id, l.source, l.record, l.kind, l.old_record, l.seq, l.created_at, now()
          FROM (SELECT * FROM new_user_hook.log_0 UNION ALL SELECT * FROM new_user_hook.log_1) AS l
         WHERE l.id = event_id
         LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no event with id %', event_id
                USING HINT = 'Event ids are in new_user_hook.deliveries (column id); delivered events are deleted after pg_new_user_hook.retention.';
        END IF;
        UPDATE new_user_hook.counters SET requeued = requeued + 1;
        PERFORM new_user_hook.wake_on_commit();
        RETURN true;
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

-- SECURITY DEFINER: EXECUTE on it is all an operator needs.
CREATE OR REPLACE FUNCTION new_user_hook.redeliver_failed() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE new_user_hook.outbox
       SET status = 'pending', attempts = 0, next_attempt_at = now()
     WHERE status = 'failed';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        UPDATE new_user_hook.counters SET requeued = requeued + n;
        PERFORM new_user_hook.wake_on_commit();
    END IF;
    RETURN n;
END
$$;

CREATE OR REPLACE VIEW new_user_hook.metrics AS
WITH worker AS (
    SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_new_user_hook' LIMIT 1
), published AS (
    SELECT * FROM new_user_hook.worker_state()
), queue AS (
    -- What the running worker published; counted here when no worker runs or it has not counted yet.
    SELECT p.pending, p.failed, to_timestamp(p.oldest_pending) AS oldest_pending, p.captured FROM published p WHERE p.published
    UNION ALL
    SELECT g.pending, g.failed, g.oldest_pending, g.captured
      FROM new_user_hook.queue_gauges() g WHERE NOT (SELECT published FROM published)
)
SELECT (w.pid IS NOT NULL)::int                                     AS worker_up,
       p.paused::int                                                AS paused,
       p.backend_state                                              AS backend_state,
       q.pending                                                    AS pending,
       coalesce(new_user_hook.in_flight(), 0)                       AS in_flight,
       q.failed                                                     AS failed,
       coalesce(extract(epoch FROM now() - q.oldest_pending), 0)::float8 AS oldest_pending_age_seconds,
       extract(epoch FROM now() - c.last_delivered_at)::float8     AS seconds_since_last_delivery,
       q.captured                                                   AS captured_total,
       c.delivered                                                  AS delivered_total,
       c.retried                                                    AS retried_total,
       c.failed                                                     AS failed_total,
       c.attempts_2xx                                               AS attempts_2xx_total,
       c.attempts_3xx                                               AS attempts_3xx_total,
       c.attempts_4xx                                               AS attempts_4xx_total,
       c.attempts_5xx                                               AS attempts_5xx_total,
       c.attempts_timeout                                           AS attempts_timeout_total,
       c.attempts_network                                           AS attempts_network_total,
       new_user_hook.latency_bounds()                               AS delivery_latency_seconds,
       c.latency_bucket                                             AS delivery_latency_seconds_bucket,
       c.latency_sum                                                AS delivery_latency_seconds_sum,
       c.delivered                                                  AS delivery_latency_seconds_count,
       -- 1 while new_user_hook.status has a problem of configuration or of the worker
       -- (a step that keeps failing, a database it cannot connect to); since 0.8.0.
       (new_user_hook.config_problem() IS NOT NULL)::int            AS problem
  FROM new_user_hook.counters c
  CROSS JOIN published p
  CROSS JOIN queue q
  LEFT JOIN worker w ON true;

CREATE OR REPLACE VIEW new_user_hook.status AS
WITH worker AS (
    SELECT pid, datname FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_new_user_hook' LIMIT 1
)
SELECT w.pid                      AS worker_pid,
       w.datname                  AS worker_database,
       new_user_hook.preloaded()  AS preloaded,
       q.pending,
       new_user_hook.in_flight() AS in_flight,
       c.delivered,
       q.failed,
       now() - q.oldest_pending   AS oldest_pending_age,
       coalesce(new_user_hook.config_problem(), c.last_error) AS last_error,
       c.last_error_at            AS last_error_at,
       CASE
           WHEN new_user_hook.config_problem() IS NOT NULL THEN new_user_hook.config_problem()
           WHEN w.pid IS NULL THEN new_user_hook.missing_worker()
           WHEN w.datname <> current_database() THEN format(
                'the worker delivers from database %I (pg_new_user_hook.database), not this one', w.datname)
           WHEN p.paused THEN
                'delivery is paused (pg_new_user_hook.paused = on): events are queued and none is sent; set it off and reload to resume'
           WHEN p.backend_state >= 1 THEN
                'the backend is failing (' || coalesce(c.last_error, 'see new_user_hook.deliveries') ||
                '): delivery is held back and one probe is sent at a time until it answers'
           -- Since 0.8.0: failures that repeat without the breaker (breaker_failures = 0),
           -- and events given up on.
           WHEN q.pending > 0 AND c.last_error_at > coalesce(c.last_delivered_at, '-infinity') THEN
                'deliveries are failing (' || c.last_error ||
                '): each event is retried on its schedule (retry_base_ms, retry_max_ms, max_attempts)'
           WHEN q.failed > 0 THEN
                q.failed || ' events were given up on (' || coalesce(c.last_error, 'see new_user_hook.deliveries') ||
                '): fix what the backend refused, then SELECT new_user_hook.redeliver_failed()'
       END                        AS problem,
       p.paused,
       (ARRAY['closed', 'half-open', 'open'])[p.backend_state + 1] AS backend_state
  FROM new_user_hook.queue_gauges() q
  CROSS JOIN new_user_hook.worker_state() p
  CROSS JOIN new_user_hook.counters c
  LEFT JOIN worker w ON true;

-- Nothing new here is for PUBLIC either.
REVOKE ALL ON FUNCTION new_user_hook.stamp_xid() FROM PUBLIC;
REVOKE ALL ON new_user_hook.log_0, new_user_hook.log_1, new_user_hook.done_0, new_user_hook.done_1,
              new_user_hook.positions, new_user_hook.unread FROM PUBLIC;
