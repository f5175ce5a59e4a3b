//! Reading the log: the stored position, and the next chunk of a window
//! (`model::window` keeps the place in memory).

use crate::model::window::{LogEvent, Reading};
use crate::spi::{select_kept, statement, Planning};
use pgrx::datum::DatumWithOid;
use std::ffi::CStr;

/// Events read in one statement at most: a window holding more (a backlog) is read
/// in chunks of this many, in commit order, as the ones before go out.
pub const CHUNK: i64 = 10_000;

/// The stored position: the snapshot every event visible in which is resolved
/// (None: nothing resolved yet — a new installation, or a restored one), and the
/// number the next window counts as. None when the row is missing (written again
/// with the next position).
pub fn load_position() -> (Option<String>, i64) {
    select_kept(
        c"SELECT snapshot::text, window_number FROM new_user_hook.positions WHERE endpoint = 'default'",
        &[],
        Planning::Generic,
        1,
        |row| (row.get::<String>(1), row.get::<i64>(2).unwrap_or(0)),
    )
    .into_iter()
    .next()
    .unwrap_or((None, 0))
}

/// What a chunk read found.
pub struct Chunk {
    /// The window's end: the snapshot the first chunk was read with.
    pub end: String,
    /// The chunk's last event among all it scanned (also those skipped or held),
    /// and whether it scanned as many as it could (more may follow).
    pub last: Option<(i64, String)>,
    pub full: bool,
    /// Events to put into the outbox behind a pending event of their user there,
    /// with the seq they take in it.
    pub held: Vec<LogEvent>,
    pub events: Vec<LogEvent>,
}

/// Reads the next chunk of a window: the events of the transactions that committed
/// after `reading.start` and are visible in the window's end (this statement's
/// snapshot for a new window), after `reading.after` in commit order. Events the
/// outbox has already (an exception, a redelivery) are skipped, and so are those the
/// done rows of the stored position's window and later list, while resuming (delivered
/// beyond the stored position before a restart). An event whose user has a pending
/// event in the outbox comes back held (the caller records it into the outbox before
/// it reads again); the others, to be sent from memory. Writes nothing.
pub fn read_chunk(reading: &Reading) -> Chunk {
    let (after_seq, after_id) = match &reading.after {
        Some((seq, id)) => (Some(*seq), Some(id.clone())),
        None => (None, None),
    };
    let args: [DatumWithOid; 6] = [
        reading.start.clone().into(),
        reading.end.clone().into(),
        after_seq.into(),
        after_id.into(),
        CHUNK.into(),
        reading.resuming.then_some(reading.number).into(),
    ];
    let mut chunk = Chunk {
        end: String::new(),
        last: None,
        full: false,
        held: Vec::new(),
        events: Vec::new(),
    };
    let (sql, args, planning) = if reading.resuming {
        (READ_RESUMING, &args[..], Planning::Custom)
    } else {
        (READ, &args[..5], Planning::GenericIndexed)
    };
    let rows = select_kept(sql, args, planning, 0, |row| {
        let head = (
            row.get::<String>(1).unwrap_or_default(),
            row.get::<i64>(2).unwrap_or(0),
            row.get::<i64>(3).zip(row.get::<String>(4)),
        );
        let event = row.get::<String>(6).map(|id| {
            let event = LogEvent {
                segment: row.get::<i32>(5).unwrap_or(0) as u8,
                user_id: row.get::<String>(7).unwrap_or_default(),
                seq: row.get::<i64>(8).unwrap_or(0),
                window: reading.number,
                event: super::event_of(row, id, 1, 9, false),
            };
            (event, row.get::<i64>(14))
        });
        (head, event)
    });
    for ((end, scanned, last), event) in rows {
        chunk.end = end;
        chunk.full = scanned >= CHUNK;
        chunk.last = last;
        match event {
            Some((event, Some(held_seq))) => chunk.held.push(LogEvent {
                seq: held_seq,
                ..event
            }),
            Some((event, None)) => chunk.events.push(event),
            None => {}
        }
    }
    chunk
}

