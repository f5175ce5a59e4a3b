//! The queue's SQL, all of it the worker's: reading committed events into the outbox,
//! claiming due events, recording outcomes, the queue's gauges, the purge. Each
//! function runs inside a transaction the caller opened with `spi::transaction`.

mod maintenance;
mod vault;

pub use maintenance::{analyze_outbox, rotate_log, vacuum_captured, ReadSince, Rotation};
pub use vault::vault_secret;

use crate::catalog::{lifecycle_columns, Capture};
use crate::model::classify::Decision;
use crate::model::event::{Event, Kind};
use crate::shared::QueueGauges;
use crate::spi::{select_kept, write, write_kept, Planning};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::time::Duration;

/// Session settings of the worker. Its own commits (claims, outcomes) need not wait
/// for the WAL flush: losing the last of them in a crash only means an event is
/// sent again, never lost, since the event itself was made durable by the signup's
/// commit. Not waiting keeps the worker's fsyncs out of the signups' way.
///
/// A lock held on the outbox (a long transaction, a manual LOCK) fails the round
/// after a second instead of blocking it: the worker then retries with what it
/// knows, and stays able to answer a shutdown.
///
/// The worker runs as the bootstrap superuser: no name in its SQL may be resolved
/// through a schema another role can create objects in. Its `search_path` is
/// pg_catalog alone, whatever the database or role settings say, so a
/// `public.to_json(timestamptz)` (an exact match beats the polymorphic built-in) or a
/// schema named after the superuser cannot run code as it.
pub fn configure_session() {
    write(
        c"SET search_path = pg_catalog, pg_temp; SET synchronous_commit = off; SET lock_timeout = '1s'; \
          SET jit = off; SET application_name = 'pg_new_user_hook'",
        &[],
    );
}

/// Where a change's `seq` goes (`t` an event read, in a statement of events read
/// together): after its user's pending events where it is not already (events
/// restored from a dump carry the positions of the cluster they were written in),
/// keeping the order of the user's events read together. They are due at their
/// creation time, so the claim keeps taking events in the order they were queued.
const PLACE_AND_INSERT: &str = "placed AS (
             SELECT t.*, CASE WHEN t.kind = 'created' THEN t.seq ELSE
                        t.seq + GREATEST(0, (SELECT max(p.seq) + 1 FROM new_user_hook.outbox AS p
                                              WHERE p.user_id = t.user_id AND p.status NOT IN ('delivered', 'failed'))
                                            - min(t.seq) OVER (PARTITION BY t.user_id)) END AS placed_seq
               FROM taken AS t)
         INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq, created_at, next_attempt_at)
         SELECT id, user_id, source, record, kind, old_record, placed_seq, created_at, created_at FROM placed";

/// Reads into the outbox every event committed since the last read, in one
/// statement: all of them, so that a user's earlier event never stays behind while a
/// later one is claimed (a transaction that committed a later event of a user
/// committed after the earlier one). Returns how many it read.
pub fn take(capture: Capture) -> i64 {
    match capture {
        Capture::Log => take_log(),
        Capture::Captured => take_captured(),
        Capture::Outbox => 0,
    }
}

/// From the log: the events of the transactions that committed after the position's
/// snapshot was taken and before this statement's was, through the index on xid from
/// the oldest transaction running at the position. The position moves to this
/// statement's snapshot in the same statement, so an event is read once however late
/// its transaction commits; it stays where it is when nothing was read (no write,
/// no transaction id). A position row deleted by hand is written again (meanwhile
/// everything is unread, and what the outbox has already is skipped). A committed
/// event stamped with a transaction id this cluster has not reached (written with
/// the stamping trigger disabled: `pg_restore --disable-triggers`) would be unread
/// forever: it is read, and stamped with the first normal transaction id, which
/// every position sees (read).
///
/// The window is found through the index on xid: the transactions from the
/// position's xmax on, and the few that were running at the position (its xip) —
/// not everything from its xmin, which a long transaction holds back. The position is read first, so that the planner sees its
/// values: the range on xid is then planned as what it is, a few index pages.
fn take_log() -> i64 {
    let position: Option<String> = select_kept(
        c"SELECT snapshot::text FROM new_user_hook.positions WHERE endpoint = 'default'",
        &[],
        Planning::Generic,
        1,
        |row| row.get::<String>(1),
    )
    .into_iter()
    .next()
    .flatten();
    let sql = format!(
        "WITH taken AS (
             SELECT l.* FROM new_user_hook.log_0 AS l
              WHERE (l.xid >= coalesce(pg_snapshot_xmax($1::pg_snapshot), '0')
                     OR l.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot))))
                AND NOT coalesce(pg_visible_in_snapshot(l.xid, $1::pg_snapshot), false)
             UNION ALL
             SELECT l.* FROM new_user_hook.log_1 AS l
              WHERE (l.xid >= coalesce(pg_snapshot_xmax($1::pg_snapshot), '0')
                     OR l.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot))))
                AND NOT coalesce(pg_visible_in_snapshot(l.xid, $1::pg_snapshot), false)
         ), foreign_0 AS (
             UPDATE new_user_hook.log_0 SET xid = '3'
              WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
         ), foreign_1 AS (
             UPDATE new_user_hook.log_1 SET xid = '3'
              WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
         ), moved AS (
             INSERT INTO new_user_hook.positions AS p (endpoint, snapshot, moved_at)
             SELECT 'default', pg_current_snapshot(), now() WHERE EXISTS (SELECT 1 FROM taken)
             ON CONFLICT (endpoint) DO UPDATE SET snapshot = excluded.snapshot, moved_at = excluded.moved_at
         ), {PLACE_AND_INSERT}
         ON CONFLICT (id) DO NOTHING\0"
    );
    let sql = CStr::from_bytes_with_nul(sql.as_bytes()).expect("one NUL, at the end");
    write_kept(sql, &[position.into()], Planning::Custom) as i64
}

