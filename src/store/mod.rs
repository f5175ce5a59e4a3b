//! The queue's SQL, all of it the worker's: reading the log (`log`), claiming due
//! events from the outbox, recording outcomes and the position, the queue's gauges, the purge. Each
//! function runs inside a transaction the caller opened with `spi::transaction`.

mod log;
mod maintenance;
mod vault;

pub use log::{load_position, read_chunk, restamp, Chunk};
pub use maintenance::{analyze_outbox, rotate_log, vacuum_captured, ReadSince, Rotation};
pub use vault::vault_secret;

use crate::catalog::{lifecycle_columns, Capture};
use crate::model::classify::Decision;
use crate::model::event::{Event, Kind};
use crate::model::window::{LogEvent, Position};
use crate::shared::QueueGauges;
use crate::spi::{select_kept, statement, write, KeptRow, Planning};
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
    // No statement_timeout of the database's or role's: a read of a large backlog's window
    // cut short would be retried, and cut short, forever.
    write(
        c"SET search_path = pg_catalog, pg_temp; SET synchronous_commit = off; SET lock_timeout = '1s'; \
          SET statement_timeout = 0; SET jit = off; SET application_name = 'pg_new_user_hook'",
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

/// Reads a 0.7.0 schema's capture table into the outbox (a 0.8.0 schema's log is
/// read by `read_chunk`). Returns how many it read.
pub fn take(capture: Capture) -> i64 {
    match capture {
        Capture::Captured => take_captured(),
        Capture::Log | Capture::Outbox => 0,
    }
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
    select_kept(&sql, &args, Planning::Custom, 0, |row| {
        let id = row.get::<String>(1).unwrap_or_default();
        let attempt = row.get::<i32>(2).unwrap_or(1) as u32;
        event_of(row, id, attempt, 3, probe)
    })
}

/// An event from a row whose columns from `first` on are its record, source,
/// created_at, kind and old_record (as the claim and the read of the log return them).
pub(crate) fn event_of(row: &KeptRow, id: String, attempt: u32, first: i32, probe: bool) -> Event {
    Event {
        id,
        attempt,
        record: row.get::<String>(first).unwrap_or_default(),
        source: row.get::<String>(first + 1).unwrap_or_default(),
        created_at: row.get::<String>(first + 2).unwrap_or_default(),
        kind: row
            .get::<String>(first + 3)
            .and_then(|k| Kind::from_name(&k))
            .unwrap_or(Kind::Created),
        old_record: row.get::<String>(first + 4),
        probe,
    }
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

/// An event read from the log, resolved: its outcome (None: held, put in the
/// outbox behind an earlier event of its user that is to be retried there).
#[derive(Clone)]
pub struct LogRecord {
    pub event: LogEvent,
    pub decision: Option<Decision>,
    pub class: Option<&'static str>,
}

/// What a round records: outcomes of events claimed from the outbox, events read
/// from the log and resolved, and the position they moved.
#[derive(Clone, Default)]
pub struct Batch {
    pub outbox: Vec<Record>,
    pub log: Vec<LogRecord>,
    pub position: Option<Position>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty() && self.log.is_empty() && self.position.is_none()
    }

    pub fn outcomes(&self) -> usize {
        self.outbox.len() + self.log.len()
    }

    /// Whether recording it puts events into the outbox (retries, dead letters,
    /// held events) or changes the state of some there.
    pub fn touches_outbox(&self) -> bool {
        !self.outbox.is_empty()
            || self
                .log
                .iter()
                .any(|r| !matches!(r.decision, Some(Decision::Delivered { .. })))
    }

    pub fn extend(&mut self, other: Batch) {
        self.outbox.extend(other.outbox);
        self.log.extend(other.log);
        if other.position.is_some() {
            self.position = other.position;
        }
    }
}

/// The parts of a decision as recorded: status, code, error, retry delay (ms).
fn parts(decision: &Decision) -> (&'static str, Option<i32>, Option<String>, Option<i64>) {
    match decision {
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
    }
}

/// Records a batch in one statement, and adds its outcomes to the counters in the
/// same transaction (so the metrics and the queue never disagree, crash or not):
/// outcomes of outbox events update their rows; events from the log delivered are
/// listed in one done row per window and segment (no row of theirs is written);
/// the others go into the outbox (a retry, a dead letter, held behind their user's
/// retry). The position moves if it is still where the worker left it; returns
/// false if it was to move and was not (changed by someone else).
pub fn record(batch: &Batch) -> bool {
    if batch.is_empty() {
        return true;
    }
    let n = batch.outbox.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut codes: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<String>> = Vec::with_capacity(n);
    let mut delays: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut classes: Vec<Option<String>> = Vec::with_capacity(n);
    for r in &batch.outbox {
        ids.push(r.id.clone());
        attempts.push(r.attempt as i32);
        let (status, code, error, delay) = parts(&r.decision);
        statuses.push(status.to_string());
        codes.push(code);
        errors.push(error);
        delays.push(delay);
        classes.push(r.class.map(str::to_string));
    }
    let n = batch.log.len();
    let mut l_ids = Vec::with_capacity(n);
    let mut l_segments = Vec::with_capacity(n);
    let mut l_windows = Vec::with_capacity(n);
    let mut l_outcomes = Vec::with_capacity(n);
    let mut l_codes: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut l_errors: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_delays: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut l_classes: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_users: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_sources: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_kinds: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_records: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_old: Vec<Option<String>> = Vec::with_capacity(n);
    let mut l_seqs = Vec::with_capacity(n);
    let mut l_created = Vec::with_capacity(n);
    for r in &batch.log {
        let e = &r.event;
        let (outcome, code, error, delay) = match &r.decision {
            Some(d) => parts(d),
            None => ("held", None, None, None),
        };
        l_ids.push(e.event.id.clone());
        l_segments.push(e.segment as i32);
        l_windows.push(e.window);
        l_outcomes.push(outcome.to_string());
        l_codes.push(code);
        l_errors.push(error);
        l_delays.push(delay);
        l_classes.push(r.class.map(str::to_string));
        l_seqs.push(e.seq);
        l_created.push(e.event.created_at.clone());
        // The event itself only for the outbox: a delivered one is listed by id.
        let keep = outcome != "delivered";
        l_users.push(keep.then(|| e.user_id.clone()));
        l_sources.push(keep.then(|| e.event.source.clone()));
        l_kinds.push(keep.then(|| e.event.kind.name().to_string()));
        l_records.push(keep.then(|| e.event.record.clone()));
        l_old.push(e.event.old_record.clone().filter(|_| keep));
    }
    let position = batch.position.as_ref();
    let args: [DatumWithOid; 25] = [
        ids.into(),
        statuses.into(),
        codes.into(),
        errors.into(),
        delays.into(),
        attempts.into(),
        classes.into(),
        l_ids.into(),
        l_segments.into(),
        l_windows.into(),
        l_outcomes.into(),
        l_codes.into(),
        l_errors.into(),
        l_delays.into(),
        l_classes.into(),
        l_users.into(),
        l_sources.into(),
        l_kinds.into(),
        l_records.into(),
        l_old.into(),
        l_seqs.into(),
        l_created.into(),
        position.map(|p| p.snapshot.clone()).into(),
        position.map(|p| p.number).into(),
        position.map(|p| p.was).into(),
    ];
    // Deliveries from the log only (no outbox row to change or add): the plan kept.
    let (sql, planning) = if batch.touches_outbox() {
        (RECORD, Planning::Custom)
    } else {
        (RECORD_DELIVERIES, Planning::Generic)
    };
    select_kept(sql, &args, planning, 1, |row| {
        row.get::<bool>(1).unwrap_or(false)
    })
    .into_iter()
    .next()
    .unwrap_or(false)
}

/// RECORD's parts. $1–$7: outcomes of events sent from the outbox.
macro_rules! record_outbox {
    () => {
        "WITH r AS (
         SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int8[], $6::int[], $7::text[])
             AS r(id, outcome, code, error, delay_ms, attempt, class)
     ), updated AS (
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
     "
    };
}