/// Stamps the committed events whose transaction id this cluster has not reached
/// (written with the stamping trigger disabled: `pg_restore --disable-triggers`),
/// which no snapshot would ever show, with this transaction's id: a later window
/// reads them (the window's end counts the worker's own id as running). Returns how
/// many.
pub fn restamp() -> i64 {
    // Looked for first without writing: the UPDATE's lock on the segments would wait
    // for whoever holds one that conflicts (CREATE INDEX, LOCK ... IN SHARE MODE).
    let any = select_kept(RESTAMP_NEEDED, &[], Planning::GenericIndexed, 1, |row| {
        row.get::<bool>(1).unwrap_or(false)
    });
    if !any.into_iter().next().unwrap_or(false) {
        return 0;
    }
    select_kept(RESTAMP, &[], Planning::GenericIndexed, 1, |row| {
        row.get::<i64>(1).unwrap_or(0)
    })
    .into_iter()
    .next()
    .unwrap_or(0)
}

const RESTAMP_NEEDED: &CStr = c"SELECT EXISTS (SELECT 1 FROM new_user_hook.log_0
                        WHERE xid >= pg_snapshot_xmax(pg_current_snapshot()))
           OR EXISTS (SELECT 1 FROM new_user_hook.log_1
                       WHERE xid >= pg_snapshot_xmax(pg_current_snapshot()))";

const RESTAMP: &CStr = c"WITH s0 AS (
         UPDATE new_user_hook.log_0 SET xid = pg_current_xact_id()
          WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
         RETURNING 1
     ), s1 AS (
         UPDATE new_user_hook.log_1 SET xid = pg_current_xact_id()
          WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
         RETURNING 1
     )
     SELECT (SELECT count(*) FROM s0) + (SELECT count(*) FROM s1)";

/// The statements below, from their parts: $1 the window's start, $2 its end (NULL:
/// a new window, ending at this statement's snapshot), $3/$4 the (seq, id) the last
/// chunk ended at, $5 the chunk size; READ_RESUMING's $6 the window number from
/// which done rows list events delivered already. A user's pending events in the
/// outbox are probed through index outbox_user, from the latest back (see
/// store::NO_EARLIER_EVENT_PENDING).
macro_rules! read_end {
    () => {
        "WITH e AS MATERIALIZED (
         -- A new window ends at this statement's snapshot, which leaves out the worker's
         -- own transaction id: one assigned before it (by the round's record, or
         -- restamp()) would count as committed, and the events stamped with it would fall
         -- behind the window's end unread. It counts as running instead: a later window
         -- reads them.
         SELECT CASE WHEN $2::pg_snapshot IS NOT NULL THEN $2::pg_snapshot
                     WHEN c.x < pg_snapshot_xmax(c.s) THEN
                          format('%s:%s:%s', LEAST(pg_snapshot_xmin(c.s), c.x), pg_snapshot_xmax(c.s),
                                 (SELECT string_agg(v::text, ',' ORDER BY v)
                                    FROM (SELECT pg_snapshot_xip(c.s) UNION SELECT c.x) AS xs(v)))::pg_snapshot
                     ELSE c.s END AS s
           FROM (SELECT pg_current_snapshot() AS s, pg_current_xact_id_if_assigned() AS x) AS c
     "
    };
}

/// The window through the index on xid, as two ranges: the transactions from the
/// start's xmax to the end's, and the few that were running at the start (neither
/// holds an event visible in the start: no test of it per row). Both
/// bounds of the first are unknown to a generic plan, which takes them for a narrow
/// range (0.5 % of the log) whatever the log holds, and keeps the index.
macro_rules! chunk_by_ranges {
    () => {
        "), chunk AS MATERIALIZED (
         SELECT l.* FROM (
             SELECT 0 AS segment, l.id, l.user_id, l.source, l.kind, l.record, l.old_record, l.seq, l.created_at, l.xid
               FROM new_user_hook.log_0 AS l
              WHERE l.xid >= coalesce(pg_snapshot_xmax($1::pg_snapshot), '0') AND l.xid < pg_snapshot_xmax((SELECT s FROM e))
             UNION ALL
             SELECT 0 AS segment, l.id, l.user_id, l.source, l.kind, l.record, l.old_record, l.seq, l.created_at, l.xid
               FROM new_user_hook.log_0 AS l
              WHERE l.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot)))
             UNION ALL
             SELECT 1 AS segment, l.id, l.user_id, l.source, l.kind, l.record, l.old_record, l.seq, l.created_at, l.xid
               FROM new_user_hook.log_1 AS l
              WHERE l.xid >= coalesce(pg_snapshot_xmax($1::pg_snapshot), '0') AND l.xid < pg_snapshot_xmax((SELECT s FROM e))
             UNION ALL
             SELECT 1 AS segment, l.id, l.user_id, l.source, l.kind, l.record, l.old_record, l.seq, l.created_at, l.xid
               FROM new_user_hook.log_1 AS l
              WHERE l.xid = ANY (ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot)))
             ) AS l
          WHERE pg_visible_in_snapshot(l.xid, (SELECT s FROM e))
            AND ($3::int8 IS NULL OR (l.seq, l.id) > ($3::int8, $4::text::uuid))
          ORDER BY l.seq, l.id
          LIMIT $5::int8
     "
    };
}