/// From a 0.7.0 schema's capture table (until ALTER EXTENSION UPDATE): every row
/// this transaction sees, deleted.
fn take_captured() -> i64 {
    let sql = format!(
        "WITH taken AS (
             DELETE FROM new_user_hook.captured RETURNING *
         ), {PLACE_AND_INSERT}\0"
    );
    let sql = CStr::from_bytes_with_nul(sql.as_bytes()).expect("one NUL, at the end");
    write(sql, &[]) as i64
}

/// An event waits while an earlier event of its user is pending (in flight, being
/// retried or held back): a user's events go out one at a time, in commit order.
/// `o` is the outbox row in question; its user's events are probed through index
/// outbox_user (`tests::the_claim_probes_each_users_earlier_events_through_the_index`),
/// whatever the statistics say: a scalar subquery, not NOT EXISTS, which the planner
/// may turn into a hash anti join over the whole backlog (118 ms a claim with 100,000
/// events waiting and statistics taken when few were); and "not delivered or failed"
/// rather than "pending", which would let it read them through outbox_due instead.
/// Backwards from the event: the one just before a waiting event is pending, so the
/// probe stops at its first row however long the user's backlog.
const NO_EARLIER_EVENT_PENDING: &str = "(SELECT true FROM new_user_hook.outbox AS p
         WHERE p.user_id = o.user_id AND p.seq < o.seq AND p.status NOT IN ('delivered', 'failed')
         ORDER BY p.seq DESC LIMIT 1) IS NULL";

/// Claims up to `limit` due events, oldest first, skipping those in flight and those
/// waiting for an earlier event of their user; `probe` marks them as probes of a
/// backend that is down (not held back).
///
/// A claim lives in the worker's memory only: the row stays `pending` until the
/// outcome is recorded, so an event whose worker dies mid-request (or whose server
/// crashes) is simply due again when the worker starts — at least once, and no
/// write per claim.
pub fn claim(limit: usize, in_flight: &[String], probe: bool) -> Vec<Event> {
    let args: [DatumWithOid; 2] = [(limit as i64).into(), in_flight.to_vec().into()];
    let sql = std::ffi::CString::new(claim_sql(lifecycle_columns())).expect("no NUL");
    select_kept(&sql, &args, Planning::Custom, 0, |row| Event {
        id: row.get::<String>(1).unwrap_or_default(),
        attempt: row.get::<i32>(2).unwrap_or(1) as u32,
        record: row.get::<String>(3).unwrap_or_default(),
        source: row.get::<String>(4).unwrap_or_default(),
        created_at: row.get::<String>(5).unwrap_or_default(),
        kind: row
            .get::<String>(6)
            .and_then(|k| Kind::from_name(&k))
            .unwrap_or(Kind::Created),
        old_record: row.get::<String>(7),
        probe,
    })
}