/// $8–$22: outcomes of events read from the log; a delivered one goes into a done row.
macro_rules! record_log {
    () => {
        "l AS (
         SELECT * FROM unnest($8::text[], $9::int[], $10::int8[], $11::text[], $12::int[], $13::text[], $14::int8[],
                              $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::int8[],
                              $22::text[])
             AS l(id, segment, window_number, outcome, code, error, delay_ms, class, user_id, source, kind, record,
                  old_record, seq, created_at)
     ), done_0 AS (
         INSERT INTO new_user_hook.done_0 (window_number, ids, codes, at)
         SELECT window_number, array_agg(id::uuid), array_agg(code), clock_timestamp() FROM l
          WHERE outcome = 'delivered' AND segment = 0 GROUP BY window_number
     ), done_1 AS (
         INSERT INTO new_user_hook.done_1 (window_number, ids, codes, at)
         SELECT window_number, array_agg(id::uuid), array_agg(code), clock_timestamp() FROM l
          WHERE outcome = 'delivered' AND segment = 1 GROUP BY window_number
     "
    };
}

/// Events read from the log that go into the outbox (retries, dead letters, held).
macro_rules! record_exceptions {
    () => {
        "), exceptions AS (
         INSERT INTO new_user_hook.outbox (id, user_id, source, record, kind, old_record, seq, created_at, status, attempts,
                                           next_attempt_at, last_attempt_at, last_status_code, last_error)
         SELECT id::uuid, user_id::uuid, source, record::json, kind, old_record::json, seq, created_at::timestamptz,
                CASE WHEN outcome = 'failed' THEN 'failed' ELSE 'pending' END,
                CASE WHEN outcome = 'held' THEN 0 ELSE 1 END,
                CASE outcome WHEN 'pending' THEN clock_timestamp() + delay_ms * interval '1 millisecond'
                             WHEN 'held' THEN created_at::timestamptz END,
                CASE WHEN outcome <> 'held' THEN clock_timestamp() END,
                code, error
           FROM l WHERE outcome <> 'delivered'
         ON CONFLICT (id) DO NOTHING
     "
    };
}

