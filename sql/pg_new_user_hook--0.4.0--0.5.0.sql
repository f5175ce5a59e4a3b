-- pg_new_user_hook 0.4.0 -> 0.5.0: metrics (new_user_hook.metrics, counters kept in
-- new_user_hook.counters), a status view that no longer scans the outbox, the pause
-- switch and the circuit breaker (settings only), and an index on failed events.

-- Dead-lettered events: counted for the metrics and put back by redeliver_failed()
-- without reading the delivered ones kept for the retention (since 0.5.0).
CREATE INDEX outbox_failed ON new_user_hook.outbox (last_attempt_at) WHERE status = 'failed';

-- Cumulative counts for the metrics, one row. The worker adds to them in the
-- transaction that records the outcomes they count, so they survive restarts and
-- crashes exactly as the outbox does, and only go up. Upper bounds (seconds) of the
-- delivery latency histogram, commit to 2xx: latency_bucket[i] counts deliveries
-- that took at most latency_bounds()[i].
CREATE FUNCTION new_user_hook.latency_bounds() RETURNS float8[]
IMMUTABLE PARALLEL SAFE LANGUAGE sql
RETURN '{0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,300,1800,3600}'::float8[];

CREATE TABLE new_user_hook.counters (
    singleton        boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    first_attempts   bigint      NOT NULL DEFAULT 0, -- events attempted for the first time since queued
    requeued         bigint      NOT NULL DEFAULT 0, -- events put back by redeliver() / redeliver_failed()
    delivered        bigint      NOT NULL DEFAULT 0,
    retried          bigint      NOT NULL DEFAULT 0, -- attempts that failed and were scheduled again
    failed           bigint      NOT NULL DEFAULT 0, -- events that were dead-lettered
    attempts_2xx     bigint      NOT NULL DEFAULT 0,
    attempts_3xx     bigint      NOT NULL DEFAULT 0,
    attempts_4xx     bigint      NOT NULL DEFAULT 0,
    attempts_5xx     bigint      NOT NULL DEFAULT 0,
    attempts_timeout bigint      NOT NULL DEFAULT 0,
    attempts_network bigint      NOT NULL DEFAULT 0,
    latency_bucket   bigint[]    NOT NULL DEFAULT array_fill(0::bigint, ARRAY[16]),
    latency_sum      float8      NOT NULL DEFAULT 0,
    last_delivered_at timestamptz,
    last_error       text,
    last_error_at    timestamptz
);
-- What the counters would hold had they existed: the events still kept.
INSERT INTO new_user_hook.counters (first_attempts, delivered, failed, attempts_2xx, last_delivered_at, last_error, last_error_at)
SELECT count(*) FILTER (WHERE attempts > 0),
       count(*) FILTER (WHERE status = 'delivered'),
       count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'delivered'),
       max(delivered_at),
       (array_agg(last_error ORDER BY last_attempt_at DESC NULLS LAST) FILTER (WHERE last_error IS NOT NULL))[1],
       max(last_attempt_at) FILTER (WHERE last_error IS NOT NULL)
  FROM new_user_hook.outbox;
COMMENT ON TABLE new_user_hook.counters IS
    'Cumulative delivery counts of pg_new_user_hook. Read new_user_hook.metrics instead.';
-- The delivery latency of the delivered events still kept.
WITH latency AS MATERIALIZED (
    SELECT extract(epoch FROM delivered_at - created_at)::float8 AS s
      FROM new_user_hook.outbox WHERE status = 'delivered'
)
UPDATE new_user_hook.counters SET
    latency_bucket = ARRAY(
        SELECT count(l.s) FROM unnest(new_user_hook.latency_bounds()) WITH ORDINALITY AS b(le, i)
          LEFT JOIN latency l ON l.s <= b.le GROUP BY b.i ORDER BY b.i),
    latency_sum = (SELECT coalesce(sum(s), 0) FROM latency);