/// The claim: $1 the batch size, $2 the ids in flight. Without the lifecycle columns
/// (an outbox not yet updated), every event is a creation.
pub fn claim_sql(lifecycle: bool) -> String {
    let (in_order, columns) = if lifecycle {
        (
            format!("AND {NO_EARLIER_EVENT_PENDING}"),
            "o.kind::text, o.old_record::text",
        )
    } else {
        (String::new(), "'created', NULL::text")
    };
    // Pick the ids first: the planner may sort every due row, and the (costly) text
    // of the records is then made for the batch only.
    format!(
        "WITH due AS MATERIALIZED (
             SELECT id FROM new_user_hook.outbox AS o
              WHERE status = 'pending' AND next_attempt_at <= now() AND id <> ALL ($2::text[]::uuid[])
                {in_order}
              ORDER BY next_attempt_at
              LIMIT $1)
         SELECT o.id::text, (o.attempts + 1)::int4, o.record::text, o.source::text, to_json(o.created_at) #>> '{{}}', {columns}
           FROM new_user_hook.outbox AS o JOIN due USING (id)"
    )
}

/// Time until the earliest pending event that could be claimed is due (zero if
/// overdue): not in flight, and not waiting for an earlier event of its user.
pub fn next_due(in_flight: &[String]) -> Option<Duration> {
    let args: [DatumWithOid; 1] = [in_flight.to_vec().into()];
    let sql = std::ffi::CString::new(next_due_sql(lifecycle_columns())).expect("no NUL");
    select_kept(&sql, &args, Planning::Custom, 1, |row| row.get::<f64>(1))
        .into_iter()
        .next()
        .flatten()
        .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
}

/// `next_due`'s query: $1 the ids in flight.
pub fn next_due_sql(lifecycle: bool) -> String {
    let in_order = if lifecycle {
        format!("AND {NO_EARLIER_EVENT_PENDING}")
    } else {
        String::new()
    };
    // NULL (not 0) when nothing is pending: then the worker sleeps until woken.
    // ORDER BY … LIMIT 1, not min(): it stops at the first event that qualifies.
    format!(
        "SELECT (SELECT extract(epoch FROM o.next_attempt_at - clock_timestamp())::float8
                   FROM new_user_hook.outbox AS o
                  WHERE status = 'pending' AND id <> ALL ($1::text[]::uuid[])
                    {in_order}
                  ORDER BY next_attempt_at
                  LIMIT 1)"
    )
}

/// One outcome to record: the event, its attempt number, the decision, and the
/// class the attempt is counted under (`classify::class`).
#[derive(Clone)]
pub struct Record {
    pub id: String,
    pub attempt: u32,
    pub decision: Decision,
    pub class: Option<&'static str>,
}