/// $23–$25: the position, moved past the windows resolved.
macro_rules! record_position {
    () => {
        "), moved AS (
         INSERT INTO new_user_hook.positions AS p (endpoint, snapshot, window_number, moved_at)
         SELECT 'default', $23::text::pg_snapshot, $24::int8, now() WHERE $23::text IS NOT NULL
         ON CONFLICT (endpoint) DO UPDATE
            SET snapshot = excluded.snapshot, window_number = excluded.window_number, moved_at = excluded.moved_at
          WHERE p.window_number = $25::int8
         RETURNING 1
     "
    };
}

/// The attempts recorded, for the counters.
macro_rules! record_done_all {
    () => {
        "), done AS (
         SELECT outcome, attempt, class, error, last_attempt_at, latency FROM updated
         UNION ALL
         SELECT outcome, 1, class, error, clock_timestamp(),
                CASE WHEN outcome = 'delivered' THEN extract(epoch FROM clock_timestamp() - created_at::timestamptz)::float8 END
           FROM l WHERE outcome <> 'held'
     "
    };
}

/// The attempts recorded when all were deliveries from the log.
macro_rules! record_done_log {
    () => {
        "), done AS (
         SELECT outcome, 1 AS attempt, class, error, clock_timestamp() AS last_attempt_at,
                extract(epoch FROM clock_timestamp() - created_at::timestamptz)::float8 AS latency
           FROM l
     "
    };
}

/// The counters, once per batch.
macro_rules! record_counters {
    () => {
        "), t AS (
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
     ), counted AS (
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
         FROM t
         WHERE t.first_attempts + t.delivered + t.retried + t.failed > 0
         RETURNING 1
     )
     SELECT $23::text IS NULL OR EXISTS (SELECT 1 FROM moved), (SELECT count(*) FROM counted)"
    };
}