/// Skips what the outbox has, and what done rows of the windows being resumed list.
macro_rules! not_resumed {
    () => {
        "), resumed AS (
         SELECT u.id FROM new_user_hook.done_0 AS d, unnest(d.ids) AS u(id) WHERE d.window_number >= $6::int8
         UNION ALL
         SELECT u.id FROM new_user_hook.done_1 AS d, unnest(d.ids) AS u(id) WHERE d.window_number >= $6::int8
     ), fresh AS (
         SELECT c.* FROM chunk AS c
          WHERE (SELECT true FROM new_user_hook.outbox AS o WHERE o.id = c.id) IS NULL
            AND NOT EXISTS (SELECT 1 FROM resumed AS r WHERE r.id = c.id)
     "
    };
}

/// Skips what the outbox has: one probe of its primary key an event (a correlated
/// subquery, which no plan turns into a scan of the whole outbox).
macro_rules! not_in_outbox {
    () => {
        "), fresh AS (
         SELECT c.* FROM chunk AS c
          WHERE (SELECT true FROM new_user_hook.outbox AS o WHERE o.id = c.id) IS NULL
     "
    };
}

/// A user with a pending event in the outbox has its events held behind it: they
/// come back with the seq they take there (after the user's latest pending one, in
/// their order), to be put into the outbox by the next record, before any later read.
macro_rules! read_tail {
    () => {
        "), flagged AS (
         SELECT f.*, (SELECT p.seq FROM new_user_hook.outbox AS p
                       WHERE p.user_id = f.user_id AND p.status NOT IN ('delivered', 'failed')
                       ORDER BY p.seq DESC LIMIT 1) AS pending_seq
           FROM fresh AS f
     ), last AS (
         SELECT seq, id FROM chunk ORDER BY seq DESC, id DESC LIMIT 1
     )
     SELECT (SELECT s FROM e)::text,
            (SELECT count(*) FROM chunk),
            (SELECT seq FROM last), (SELECT id::text FROM last),
            f.segment, f.id::text, f.user_id::text, f.seq, f.record::text, f.source::text,
            to_json(f.created_at) #>> '{}', f.kind::text, f.old_record::text,
            CASE WHEN f.pending_seq IS NOT NULL
                 THEN f.seq + GREATEST(0, f.pending_seq + 1 - min(f.seq) OVER (PARTITION BY f.user_id)) END
       FROM (SELECT 1) AS one
       LEFT JOIN flagged AS f ON true
      ORDER BY f.seq, f.id"
    };
}

/// A chunk of a window, kept with a generic plan made without sequential scans:
/// planning it at every read was most of what a trickle cost, and its best plan is
/// through the indexes whatever the backlog (a plan made while a segment was nearly
/// empty would otherwise scan it whole at each read as it fills).
const READ: &CStr = statement!(
    read_end!(),
    chunk_by_ranges!(),
    not_in_outbox!(),
    read_tail!()
);

/// The reads of the window open at a start (until it has events), which also skip
/// what the done rows of the windows being resumed list: planned each time.
const READ_RESUMING: &CStr = statement!(
    read_end!(),
    chunk_by_ranges!(),
    not_resumed!(),
    read_tail!()
);