-- What the queue holds now, counted from the pending and failed events only (their
-- partial indexes), never from the delivered ones kept for the retention. The
-- worker reads it at most once a second while events come and go and publishes
-- it; the metrics view reads the published values, and this only when no worker
-- runs or it has not counted yet. captured counts every event ever queued: first attempts, plus
-- events not attempted yet, minus the ones redeliver() put back (counted already).
CREATE FUNCTION new_user_hook.queue_gauges(
    OUT pending bigint, OUT failed bigint, OUT oldest_pending timestamptz, OUT captured bigint)
STABLE SECURITY DEFINER LANGUAGE sql SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT q.pending, (SELECT count(*) FROM new_user_hook.outbox WHERE status = 'failed'),
           q.oldest_pending, c.first_attempts - c.requeued + q.never_attempted
      FROM (SELECT count(*) AS pending, count(*) FILTER (WHERE attempts = 0) AS never_attempted,
                   min(created_at) AS oldest_pending
              FROM new_user_hook.outbox WHERE status = 'pending') AS q,
           new_user_hook.counters AS c;
END;

-- The worker's published state (src/lib.rs).
CREATE FUNCTION new_user_hook."worker_state"() RETURNS TABLE (
	"published" bool,  /* bool */
	"paused" bool,  /* bool */
	"backend_state" INT,  /* i32 */
	"pending" bigint,  /* i64 */
	"failed" bigint,  /* i64 */
	"oldest_pending" double precision,  /* Option < f64 > */
	"captured" bigint  /* i64 */
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_state_wrapper';

DROP VIEW new_user_hook.status;

-- For Prometheus (postgres_exporter: examples/monitoring/queries.yml), one row:
-- gauges of the queue as the worker last published them, the worker's state, and
-- the cumulative counters. Cheap: no scan of the outbox. Readable by pg_monitor.
CREATE VIEW new_user_hook.metrics AS
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
       c.delivered                                                  AS delivery_latency_seconds_count
  FROM new_user_hook.counters c
  CROSS JOIN published p
  CROSS JOIN queue q
  LEFT JOIN worker w ON true;

-- One row: is delivery working, and if not, why. Its counts are exact: the queue is
-- counted from its pending and failed events (their partial indexes), everything
-- else comes from the counters; the delivered events kept for the retention are
-- never read.
CREATE VIEW new_user_hook.status AS
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
           WHEN p.backend_state = 2 THEN
                'the backend is failing (' || coalesce(c.last_error, 'see new_user_hook.deliveries') ||
                '): delivery is held back and one probe is sent at a time until it answers'
       END                        AS problem,
       p.paused,
       (ARRAY['closed', 'half-open', 'open'])[p.backend_state + 1] AS backend_state
  FROM new_user_hook.queue_gauges() q
  CROSS JOIN new_user_hook.worker_state() p
  CROSS JOIN new_user_hook.counters c
  LEFT JOIN worker w ON true;

-- Puts one event back in the queue, to be sent again now (attempts start over).
CREATE OR REPLACE FUNCTION new_user_hook.redeliver(event_id uuid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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

-- Puts every failed event back in the queue; returns how many.
CREATE OR REPLACE FUNCTION new_user_hook.redeliver_failed() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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

REVOKE ALL ON ALL TABLES IN SCHEMA new_user_hook FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA new_user_hook FROM PUBLIC;
GRANT EXECUTE ON FUNCTION new_user_hook.preloaded(), new_user_hook.config_problem(), new_user_hook.in_flight(),
                           new_user_hook.missing_worker(), new_user_hook.config_problem_after_reload(),
                           new_user_hook.worker_state(), new_user_hook.latency_bounds(),
                           new_user_hook.queue_gauges() TO PUBLIC;
-- Monitoring (postgres_exporter connects as a member of pg_monitor): the metrics
-- hold counts and states, no user data and no secret.
GRANT USAGE ON SCHEMA new_user_hook TO pg_monitor;
GRANT SELECT ON new_user_hook.metrics TO pg_monitor;