const RECORD: &CStr = statement!(
    record_outbox!(),
    "), ",
    record_log!(),
    record_exceptions!(),
    record_position!(),
    record_done_all!(),
    record_counters!()
);

/// A batch of deliveries of events read from the log (and the position): what a
/// trickle and a drain record. Its plan is the same whatever is queued, so it is
/// kept generic; the same arguments as RECORD, whose $1–$7 it leaves unread.
const RECORD_DELIVERIES: &CStr = statement!(
    "WITH ",
    record_log!(),
    record_position!(),
    record_done_log!(),
    record_counters!()
);

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
pub fn purge_delivered(retention: Duration, limit: i64, log: bool) -> i64 {
    let retention = retention.as_secs() as i64;
    if !log {
        return write(PURGE, &[retention.into(), limit.into()]) as i64;
    }
    // The position's bounds as values, not a subquery: the plan then sees how few
    // events lie beyond them and reads those through the index on xid, where a bound
    // it cannot see made it read the whole log (0.2 s at 2 million events).
    let (xmax, xip) = position_bounds();
    let args: [DatumWithOid; 4] = [retention.into(), limit.into(), xmax.into(), xip.into()];
    write(PURGE_BEHIND_POSITION, &args) as i64
}

/// The stored position's xmax (0 without one: every event is beyond it) and the
/// transactions running at it, read with a new snapshot, as text (an xid8 may
/// exceed a bigint). An event is beyond the position when its xid is at least the
/// xmax or one of those.
pub(crate) fn position_bounds() -> (String, Vec<String>) {
    let bounds = select_kept(POSITION_BOUNDS, &[], Planning::Generic, 1, |row| {
        row.get::<Vec<String>>(1)
    })
    .into_iter()
    .next()
    .flatten()
    .unwrap_or_default();
    match bounds.split_first() {
        Some((xmax, xip)) => (xmax.clone(), xip.to_vec()),
        None => ("0".to_string(), Vec::new()),
    }
}

const POSITION_BOUNDS: &CStr = c"SELECT ARRAY[coalesce(pg_snapshot_xmax(snapshot)::text, '0')]
             || ARRAY(SELECT x::text FROM pg_snapshot_xip(snapshot) AS x)
       FROM new_user_hook.positions WHERE endpoint = 'default'";

const PURGE: &CStr = c"DELETE FROM new_user_hook.outbox WHERE id IN (
         SELECT id FROM new_user_hook.outbox
          WHERE status = 'delivered' AND delivered_at < now() - $1 * interval '1 second'
          ORDER BY delivered_at
          LIMIT $2)";

/// An event that went from the log into the outbox (a retry, a held one) and was
/// delivered from there is kept while its log row is beyond the position ($3 its
/// xmax, 0 for none; $4 the transactions running then): a worker starting again
/// reads that row again, and skips it only because the outbox has it.
const PURGE_BEHIND_POSITION: &CStr = c"WITH beyond AS (
         SELECT l.id FROM new_user_hook.log_0 AS l WHERE l.xid >= $3::xid8
         UNION ALL
         SELECT l.id FROM new_user_hook.log_0 AS l WHERE l.xid = ANY ($4::xid8[])
         UNION ALL
         SELECT l.id FROM new_user_hook.log_1 AS l WHERE l.xid >= $3::xid8
         UNION ALL
         SELECT l.id FROM new_user_hook.log_1 AS l WHERE l.xid = ANY ($4::xid8[])
     )
     DELETE FROM new_user_hook.outbox WHERE id IN (
         SELECT o.id FROM new_user_hook.outbox AS o
          WHERE o.status = 'delivered' AND o.delivered_at < now() - $1 * interval '1 second'
            AND NOT EXISTS (SELECT 1 FROM beyond AS b WHERE b.id = o.id)
          ORDER BY o.delivered_at
          LIMIT $2)";