/// Records the outcome of many attempts in one statement, and adds them to the
/// counters in the same transaction (so the metrics and the outbox never disagree,
/// crash or not).
pub fn record(outcomes: &[Record]) {
    if outcomes.is_empty() {
        return;
    }
    let n = outcomes.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut codes: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<String>> = Vec::with_capacity(n);
    let mut delays: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut classes: Vec<Option<String>> = Vec::with_capacity(n);
    for r in outcomes {
        ids.push(r.id.clone());
        attempts.push(r.attempt as i32);
        let (status, code, error, delay) = match &r.decision {
            Decision::Delivered { status } => ("delivered", Some(*status as i32), None, None),
            Decision::Retry {
                status,
                error,
                delay,
            } => (
                "pending",
                status.map(i32::from),
                Some(error.clone()),
                Some(delay.as_millis() as i64),
            ),
            Decision::Failed { status, error } => {
                ("failed", status.map(i32::from), Some(error.clone()), None)
            }
        };
        statuses.push(status.to_string());
        codes.push(code);
        errors.push(error);
        delays.push(delay);
        classes.push(r.class.map(str::to_string));
    }
    let args: [DatumWithOid; 7] = [
        ids.into(),
        statuses.into(),
        codes.into(),
        errors.into(),
        delays.into(),
        attempts.into(),
        classes.into(),
    ];
    write_kept(
        c"WITH r AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int8[], $6::int[], $7::text[])
                 AS r(id, outcome, code, error, delay_ms, attempt, class)
         ), done AS (
             UPDATE new_user_hook.outbox AS o SET
                 status = r.outcome,
                 attempts = r.attempt,
                 last_attempt_at = clock_timestamp(),
                 last_status_code = r.code,
                 last_error = r.error,
                 delivered_at = CASE WHEN r.outcome = 'delivered' THEN clock_timestamp() END,
                 next_attempt_at = CASE WHEN r.outcome = 'pending'
                                        THEN clock_timestamp() + r.delay_ms * interval '1 millisecond' END
             FROM r
             WHERE o.id = r.id::uuid AND o.status = 'pending'
             RETURNING r.outcome, r.attempt, r.class, r.error, o.last_attempt_at,
                       extract(epoch FROM o.delivered_at - o.created_at)::float8 AS latency
         ), t AS (
             SELECT count(*) FILTER (WHERE attempt = 1)                           AS first_attempts,
                    count(*) FILTER (WHERE outcome = 'delivered')                AS delivered,
                    count(*) FILTER (WHERE outcome = 'pending')                  AS retried,
                    count(*) FILTER (WHERE outcome = 'failed')                   AS failed,
                    count(*) FILTER (WHERE class = '2xx')                        AS c2xx,
                    count(*) FILTER (WHERE class = '3xx')                        AS c3xx,
                    count(*) FILTER (WHERE class = '4xx')                        AS c4xx,
                    count(*) FILTER (WHERE class = '5xx')                        AS c5xx,
                    count(*) FILTER (WHERE class = 'timeout')                    AS ctimeout,
                    count(*) FILTER (WHERE class = 'network')                    AS cnetwork,
                    coalesce(sum(latency) FILTER (WHERE outcome = 'delivered'), 0) AS latency_sum,
                    max(last_attempt_at) FILTER (WHERE outcome = 'delivered')    AS last_delivered_at,
                    (array_agg(error ORDER BY last_attempt_at DESC) FILTER (WHERE error IS NOT NULL))[1] AS last_error,
                    max(last_attempt_at) FILTER (WHERE error IS NOT NULL)        AS last_error_at
               FROM done
         )
         UPDATE new_user_hook.counters AS c SET
             first_attempts = c.first_attempts + t.first_attempts,
             delivered = c.delivered + t.delivered,
             retried = c.retried + t.retried,
             failed = c.failed + t.failed,
             attempts_2xx = c.attempts_2xx + t.c2xx,
             attempts_3xx = c.attempts_3xx + t.c3xx,
             attempts_4xx = c.attempts_4xx + t.c4xx,
             attempts_5xx = c.attempts_5xx + t.c5xx,
             attempts_timeout = c.attempts_timeout + t.ctimeout,
             attempts_network = c.attempts_network + t.cnetwork,
             latency_bucket = CASE WHEN t.delivered = 0 THEN c.latency_bucket ELSE ARRAY(
                 SELECT b.n + (SELECT count(*) FROM done WHERE done.outcome = 'delivered' AND done.latency <= b.le)
                   FROM unnest(c.latency_bucket, new_user_hook.latency_bounds()) WITH ORDINALITY AS b(n, le, i)
                  ORDER BY b.i) END,
             latency_sum = c.latency_sum + t.latency_sum,
             last_delivered_at = coalesce(t.last_delivered_at, c.last_delivered_at),
             last_error = coalesce(t.last_error, c.last_error),
             last_error_at = coalesce(t.last_error_at, c.last_error_at)
         FROM t",
        &args,
        Planning::Custom,
    );
}

/// After a backend came back: events waiting out a backoff from the outage are
/// due now, so the backlog drains at once instead of on each event's schedule —
/// in the order they were queued (an earlier event of a user first, before the
/// later ones that waited for it).
pub fn release_backoff() -> i64 {
    write(
        c"UPDATE new_user_hook.outbox SET next_attempt_at = created_at
           WHERE status = 'pending' AND next_attempt_at > clock_timestamp()",
        &[],
    ) as i64
}

/// What the queue holds now (`new_user_hook.queue_gauges()`), to publish.
pub fn queue_gauges() -> QueueGauges {
    Spi::connect(|client| {
        let row = client
            .select(
                "SELECT pending, failed, extract(epoch FROM oldest_pending)::float8, captured
                   FROM new_user_hook.queue_gauges()",
                Some(1),
                &[],
            )
            .expect("counting the queue")
            .first();
        QueueGauges {
            published: true,
            pending: row.get::<i64>(1).ok().flatten().unwrap_or(0),
            failed: row.get::<i64>(2).ok().flatten().unwrap_or(0),
            oldest_pending: row.get::<f64>(3).ok().flatten().unwrap_or(f64::NAN),
            captured: row.get::<i64>(4).ok().flatten().unwrap_or(0),
        }
    })
}

/// Deletes up to `limit` delivered events older than the retention, oldest first
/// (through index outbox_delivered); returns how many.
pub fn purge_delivered(retention: Duration, limit: i64) -> i64 {
    let args: [DatumWithOid; 2] = [(retention.as_secs() as i64).into(), limit.into()];
    write(
        c"DELETE FROM new_user_hook.outbox WHERE id IN (
              SELECT id FROM new_user_hook.outbox
               WHERE status = 'delivered' AND delivered_at < now() - $1 * interval '1 second'
               ORDER BY delivered_at
               LIMIT $2)",
        &args,
    ) as i64
}
